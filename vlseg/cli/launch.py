"""``vlseg launch``: accelerate's launcher behind vlseg's torchvision shim."""

from __future__ import annotations

import sys


def main(argv=None) -> int:
    """``vlseg launch [accelerate launch options] train.py ...``: accelerate's launcher, started after vlseg's
    torchvision shim, so it also works where the plain ``accelerate`` command cannot import (see README)."""
    from accelerate.commands.accelerate_cli import main as accelerate_main

    import vlseg  # noqa: F401  (the shim)

    sys.argv = ["accelerate", "launch", *(sys.argv[2:] if argv is None else argv)]
    accelerate_main()
    return 0
