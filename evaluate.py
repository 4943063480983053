"""Score a checkpoint on a manifest split: python evaluate.py --checkpoint checkpoints/phantom --split test"""

import sys

from vlseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
