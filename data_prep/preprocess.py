"""Preprocess a corpus into the memory-mapped cache training reads crops from, or verify it.

    python -m data_prep.preprocess --manifest data/real/manifest.jsonl [--config configs/real.yaml] [key=value ...]
    python -m data_prep.preprocess --manifest data/real/manifest.jsonl --verify

The settings (CT window, target spacing, per-dataset spacing) come from the experiment config's ``data`` section, so
the cache matches what ``train.py`` with that config expects (training also brings the cache up to date itself).
Up-to-date cases are skipped; a case whose sources or settings changed is rewritten.  A case that fails is reported
with its file and problem, the others are still cached, and the command exits 1 at the end (report:
``<cache>/report.json``).  ``--verify`` checks every case — raw files readable and finite, label on the image grid,
the manifest's presence flags and boxes against the label, the cache entry present, up to date and readable — and
prints every problem before anything is trained (exit 1 if any).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    from vlseg.cli import run_guarded

    parser = argparse.ArgumentParser(prog="python -m data_prep.preprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--config", help="experiment YAML whose data section sets the preprocessing")
    parser.add_argument("--cache", help="cache folder (default: data.cache, else <manifest folder>/cache)")
    parser.add_argument("--split", help="only this split (default: every case of the manifest)")
    parser.add_argument("--workers", type=int, help="processes (default: data.preprocess_workers)")
    parser.add_argument("--verify", action="store_true", help="check every case and the cache; write nothing")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.target_spacing=auto")
    args = parser.parse_args(argv)
    status = {"code": 0}

    def go():
        from vlseg.config import load_config
        from vlseg.data.manifest import read_manifest
        from vlseg.data.preprocess import preprocess_corpus, verify_corpus
        from vlseg.train import cache_dir, preprocess_settings

        cfg = load_config(args.config, [f"data.manifest={args.manifest}", *args.overrides])
        if args.cache:
            cfg["data"]["cache"] = args.cache
        cases = read_manifest(args.manifest, split=args.split)
        cache = cache_dir(cfg)
        workers = int(args.workers if args.workers is not None else cfg["data"]["preprocess_workers"])
        settings = preprocess_settings(cfg)
        if args.verify:
            problems = verify_corpus(cases, cache, settings, workers=workers, progress=not args.no_progress)
            for p in problems:
                print(f"problem: {p['file']}: {p['problem']} (case {p['case']})", file=sys.stderr)
            print(f"verified {len(cases)} case(s): {len(problems)} problem(s)")
            status["code"] = 1 if problems else 0
            return
        report = preprocess_corpus(cases, cache, settings, workers=workers, progress=not args.no_progress)
        for e in report["errors"]:
            print(f"error: {e['file']}: {e['problem']} (case {e['case']})", file=sys.stderr)
        print(f"{len(report['written'])} written, {len(report['skipped'])} up to date, {len(report['errors'])} failed"
              f" — cache: {cache} (report.json inside)")
        status["code"] = 1 if report["errors"] else 0

    code = run_guarded(go)
    return code or status["code"]


if __name__ == "__main__":
    raise SystemExit(main())
