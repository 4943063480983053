"""``vlseg train`` (also ``python train.py``): train, or resume, a model from a config."""

from __future__ import annotations

import argparse

from vlseg.checkpoint import read_checkpoint
from vlseg.config import apply_overrides, load_config
from vlseg.errors import run_guarded
from vlseg.train.distributed import exit_after_finish, launched_world
from vlseg.train.loop import train
from vlseg.train.preemption import PREEMPTED_EXIT, Preempted


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py", description="Train a text-prompted 3D segmenter.")
    parser.add_argument("--config", help="experiment YAML (configs/...); defaults apply where it is silent")
    parser.add_argument("--resume", help="run or checkpoint directory to continue from (its config is reused); "
                                         "'auto': this run's newest checkpoint if there is one, else start afresh")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    parser.add_argument("--no-progress", action="store_true")
    # The `deepspeed` launcher passes --local_rank to the script; the rank is read from the environment instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.steps=200")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    outcome = {}

    def go():
        if args.resume and args.resume != "auto":
            _, meta, _ = read_checkpoint(args.resume)
            cfg = apply_overrides(meta["config"], args.overrides)
        else:
            cfg = load_config(args.config, args.overrides)
        try:
            run_dir = train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
        except Preempted as stop:
            print(stop, flush=True)
            outcome["code"] = PREEMPTED_EXIT
            return
        if launched_world()[1] == 0:
            print(f"run saved in {run_dir}")

    code = run_guarded(go)
    code = outcome.get("code", code)
    if code in (0, PREEMPTED_EXIT):  # train() returned or stopped after finish(): every file is written and closed
        exit_after_finish(code)
    return code
