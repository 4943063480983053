"""How evaluation summaries read on a terminal: one column per summarised metric (``vlseg.evaluate.metrics``)."""

from __future__ import annotations

from vlseg.evaluate.metrics import Metric, metrics

WIDTH = {"mean_std": 14, "mean": 10, "count": 4}  # a column's width by how its metric is summarised


def _cell(metric: Metric, group: dict) -> str:
    values = [group[key] for key in metric.summary_keys]
    if metric.summary == "mean_std":
        return f"{values[0]:>8{metric.fmt}}±{values[1]:<5{metric.fmt}}"
    if metric.summary == "mean":
        return f"{values[0]:>10{metric.fmt}}"
    return f"{values[0]:>4}"  # a count


def _table(groups: list[dict]) -> list[str]:
    shown = [m for m in metrics() if m.summary]
    lines = [f"{'class':<24}{'n':>4}" + "".join(f"{m.heading:>{WIDTH[m.summary]}}" for m in shown)]
    for group in groups:
        lines.append(f"{group['class']:<24}{group['n']:>4}" + "".join(_cell(m, group) for m in shown))
    return lines


def format_table(summary: dict) -> str:
    """An evaluation summary on a terminal: the per-class table (and the held-out paraphrases'), the absent-target
    rates, paraphrase consistency."""
    lines = _table(summary["by_class"])
    if summary.get("by_class_heldout"):
        lines += ["held-out paraphrases (never trained on):", *_table(summary["by_class_heldout"])]
    absent = summary.get("absent_targets")
    if absent:
        def pct(v):
            return "–" if v is None else f"{100 * v:.0f}%"

        head = absent["presence_head"]
        volume = ", ".join(f"≥{v['min_volume_ml']:g} ml: FP {pct(v['false_positive_rate'])} / miss "
                           f"{pct(v['miss_rate'])}" for v in absent["volume_rule"])
        lines.append(f"absent targets ({absent['absent']} asked): presence head false positives "
                     f"{pct(head['false_positive_rate'])}, misses {pct(head['miss_rate'])} of {absent['present']} "
                     f"present; volume rule {volume}")
    consistency = summary.get("paraphrase_consistency")
    if consistency and consistency["targets"]:
        lines.append(f"paraphrase consistency over {consistency['targets']} targets: median Dice across wordings "
                     f"{consistency['median_dice_across_wordings']:.3f}, median agreement with the name's mask "
                     f"{consistency['median_agreement_with_name']:.3f}")
    return "\n".join(lines)
