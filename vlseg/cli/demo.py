"""The main job, end to end: build the corpus, preprocess it, train, evaluate on held-out cases, answer
"liver tumor" and "liver" on one of them and say where everything went.

    vlseg demo                 real scans from public pip packages (vlseg prepare samples), patient B held out
    vlseg demo --phantoms      the synthetic phantom corpus (no download at all)
    vlseg demo [key=value ...] any config override, e.g. train.steps=200
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from vlseg.errors import run_guarded


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlseg demo", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--phantoms", action="store_true", help="use the phantom corpus instead of real scans")
    parser.add_argument("--config", help="experiment YAML (default: configs/real.yaml, or configs/phantom.yaml)")
    parser.add_argument("--data", help="where the corpus is built (default: data/real or data/phantoms)")
    parser.add_argument("--downloads", default="data/downloads", help="where package files are kept (real scans)")
    parser.add_argument("--out", default="outputs/demo", help="where the prompted masks are written")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.steps=100")
    return parser


def corpus(args) -> Path:
    """Step 1: the corpus' manifest, built when it is not there yet (the real corpus also when an older vlseg built
    it; a corpus in a folder named with --data is used as it is)."""
    from vlseg.prepare.samples import build, is_current

    data = Path(args.data or ("data/phantoms" if args.phantoms else "data/real"))
    manifest = data / "manifest.jsonl"
    if manifest.is_file() and (args.phantoms or args.data or is_current(data)):
        print(f"[1/5] corpus found: {manifest}")
    elif args.phantoms:
        from vlseg.prepare.phantoms import generate_corpus

        print(f"[1/5] generating the phantom corpus in {data}")
        generate_corpus(data)
    else:
        what = "rebuilding the real-scan corpus (built by an older vlseg)" if manifest.is_file() else \
            "building the real-scan corpus"
        print(f"[1/5] {what} in {data} from public pip packages")
        build(data, Path(args.downloads))
    return manifest


def ask(segmenter, manifest: Path, out: Path) -> None:
    """Step 5: "liver tumor" and "liver" on a test case with a tumour and on one without, and where the files went."""
    from vlseg.prepare.manifest import read_manifest

    test_cases = read_manifest(manifest, split="test")
    asked = [c for c in test_cases if c.present.get("liver tumor")][:1] or test_cases[:1]
    asked += [c for c in test_cases if "liver tumor" not in c.classes and c.present.get("liver")][:1]
    for case in asked:
        print(f"[5/5] asking for 'liver tumor' and 'liver' on {case.case_id} ({case.image.name})")
        result = segmenter.segment(case.image, ["liver tumor", "liver"], modality=case.modality)
        files = result.save(out / case.case_id)
        for r in result.results:
            verdict = ("judged absent: empty mask" if r.presence_probability < segmenter.presence_threshold
                       else "present" if r.present else "present, but no voxel above the mask threshold")
            print(f"  {r.prompt!r}: presence {r.presence_probability:.2f} ({verdict}), {r.volume_ml:.1f} ml")
        print(f"  masks:   {files['liver tumor']}\n           {files['liver']}\n  report:  {files['report']}\n"
              f"  overlay: {files['overlay']}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def go():
        from vlseg.config import DataSection, TrainSection, load_config
        from vlseg.evaluate.evaluate import evaluate
        from vlseg.evaluate.report import format_table
        from vlseg.infer.segmenter import Segmenter
        from vlseg.prepare.cache.keys import cache_location
        from vlseg.train.corpus import load_training_cases
        from vlseg.train.loop import train

        t0 = time.perf_counter()
        manifest = corpus(args)
        config = args.config or ("phantom" if args.phantoms else "real")  # shipped configs (vlseg.config.config_path)
        cfg = load_config(config, [f"data.manifest={manifest}", *args.overrides])
        data = DataSection.from_config(cfg)
        print(f"[2/5] preprocessing the training cases into {cache_location(data)}")
        t_prep = time.perf_counter()
        # the same call training makes (one-line error for a case that fails); training then finds the cache current
        cases = load_training_cases(data, data.train_split)
        print(f"      {len(cases)} case(s) ready ({time.perf_counter() - t_prep:.0f} s)")
        print(f"[3/5] training {cfg['run_name']} for {TrainSection.from_config(cfg).steps} steps")
        t_train = time.perf_counter()
        run_dir = train(cfg, overwrite=True)
        t_trained = time.perf_counter()
        print("[4/5] evaluating on the held-out test cases")
        segmenter = Segmenter.from_pretrained(run_dir)
        print(format_table(evaluate(segmenter, manifest, "test", run_dir / "eval-test")))
        ask(segmenter, manifest, Path(args.out))
        print(f"scores:  {run_dir / 'eval-test' / 'summary.json'} (per case: per_case.csv)\n"
              f"model:   {run_dir}  (vlseg predict -m {run_dir} -i scan.nii.gz -p 'liver tumor' -o out/)\n"
              f"time: corpus {t_prep - t0:.0f} s, preprocessing {t_train - t_prep:.0f} s, "
              f"training {t_trained - t_train:.0f} s, total {time.perf_counter() - t0:.0f} s")

    return run_guarded(go)
