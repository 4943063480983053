"""Absent targets without a validation split: four presence rules fitted on crops of half the training scans and
compared on the same held-out targets.

    python benchmarks/presence_calibration.py --checkpoint checkpoints/real --manifest data/real/manifest.jsonl \\
        --out benchmarks/results/presence_calibration [--crops-per-case 8] [--seed 0] [--swap]

The training cases that annotate a class of the model are sorted by id and dealt alternately into a fit half and a
held-out half (``--swap`` exchanges them).  Targets are manufactured from crops of each (``vlseg.infer.calibrate``:
a class with no voxel in the crop is absent, one with at least min(5 ml, half its volume) is present).  The rules
(``vlseg.infer.presence``) are fitted on the fit half's targets only; the held-out targets are the crops of the other
half plus the whole scans of the test split (present or absent by their labels).  Per rule: AUROC of its score with a
95% interval (``vlseg.evaluate.uncertainty.bootstrap``, cases as clusters: a scan's crops stay together), and at its
operating point the false-positive rate on absent targets and the miss rate on present ones, with counts.  Writes
``OUT.md`` and ``OUT.json`` (the table, the fitted rules, every target's features).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def split_cases(cases: list, swap: bool = False) -> tuple[list, list]:
    """Sorted by case id, dealt alternately: (fit, held out)."""
    ordered = sorted(cases, key=lambda c: c.case_id)
    fit, held = ordered[0::2], ordered[1::2]
    return (held, fit) if swap else (fit, held)


def score_rule(rule, targets: list) -> dict:
    from vlseg.evaluate.uncertainty import bootstrap
    from vlseg.infer.presence import auroc

    rows = [{"case_id": t.case_id, "score": rule.score(t), "present": t.present} for t in targets]
    found = bootstrap(rows, lambda rs: auroc([r["score"] for r in rs], [r["present"] for r in rs]))
    absent = [t for t in targets if not t.present]
    present = [t for t in targets if t.present]
    return {"auroc": found["estimate"], "interval": found["interval"], "cases": found["cases"],
            "false_positives": sum(rule.present(t) for t in absent), "absent": len(absent),
            "misses": sum(not rule.present(t) for t in present), "present": len(present)}


def markdown(title: str, rows: list[dict]) -> str:
    def rate(k: int, n: int) -> str:
        return f"{k / n:.2f} ({k}/{n})" if n else "–"

    lines = [f"**{title}**", "",
             "| rule | operating point | AUROC [95% CI] | FP rate on absent | miss rate on present |",
             "|---|---|---|---|---|"]
    for r in rows:
        ci = f" [{r['interval'][0]:.2f}, {r['interval'][1]:.2f}]" if r["interval"] else ""
        value = "–" if r["auroc"] is None else f"{r['auroc']:.3f}{ci}"
        lines.append(f"| {r['rule']} | {r['operating_point']} | {value} | {rate(r['false_positives'], r['absent'])} "
                     f"| {rate(r['misses'], r['present'])} |")
    return "\n".join(lines)


def fit_rules(fit_targets: list, shipped: float) -> list:
    from vlseg.infer.presence import CalibratedPresence, PresenceHead, StatisticalTest, VolumeRule

    calibrated = CalibratedPresence.fit(fit_targets)
    volume = VolumeRule.fit(fit_targets)
    test = StatisticalTest.fit(fit_targets)
    return [("presence head as shipped", f"p ≥ {shipped:.2f} (config)", PresenceHead(shipped)),
            ("presence head calibrated", f"temperature a={calibrated.a:.2f}, b={calibrated.b:.2f}; p ≥ "
             f"{calibrated.global_threshold:.2f}, {len(calibrated.class_thresholds)} class thresholds", calibrated),
            ("predicted-volume rule", f"unvetoed mask ≥ {volume.threshold:.1f} ml (fitted)", volume),
            ("statistical test", f"Fisher p ≥ {test.threshold:.2f}", test)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="checkpoints/real")
    parser.add_argument("--manifest", default="data/real/manifest.jsonl")
    parser.add_argument("--out", default="benchmarks/results/presence_calibration")
    parser.add_argument("--crops-per-case", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--swap", action="store_true", help="fit on the other half")
    args = parser.parse_args(argv)

    from vlseg.infer.calibrate import _asked, scan_targets, training_crop_targets
    from vlseg.infer.segmenter import Segmenter
    from vlseg.prepare.manifest import read_manifest

    started = time.perf_counter()
    seg = Segmenter.from_pretrained(args.checkpoint, calibrated=False)
    train = [c for c in read_manifest(args.manifest, split="train") if _asked(seg, c)]
    fit_cases, held_cases = split_cases(train, args.swap)
    fit_targets = training_crop_targets(seg, fit_cases, args.crops_per_case, args.seed)
    held_crops = training_crop_targets(seg, held_cases, args.crops_per_case, args.seed)
    test_targets = [t for c in read_manifest(args.manifest, split="test") for t in scan_targets(seg, c)]
    rules = fit_rules(fit_targets, seg.presence_threshold)
    tables = {}
    for subset, targets in (("held-out crops + test split", held_crops + test_targets),
                            ("test split only", test_targets)):
        tables[subset] = [{"rule": name, "operating_point": point, **score_rule(rule, targets)}
                          for name, point, rule in rules]
    seconds = time.perf_counter() - started
    header = (f"Checkpoint `{args.checkpoint}`; fit on {len(fit_targets)} targets from {args.crops_per_case} crops "
              f"each of {', '.join(c.case_id for c in fit_cases)}; held out: {len(held_crops)} crop targets of "
              f"{', '.join(c.case_id for c in held_cases)} and {len(test_targets)} targets of the test split's whole "
              f"scans. Seed {args.seed}; {seconds / 60:.1f} min.")
    text = "\n\n".join([header] + [markdown(f"Held out: {k}", v) for k, v in tables.items()]) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({
        "checkpoint": args.checkpoint, "manifest": args.manifest, "crops_per_case": args.crops_per_case,
        "seed": args.seed, "fit_cases": [c.case_id for c in fit_cases], "held_cases": [c.case_id for c in held_cases],
        "seconds": seconds, "tables": tables, "rules": {name: rule.to_json() for name, _, rule in rules},
        "targets": {"fit": [t.as_dict() for t in fit_targets], "held_crops": [t.as_dict() for t in held_crops],
                    "test": [t.as_dict() for t in test_targets]}}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
