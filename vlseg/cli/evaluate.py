"""``vlseg evaluate`` (also ``python evaluate.py``): score a checkpoint on a manifest split."""

from __future__ import annotations

import argparse
from pathlib import Path

from vlseg.errors import run_guarded
from vlseg.evaluate.evaluate import evaluate
from vlseg.evaluate.report import format_table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="evaluate.py", description="Score a checkpoint on a manifest split.")
    parser.add_argument("--checkpoint", required=True, help="run or checkpoint directory")
    parser.add_argument("--manifest", help="manifest JSONL (default: the one the model was trained on)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", help="output folder (default: <run>/eval-<split>)")
    parser.add_argument("--nsd-tolerance", type=float, default=2.0, help="NSD tolerance in mm")
    parser.add_argument("--all-classes", action="store_true",
                        help="also score annotated classes the model was not trained on (asked by name)")
    parser.add_argument("--retrieval", action="store_true",
                        help="also score how well the text encoder alone maps held-out paraphrases onto their classes")
    parser.add_argument("--device", default=None)
    parser.add_argument("--spacing", help="working spacing in mm, one number or x,y,z (default: the checkpoint's)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    def go():
        from vlseg.checkpoint import resolve_checkpoint
        from vlseg.infer.segmenter import Segmenter

        ckpt = resolve_checkpoint(args.checkpoint)
        segmenter = Segmenter.from_pretrained(ckpt, device=args.device, spacing=args.spacing)
        manifest = args.manifest or segmenter.config["data"]["manifest"]
        out = Path(args.out) if args.out else ckpt.parent / f"eval-{args.split}"
        summary = evaluate(segmenter, manifest, args.split, out, args.nsd_tolerance,
                           classes="all" if args.all_classes else None, progress=not args.no_progress,
                           retrieval=args.retrieval)
        print(format_table(summary))
        print(f"per-case scores: {out / 'per_case.csv'}\nsummary: {out / 'summary.json'}")

    return run_guarded(go)
