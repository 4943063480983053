"""How evaluation summaries read on a terminal: one column per summarised metric (``vlseg.evaluate.metrics``), and
each figure that has a bootstrap interval (``vlseg.evaluate.uncertainty``) as ``0.823 [0.71, 0.90]``."""

from __future__ import annotations

from vlseg.evaluate.metrics import Metric, metrics
from vlseg.evaluate.uncertainty import format_estimate

WIDTH = {"mean_std": 14, "mean": 10, "count": 4}  # a column's width by how its metric is summarised


def _cell(metric: Metric, group: dict) -> str:
    values = [group[key] for key in metric.summary_keys]
    if metric.summary == "mean_std":
        return f"{values[0]:>8{metric.fmt}}±{values[1]:<5{metric.fmt}}"
    if metric.summary == "mean":
        return f"{values[0]:>10{metric.fmt}}"
    return f"{values[0]:>4}"  # a count


def _table(groups: list[dict], intervals: dict | None = None) -> list[str]:
    """A line per class; with ``intervals`` (class → bootstrap result), the Dice interval in a last column."""
    shown = [m for m in metrics() if m.summary]
    lines = [f"{'class':<24}{'n':>4}" + "".join(f"{m.heading:>{WIDTH[m.summary]}}" for m in shown)
             + ("  Dice [95% interval]" if intervals else "")]
    for group in groups:
        lines.append(f"{group['class']:<24}{group['n']:>4}" + "".join(_cell(m, group) for m in shown)
                     + (f"  {format_estimate(intervals.get(group['class']))}" if intervals else ""))
    return lines


def _pct(v) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def _rate(rates: dict, intervals: dict | None, key: str) -> str:
    """A presence-head rate, with its interval where the summary has one."""
    return format_estimate(intervals[key], percent=True) if intervals else _pct(rates[key])


def _absent_lines(summary: dict, intervals: dict) -> list[str]:
    lines = []
    absent = summary.get("absent_targets")
    if absent:
        head, found = absent["presence_head"], intervals.get("absent_targets")
        volume = ", ".join(f"≥{v['min_volume_ml']:g} ml: FP {_pct(v['false_positive_rate'])} / miss "
                           f"{_pct(v['miss_rate'])}" for v in absent["volume_rule"])
        lines.append(f"absent targets ({absent['absent']} asked): presence head false positives "
                     f"{_rate(head, found, 'false_positive_rate')}, misses {_rate(head, found, 'miss_rate')} of "
                     f"{absent['present']} present; volume rule {volume}")
    absent = summary.get("absent_targets_heldout")
    if absent:
        head, found = absent["presence_head"], intervals.get("absent_targets_heldout")
        lines.append(f"asked by held-out paraphrases ({absent['absent']} absent): presence head false positives "
                     f"{_rate(head, found, 'false_positive_rate')}, misses {_rate(head, found, 'miss_rate')} of "
                     f"{absent['present']} present")
    return lines


def _paraphrase_lines(summary: dict, intervals: dict) -> list[str]:
    lines = []
    consistency = summary.get("paraphrase_consistency")
    if consistency and consistency["targets"]:
        found = intervals.get("paraphrase_consistency") or {}

        def show(key: str) -> str:
            return format_estimate(found[key]) if key in found else f"{consistency[key]:.3f}"

        lines.append(f"paraphrase consistency over {consistency['targets']} targets: median Dice across wordings "
                     f"{show('median_dice_across_wordings')}, median agreement with the name's mask "
                     f"{show('median_agreement_with_name')}")
    ratio = summary.get("heldout_to_name_dice")
    if ratio and ratio["estimate"] is not None:
        lines.append(f"held-out paraphrase Dice / name Dice over {ratio['rows']} targets: {format_estimate(ratio)} "
                     f"({format_estimate(ratio['heldout_dice'])} / {format_estimate(ratio['name_dice'])})")
    found = summary.get("retrieval")
    if found and found.get("top1") is not None:
        interval = found.get("top1_interval")
        top1 = format_estimate({"estimate": found["top1"], "interval": interval})
        lines.append(f"paraphrase → class retrieval by the text encoder ({found['queries']} queries): top-1 {top1}, "
                     f"top-5 {found['top5']:.3f}")
    return lines


def format_table(summary: dict) -> str:
    """An evaluation summary on a terminal: the per-class table (and the held-out paraphrases'), overall Dice, the
    absent-target rates, paraphrase consistency and retrieval; figures with a 95% bootstrap interval (cases, then
    prompts within each) show it, and a summary of one case says the interval covers its prompts only."""
    intervals = summary.get("intervals") or {}
    dice = intervals.get("dice") or {}
    lines = _table(summary["by_class"], dice.get("by_class"))
    if summary.get("by_class_heldout"):
        lines += ["held-out paraphrases (never trained on):",
                  *_table(summary["by_class_heldout"], dice.get("by_class_heldout"))]
    if dice.get("overall"):
        overall = dice["overall"]
        heldout = (f"; on held-out paraphrases {format_estimate(dice['overall_heldout'])}"
                   if dice.get("overall_heldout") else "")
        lines.append(f"overall Dice {format_estimate(overall)} over {overall['cases']} cases, {overall['rows']} "
                     f"prompts{heldout} (95% intervals: cases, then prompts within each, resampled)")
    lines += _absent_lines(summary, intervals) + _paraphrase_lines(summary, intervals)
    if intervals.get("note"):
        lines.append(f"({intervals['note']})")
    return "\n".join(lines)
