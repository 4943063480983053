"""The first training steps of a config, compared value for value with another run's: a refactor that claims to change
no numerics must reproduce a run made before it exactly.

    python benchmarks/loss_trace.py --config phantom --manifest data/phantoms/manifest.jsonl --steps 20 \\
        --compare OLD_RUN_DIR [--out DIR]

Trains ``--steps`` steps in one thread (``train.threads=1``: the same operation order every time), then prints, step
by step, loss, bce, dice, presence, grad_norm and lr next to the same step of ``OLD_RUN_DIR/metrics.jsonl`` (written
by the code before the change, with the same command) and whether they are equal to the last bit.  Exit status 1
when any differs.  Bit-identity holds on one machine and build: bf16 on another CPU gives other numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

KEYS = ("loss", "bce", "dice", "presence", "grad_norm", "lr")


def read_trace(run_dir: Path, steps: int) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["step"] <= steps]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="phantom")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compare", required=True, help="a run directory written before the change")
    parser.add_argument("--out", help="where the new run goes (default: a temporary folder)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    from vlseg.config import load_config
    from vlseg.train.loop import train

    out = Path(args.out or tempfile.mkdtemp(prefix="vlseg-trace-"))
    cfg = load_config(args.config, [f"output_root={out}", f"data.manifest={args.manifest}",
                                    f"train.steps={args.steps}", "train.log_every=1",
                                    f"train.checkpoint_every={args.steps}", "train.threads=1", *args.overrides])
    new = read_trace(train(cfg, overwrite=True, progress=False), args.steps)
    old = read_trace(Path(args.compare), args.steps)
    if len(old) != len(new):
        print(f"{args.compare}: {len(old)} steps recorded, {len(new)} trained", file=sys.stderr)
        return 1
    differ = 0
    print(f"{'step':>4} " + " ".join(f"{k:>22}" for k in KEYS) + "  equal")
    for a, b in zip(old, new):
        same = all(a[k] == b[k] for k in KEYS)
        differ += not same
        print(f"{b['step']:>4} " + " ".join(f"{b[k]:>22.17g}" for k in KEYS) + f"  {'yes' if same else 'NO'}")
        if not same:
            print("     " + " ".join(f"{a[k]:>22.17g}" for k in KEYS) + "  (before)")
    print(f"{len(new) - differ} of {len(new)} steps bit-identical to {args.compare}")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
