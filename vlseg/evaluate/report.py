"""How evaluation summaries read on a terminal."""

from __future__ import annotations


def format_table(summary: dict) -> str:
    def table(groups: list[dict]) -> list[str]:
        lines = [f"{'class':<24}{'n':>4}{'Dice':>14}{'NSD':>14}{'HD95 mm':>10}{'FP':>4}{'FN':>4}"]
        for row in groups:
            lines.append(f"{row['class']:<24}{row['n']:>4}{row['dice_mean']:>8.3f}±{row['dice_std']:<5.3f}"
                         f"{row['nsd_mean']:>8.3f}±{row['nsd_std']:<5.3f}{row['hd95_mean']:>10.2f}"
                         f"{row['false_positives']:>4}{row['false_negatives']:>4}")
        return lines

    lines = table(summary["by_class"])
    if summary.get("by_class_heldout"):
        lines += ["held-out paraphrases (never trained on):", *table(summary["by_class_heldout"])]
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
