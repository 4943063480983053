"""``python -m vlseg.ablate``, the older form of ``vlseg ablate`` (vlseg/cli/ablate.py; the studies themselves are
vlseg/evaluate/ablate/)."""

from vlseg.cli.ablate import main

if __name__ == "__main__":
    raise SystemExit(main())
