"""``vlseg export``: a release copy of a checkpoint."""

from __future__ import annotations

import argparse

from vlseg.errors import run_guarded


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vlseg export", description=(
        "Write a release copy of a checkpoint: consolidated fp32 weights (DeepSpeed ZeRO partitions merged) and its "
        "metadata, without optimiser state. Segmenter.from_pretrained, vlseg predict and evaluate.py load it."))
    parser.add_argument("checkpoint", help="checkpoint directory, or a run directory (its newest checkpoint)")
    parser.add_argument("out", help="new directory to write")
    args = parser.parse_args(argv)

    def go():
        from vlseg.checkpoint import export_checkpoint

        print(f"exported to {export_checkpoint(args.checkpoint, args.out)}")

    return run_guarded(go)
