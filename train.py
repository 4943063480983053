"""Train a text-prompted 3D segmenter: python train.py --config configs/phantom.yaml [key=value ...]"""

import sys

from vlseg.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
