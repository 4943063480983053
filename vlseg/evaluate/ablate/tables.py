"""An ablation study's table: each metric declared for ablation tables (``Metric.ablation``: Dice) as mean ± std over
seeds per class, overall and on held-out paraphrases, and what each variant cost; as markdown (a table per metric, the
first with the compute), long-form CSV and a bar chart of the first metric overall."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from vlseg.evaluate.ablate.runner import is_evaluated
from vlseg.evaluate.ablate.study import Run, Study
from vlseg.evaluate.metrics import Metric, metrics


def ablated() -> list[Metric]:
    """The metrics ablation tables show, in the order they were defined; the first (Dice) leads."""
    return [m for m in metrics() if m.ablation]


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    values = [v for v in values if v is not None and v == v]
    if not values:
        return float("nan"), float("nan"), 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def _parameters(run_dir: Path) -> int | None:
    from safetensors import safe_open

    from vlseg.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(run_dir)
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as fh:
        total = 0
        for key in fh.keys():
            shape = fh.get_slice(key).get_shape()
            n = 1
            for d in shape:
                n *= d
            total += n
    return total


def _mean_over_classes(groups: list[dict], key: str) -> float | None:
    mean, _, n = _mean_std([g.get(key) for g in groups])
    return mean if n else None


def _scores(metric: Metric, summaries: list[dict]) -> dict:
    """One variant's ``metric`` over its evaluated seeds (``summaries``): per class, overall, and on held-out
    paraphrases (the mean over their classes), each as (mean, std, seeds)."""
    key = metric.summary_keys[0]  # its mean
    classes = sorted({c["class"] for s in summaries for c in s["by_class"]})
    return {
        "classes": {name: _mean_std([next((c.get(key) for c in s["by_class"] if c["class"] == name), None)
                                     for s in summaries]) for name in classes},
        "overall": _mean_std([s["overall"][0].get(key) if s["overall"] else None for s in summaries]),
        "heldout": _mean_std([_mean_over_classes(s.get("by_class_heldout") or [], key) for s in summaries]),
    }


def collect(study: Study) -> list[dict]:
    """One row per variant: ``scores`` (each ablated metric's, by name: see ``_scores``) and compute."""
    by_variant: dict[str, list[Run]] = {}
    for run in study.runs:
        by_variant.setdefault(run.variant, []).append(run)
    rows = []
    for variant, runs in by_variant.items():
        done = [r for r in runs if is_evaluated(study, r)]
        summaries = [json.loads((study.eval_dir(r) / "summary.json").read_text()) for r in done]
        infos = [json.loads((r.run_dir / "run_info.json").read_text()) for r in done
                 if (r.run_dir / "run_info.json").is_file()]
        rows.append({"variant": variant, "seeds": len(done), "of": len(runs),
                     "scores": {m.name: _scores(m, summaries) for m in ablated()},
                     "train_seconds": _mean_std([i["train_seconds"] for i in infos])[0],
                     "seconds_per_case": _mean_std([s.get("seconds_per_case") for s in summaries])[0],
                     "parameters": _parameters(done[0].run_dir) if done else None})
    return rows


def _fmt(stat: tuple[float, float, int], fmt: str) -> str:
    mean, std, n = stat
    if n == 0:
        return "–"
    return f"{mean:{fmt}}" if n == 1 else f"{mean:{fmt}} ± {std:{fmt}}"  # one seed has no spread to show


def _compute_cells(r: dict) -> list[str]:
    return ["–" if r["parameters"] is None else f"{r['parameters'] / 1e6:.3f}",
            "–" if r["train_seconds"] != r["train_seconds"] else f"{r['train_seconds']:.0f}",
            "–" if r["seconds_per_case"] != r["seconds_per_case"] else f"{r['seconds_per_case']:.1f}"]


def _markdown(rows: list[dict], metric: Metric, compute: bool) -> list[str]:
    """The markdown table of one metric, a line per variant; with ``compute``, what each cost."""
    classes = sorted({c for r in rows for c in r["scores"][metric.name]["classes"]})
    header = ["variant", "seeds", f"overall {metric.heading}", *classes, "held-out paraphrases"]
    header += ["parameters (M)", "train (s)", "eval (s/case)"] if compute else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        scores = r["scores"][metric.name]
        cells = [r["variant"], f"{r['seeds']}/{r['of']}", _fmt(scores["overall"], metric.fmt),
                 *[_fmt(scores["classes"].get(c, (0, 0, 0)), metric.fmt) for c in classes],
                 _fmt(scores["heldout"], metric.fmt), *(_compute_cells(r) if compute else [])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _write_csv(path: Path, rows: list[dict], shown: list[Metric]) -> None:
    """Long form: a line per variant and group (overall, heldout, class:<name>), each ablated metric's mean and std."""
    def stat(scores: dict, group: str) -> tuple:
        if group.startswith("class:"):
            return scores["classes"].get(group[len("class:"):], (float("nan"), float("nan"), 0))
        return scores[group]

    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["variant", "seeds", "group", *[f"{m.name}_{s}" for m in shown for s in ("mean", "std")],
                         "parameters", "train_seconds", "eval_seconds_per_case"])
        for r in rows:
            classes = sorted(r["scores"][shown[0].name]["classes"])
            for group in ["overall", "heldout", *[f"class:{c}" for c in classes]]:
                values = [v for m in shown for v in stat(r["scores"][m.name], group)[:2]]
                writer.writerow([r["variant"], r["seeds"], group, *values, r["parameters"], r["train_seconds"],
                                 r["seconds_per_case"]])


def write_table(study: Study, rows: list[dict], command: str) -> list[Path]:
    """The study's markdown, CSV and bar chart in ``study.table``; returns their paths."""
    study.table.mkdir(parents=True, exist_ok=True)
    shown = ablated()
    lead = shown[0]
    md = [f"# {study.name}", "", f"{lead.heading} on split `{study.split}`, mean ± std over seeds. Regenerate with:",
          "", f"    {command}", "", *_markdown(rows, lead, compute=True)]
    for metric in shown[1:]:
        md += ["", f"{metric.heading} on split `{study.split}`, mean ± std over seeds:", "",
               *_markdown(rows, metric, compute=False)]
    written = [study.table / f"{study.name}.{ext}" for ext in ("md", "csv", "png")]
    written[0].write_text("\n".join(md) + "\n")
    _write_csv(written[1], rows, shown)
    bar_chart(rows, written[2], f"{study.name}: overall {lead.heading} (mean ± std over seeds)", lead)
    return written


def bar_chart(rows: list[dict], path: Path, title: str, metric: Metric) -> None:
    """``metric`` (Dice) overall per variant, with its spread over seeds, on a 0-1 axis. Drawn with Pillow (already a
    dependency for the overlays) rather than adding matplotlib for one chart."""
    from PIL import Image, ImageDraw

    width, height, left, bottom, top = 120 + 110 * len(rows), 420, 60, 90, 40
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 10), title, fill="black")
    plot_h = height - bottom - top
    y = lambda v: top + plot_h * (1 - max(0.0, min(1.0, v)))  # noqa: E731
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        draw.line([(left - 4, y(tick)), (width - 20, y(tick))], fill=(225, 225, 225))
        draw.text((8, y(tick) - 6), f"{tick:.2f}", fill="black")
    for i, r in enumerate(rows):
        mean, std, n = r["scores"][metric.name]["overall"]
        x0 = left + 20 + 110 * i
        if n:
            draw.rectangle([x0, y(mean), x0 + 60, y(0)], fill=(70, 120, 190))
            draw.line([(x0 + 30, y(mean - std)), (x0 + 30, y(mean + std))], fill="black", width=2)
            for v in (mean - std, mean + std):
                draw.line([(x0 + 22, y(v)), (x0 + 38, y(v))], fill="black", width=2)
            draw.text((x0 + 8, y(mean) - 14), f"{mean:{metric.fmt}}", fill="black")
        label = r["variant"] if len(r["variant"]) <= 16 else r["variant"][:15] + "…"
        draw.text((x0 - 4, height - bottom + 8), label, fill="black")
        draw.text((x0 - 4, height - bottom + 24), f"n={n}", fill=(90, 90, 90))
    img.save(path)
