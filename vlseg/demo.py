"""The main job, end to end on phantoms: generate the corpus, train, evaluate on held-out cases, answer
"liver tumor" on one of them and say where everything went.  ``vlseg demo [key=value ...]``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    from vlseg.cli import run_guarded

    parser = argparse.ArgumentParser(prog="vlseg demo", description=__doc__)
    parser.add_argument("--config", default=str(REPO / "configs" / "phantom.yaml"))
    parser.add_argument("--data", default="data/phantoms", help="where the phantom corpus is written")
    parser.add_argument("--out", default="outputs/demo", help="where the 'liver tumor' prediction is written")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.steps=100")
    args = parser.parse_args(argv)

    def go():
        from data_prep.phantoms import generate_corpus
        from vlseg.config import load_config
        from vlseg.data.manifest import read_manifest
        from vlseg.evaluate import evaluate, format_table
        from vlseg.inference import Segmenter
        from vlseg.train import train

        t0 = time.perf_counter()
        manifest = Path(args.data) / "manifest.jsonl"
        if not manifest.is_file():
            print(f"[1/4] generating the phantom corpus in {args.data}")
            generate_corpus(args.data)
        else:
            print(f"[1/4] phantom corpus found: {manifest}")
        cfg = load_config(args.config if Path(args.config).is_file() else None,
                          [f"data.manifest={manifest}", *args.overrides])
        print(f"[2/4] training {cfg['run_name']} for {cfg['train']['steps']} steps")
        run_dir = train(cfg, overwrite=True)
        t_train = time.perf_counter()
        print("[3/4] evaluating on the held-out test phantoms")
        segmenter = Segmenter.from_pretrained(run_dir)
        summary = evaluate(segmenter, manifest, "test", run_dir / "eval-test")
        print(format_table(summary))
        test_cases = read_manifest(manifest, split="test")
        case = next((c for c in test_cases if c.present.get("liver tumor")), test_cases[0])
        print(f"[4/4] asking for 'liver tumor' and 'liver' on {case.case_id}")
        result = segmenter.segment(case.image, ["liver tumor", "liver"], modality=case.modality)
        files = result.save(Path(args.out) / case.case_id)
        for r in result.results:
            print(f"  {r.prompt!r}: presence {r.presence_probability:.2f}, {r.volume_ml:.1f} ml")
        print(f"masks:   {files['liver tumor']}\n         {files['liver']}\nreport:  {files['report']}\n"
              f"overlay: {files['overlay']}\nscores:  {run_dir / 'eval-test' / 'summary.json'}\n"
              f"model:   {run_dir}  (vlseg predict -m {run_dir} -i scan.nii.gz -p 'liver tumor' -o out/)\n"
              f"time: training {t_train - t0:.0f} s, total {time.perf_counter() - t0:.0f} s")

    return run_guarded(go)
