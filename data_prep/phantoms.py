"""Write the procedural phantom corpus.

``python -m data_prep.phantoms`` is ``vlseg prepare phantoms`` (vlseg/cli/prepare.py)."""

from vlseg.cli.prepare import phantoms_main as main

if __name__ == "__main__":
    raise SystemExit(main())
