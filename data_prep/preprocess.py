"""Preprocess a corpus into the memory-mapped cache that training reads its crops from, or verify corpus and cache.

    python -m data_prep.preprocess --manifest data/real/manifest.jsonl [--config configs/real.yaml] \\
        [--cache DIR] [--workers N] [--split train] [key=value ...]
    python -m data_prep.preprocess --manifest data/real/manifest.jsonl --verify [--config ...]

The settings (``data.ct_window``, ``data.target_spacing``, ``data.spacing_per_dataset``) come from the config's
``data`` section — the same config training uses, so that the cache is the one training expects; without ``--config``
the defaults apply, and ``key=value`` overrides work as for training (``data.target_spacing=auto``).  The cache folder
is ``--cache``, else ``data.cache``, else ``<manifest folder>/cache``; the processes are ``--workers``, else
``data.preprocess_workers``.

Up-to-date cases are skipped; a case whose sources or settings changed is rewritten.  A case that fails is reported
(one line: file and problem) and the others are still cached; the command then exits 1 (details in
``<cache>/report.json``).  ``--verify`` writes nothing: it checks every case (raw image and label readable and finite,
label on the image grid, the manifest's presence flags and boxes against the label, the cache entry present, up to
date and loadable), prints every problem, one line each, and exits 1 if there is any, 0 otherwise.  Bad arguments or
an unreadable manifest or config: one line ``error: <file>: <problem>``, exit 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from vlseg.data.manifest import SPLITS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.preprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True, help="corpus manifest (JSON Lines)")
    parser.add_argument("--cache", help="cache folder (default: data.cache, else <manifest folder>/cache)")
    parser.add_argument("--config", help="experiment YAML whose data section sets the preprocessing")
    parser.add_argument("--workers", type=int, help="processes (default: data.preprocess_workers; 0 = this one)")
    parser.add_argument("--split", choices=SPLITS, help="only the cases of this split (default: every case)")
    parser.add_argument("--verify", action="store_true", help="check the corpus and the cache, print every problem")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. data.target_spacing=auto")
    args = parser.parse_args(argv)
    outcome = {"code": 0}

    def go():
        from vlseg.config import load_config
        from vlseg.data.manifest import read_manifest
        from vlseg.data.preprocess import default_cache_dir, preprocess_corpus, verify_corpus
        from vlseg.errors import VlsegError

        cfg = load_config(args.config, args.overrides)
        data = cfg["data"]
        settings = {"ct_window": list(data["ct_window"]), "target_spacing": data["target_spacing"],
                    "spacing_per_dataset": dict(data.get("spacing_per_dataset") or {})}
        cache = Path(args.cache or data.get("cache") or default_cache_dir(args.manifest))
        workers = args.workers if args.workers is not None else int(data.get("preprocess_workers", 2))
        if workers < 0:
            raise VlsegError(f"--workers: must be 0 or more, got {workers}")
        cases = read_manifest(args.manifest, split=args.split)
        if not cases:
            raise VlsegError(f"{args.manifest}: no cases" + (f" in split {args.split!r}" if args.split else ""))
        progress = not args.no_progress
        t0 = time.perf_counter()

        if args.verify:
            problems = verify_corpus(cases, cache, settings, workers=workers, progress=progress)
            for p in problems:
                print(f"{p['file']}: {p['problem']} (case {p['case']})")
            bad = len({p["case"] for p in problems})
            print(f"verified {len(cases)} case(s) against {cache}: {len(problems)} problem(s) in {bad} case(s)",
                  file=sys.stderr)
            outcome["code"] = 1 if problems else 0
            return

        report = preprocess_corpus(cases, cache, settings, workers=workers, progress=progress)
        for e in report["errors"]:
            print(f"error: {e['file']}: {e['problem']} (case {e['case']})", file=sys.stderr)
        print(f"{len(report['written'])} written, {len(report['skipped'])} up to date, {len(report['errors'])} failed "
              f"in {time.perf_counter() - t0:.1f} s; cache {cache} (report.json inside)")
        outcome["code"] = 1 if report["errors"] else 0

    from vlseg.cli import run_guarded

    return run_guarded(go) or outcome["code"]


if __name__ == "__main__":
    raise SystemExit(main())
