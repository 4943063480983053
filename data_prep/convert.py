"""Convert a dataset into manifest lines.

``python -m data_prep.convert`` is ``vlseg prepare convert`` (vlseg/cli/prepare.py)."""

from vlseg.cli.prepare import convert_main as main

if __name__ == "__main__":
    raise SystemExit(main())
