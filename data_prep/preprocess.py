"""Preprocess a corpus into the cache, or verify corpus and cache.

``python -m data_prep.preprocess`` is ``vlseg prepare cache`` (vlseg/cli/prepare.py)."""

from vlseg.cli.prepare import cache_main as main

if __name__ == "__main__":
    raise SystemExit(main())
