"""An ablation study's table: each metric declared for ablation tables (``Metric.ablation``: Dice) as mean ± std over
seeds per class, overall and on held-out paraphrases, and what each variant cost; as markdown (a table per metric, the
first with the compute), long-form CSV and a bar chart of the first metric overall.  Where the evaluations asked
held-out paraphrases, a second table (and CSV) on prompting: Dice by name and by paraphrase and their ratio, the
presence head's absent-target false positives and misses both ways, and the text encoder's paraphrase retrieval.

Two uncertainties are shown, because they answer different questions.  Mean ± std over seeds is how much a variant's
figure moves when it is trained again.  The 95% bootstrap interval beside it (``vlseg.evaluate.uncertainty``) is how
much it would move on other patients and prompts: the per_case.csv rows of all evaluated seeds of a variant are
pooled, and the clusters resampled are the cases, each holding its rows from every seed (then those rows are
resampled within it).  The same patient evaluated under three seeds is one patient, not three: taking (seed, case) as
the cluster would count it three times and narrow the interval by about √seeds for nothing.  A table resting on one
case or one seed says so in a footnote."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from vlseg.evaluate.ablate.runner import is_evaluated
from vlseg.evaluate.ablate.study import Run, Study
from vlseg.evaluate.evaluate import heldout_to_name_dice, mean_intervals, presence_intervals, read_rows
from vlseg.evaluate.metrics import Metric, metrics
from vlseg.evaluate.uncertainty import ONE_CASE, bootstrap, format_estimate, mean_of_means

CLUSTER = "case_id"  # a case's rows of every seed resample together (the module docstring says why)


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


def _intervals(metric: Metric, named: list[dict], paraphrased: list[dict]) -> dict:
    """The bootstrap intervals of ``_scores``'s cells from a variant's pooled rows: per class, overall, and on held-out
    paraphrases (the mean over classes of each class's mean, as ``_scores`` takes it)."""
    by_name = mean_intervals(named, metric.name, CLUSTER)
    codes = {c: float(i) for i, c in enumerate(sorted({r["class"] for r in paraphrased}))}
    return {"classes": by_name["by_class"], "overall": by_name["overall"],
            "heldout": bootstrap(paraphrased, mean_of_means(metric.name, lambda r: codes[r["class"]]),
                                 cluster=CLUSTER)}


def _retrieval(summaries: list[dict], key: str) -> dict | None:
    """Retrieval top-1 or top-5 (``key``) over the seeds whose summaries have it: one seed's own interval (over
    queries); over several seeds, their mean and the envelope of their intervals (the queries' hits are not kept)."""
    found = [s["retrieval"] for s in summaries if s.get("retrieval") and s["retrieval"].get(key) is not None]
    if not found:
        return None
    intervals = [f.get(f"{key}_interval") for f in found]
    envelope = ([min(i[0] for i in intervals), max(i[1] for i in intervals)] if all(intervals) else None)
    return {"estimate": statistics.fmean(f[key] for f in found), "interval": envelope, "seeds": len(found),
            "queries": found[0].get("queries")}


def _prompting(named: list[dict], paraphrased: list[dict], summaries: list[dict]) -> dict:
    """How a variant does when asked by name against by paraphrase, from its pooled rows: each a bootstrap result."""
    ratio = heldout_to_name_dice(named + paraphrased, cluster=CLUSTER)
    by_name, heldout = presence_intervals(named, CLUSTER), presence_intervals(paraphrased, CLUSTER)
    return {"name_dice": ratio.pop("name_dice"), "heldout_dice": ratio.pop("heldout_dice"), "ratio": ratio,
            "false_positive_rate": by_name["false_positive_rate"],
            "false_positive_rate_heldout": heldout["false_positive_rate"],
            "miss_rate": by_name["miss_rate"], "miss_rate_heldout": heldout["miss_rate"],
            "retrieval_top1": _retrieval(summaries, "top1"), "retrieval_top5": _retrieval(summaries, "top5")}


def _pooled(study: Study, runs: list[Run]) -> list[dict]:
    """The per_case.csv rows of the evaluated ``runs``, each marked with its run's seed."""
    rows = []
    for run in runs:
        path = study.eval_dir(run) / "per_case.csv"
        rows += [{**row, "seed": run.seed} for row in (read_rows(path) if path.is_file() else [])]
    return rows


def collect(study: Study) -> list[dict]:
    """One row per variant: ``scores`` (each ablated metric's, by name: see ``_scores``), their bootstrap
    ``intervals`` from the pooled rows, ``cases``, ``prompting`` (where paraphrases were asked) and compute."""
    by_variant: dict[str, list[Run]] = {}
    for run in study.runs:
        by_variant.setdefault(run.variant, []).append(run)
    rows = []
    for variant, runs in by_variant.items():
        done = [r for r in runs if is_evaluated(study, r)]
        summaries = [json.loads((study.eval_dir(r) / "summary.json").read_text()) for r in done]
        infos = [json.loads((r.run_dir / "run_info.json").read_text()) for r in done
                 if (r.run_dir / "run_info.json").is_file()]
        pooled = _pooled(study, done)
        named = [r for r in pooled if r["wording"] == "name"]
        paraphrased = [r for r in pooled if r["wording"] == "heldout"]
        rows.append({"variant": variant, "seeds": len(done), "of": len(runs),
                     "cases": len({r["case_id"] for r in named}),
                     "scores": {m.name: _scores(m, summaries) for m in ablated()},
                     "intervals": {m.name: _intervals(m, named, paraphrased) for m in ablated()},
                     "prompting": _prompting(named, paraphrased, summaries) if paraphrased else None,
                     "train_seconds": _mean_std([i["train_seconds"] for i in infos])[0],
                     "seconds_per_case": _mean_std([s.get("seconds_per_case") for s in summaries])[0],
                     "parameters": _parameters(done[0].run_dir) if done else None})
    return rows


def _fmt(stat: tuple[float, float, int], fmt: str) -> str:
    mean, std, n = stat
    if n == 0:
        return "–"
    return f"{mean:{fmt}}" if n == 1 else f"{mean:{fmt}} ± {std:{fmt}}"  # one seed has no spread to show


ONE_CASE_MARK = " †"  # a cell whose rows come from one case of a variant that has more (e.g. the absent targets)


def _mark(text: str, found: dict | None, r: dict) -> str:
    return text + ONE_CASE_MARK if r["cases"] > 1 and (found or {}).get("note") == ONE_CASE else text


def _bounds(found: dict | None, r: dict) -> str:
    """A cell's bootstrap interval, ``[0.61, 0.79]``."""
    interval = (found or {}).get("interval")
    return _mark(f"[{interval[0]:.2f}, {interval[1]:.2f}]" if interval else "–", found, r)


def footnotes(rows: list[dict], lines: list[str]) -> list[str]:
    """What a table (its markdown ``lines``) cannot show: spread over seeds where a variant has one seed, patients
    where it has one case or a cell rests on one."""
    notes = []
    one_seed = [r["variant"] for r in rows if r["seeds"] == 1]
    one_case = [r["variant"] for r in rows if r["cases"] == 1]
    if one_seed:
        notes.append(f"One seed ({', '.join(one_seed)}): no spread over seeds to show; the interval covers cases and "
                     "prompts only.")
    if one_case:
        notes.append(f"One case ({', '.join(one_case)}): {ONE_CASE.split(': ', 1)[1]}.")
    if any(ONE_CASE_MARK in line for line in lines):
        notes.append(f"{ONE_CASE_MARK.strip()} From one case: {ONE_CASE.split(': ', 1)[1]}.")
    return ["", *notes] if notes else []


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
        found = r["intervals"][metric.name]  # the row under it: each cell's 95% bootstrap interval
        cells = ["↳ 95% interval", f"{r['cases']} case{'s' * (r['cases'] != 1)}", _bounds(found["overall"], r),
                 *[_bounds(found["classes"].get(c), r) for c in classes], _bounds(found["heldout"], r),
                 *([""] * 3 if compute else [])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


PROMPTING = [("name_dice", "Dice by name", False), ("heldout_dice", "Dice by paraphrase", False),
             ("ratio", "paraphrase / name", False), ("false_positive_rate", "absent FP (name)", True),
             ("false_positive_rate_heldout", "absent FP (paraphrase)", True), ("miss_rate", "miss (name)", True),
             ("miss_rate_heldout", "miss (paraphrase)", True), ("retrieval_top1", "retrieval top-1", True),
             ("retrieval_top5", "retrieval top-5", True)]  # (key, heading, shown as a percentage)


def _prompting_shown(rows: list[dict]) -> list[tuple[str, str, bool]]:
    """The prompting table's measures: retrieval only where some summary has it."""
    asked = [r["prompting"] for r in rows if r["prompting"]]
    return [m for m in PROMPTING if not m[0].startswith("retrieval") or any(p[m[0]] for p in asked)]


def _prompting_markdown(rows: list[dict]) -> list[str]:
    """The prompting table: a line per variant that was asked paraphrases, each measure with its interval."""
    shown = _prompting_shown(rows)
    header = ["variant", "seeds", "cases", *[heading for _, heading, _ in shown]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        if r["prompting"]:
            cells = [_mark(format_estimate(r["prompting"][key], percent=percent), r["prompting"][key], r)
                     for key, _, percent in shown]
            lines.append("| " + " | ".join([r["variant"], f"{r['seeds']}/{r['of']}", str(r["cases"]), *cells]) + " |")
    return lines


def _write_prompting_csv(path: Path, rows: list[dict]) -> None:
    """Long form: a line per variant and measure, its estimate and 95% interval."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["variant", "seeds", "cases", "measure", "estimate", "lo", "hi"])
        for r in rows:
            for key, _, _ in _prompting_shown(rows) if r["prompting"] else []:
                found = r["prompting"][key] or {}
                lo, hi = found.get("interval") or (None, None)
                writer.writerow([r["variant"], r["seeds"], r["cases"], key, found.get("estimate"), lo, hi])


def _write_csv(path: Path, rows: list[dict], shown: list[Metric]) -> None:
    """Long form: a line per variant and group (overall, heldout, class:<name>), each ablated metric's mean and std
    over seeds and the bounds (lo, hi) of its bootstrap interval."""
    def stat(scores: dict, group: str) -> tuple:
        if group.startswith("class:"):
            return scores["classes"].get(group[len("class:"):], (float("nan"), float("nan"), 0))
        return scores[group]

    def bounds(intervals: dict, group: str) -> list:
        found = intervals["classes"].get(group[len("class:"):]) if group.startswith("class:") else intervals[group]
        return list((found or {}).get("interval") or (None, None))

    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["variant", "seeds", "group",
                         *[f"{m.name}_{s}" for m in shown for s in ("mean", "std", "lo", "hi")],
                         "parameters", "train_seconds", "eval_seconds_per_case"])
        for r in rows:
            classes = sorted(r["scores"][shown[0].name]["classes"])
            for group in ["overall", "heldout", *[f"class:{c}" for c in classes]]:
                values = [v for m in shown for v in [*stat(r["scores"][m.name], group)[:2],
                                                     *bounds(r["intervals"][m.name], group)]]
                writer.writerow([r["variant"], r["seeds"], group, *values, r["parameters"], r["train_seconds"],
                                 r["seconds_per_case"]])


INTERVAL_ROW = ("Under each variant, the 95% bootstrap interval of each figure: its evaluated seeds' per-case rows "
                "pooled, cases (each with its rows of every seed) and then their rows resampled.")
PROMPTING_CAPTION = (
    "Each figure from the evaluated seeds' pooled per-case rows, with its 95% bootstrap interval (cases, then their "
    "rows). Dice by name and by paraphrase over the targets asked both ways (a target's paraphrases averaged first); "
    "absent FP: share of absent targets the presence head still answered; miss: share of present ones it vetoed; "
    "retrieval: the text encoder alone ranking every class for each held-out paraphrase (over several seeds, their "
    "mean and the envelope of their intervals).")


def write_table(study: Study, rows: list[dict], command: str) -> list[Path]:
    """The study's markdown, CSV and bar chart in ``study.table`` (and the prompting table's CSV where paraphrases were
    asked); returns their paths."""
    study.table.mkdir(parents=True, exist_ok=True)
    shown = ablated()
    lead = shown[0]
    table = _markdown(rows, lead, compute=True)
    md = [f"# {study.name}", "", f"{lead.heading} on split `{study.split}`, mean ± std over seeds. Regenerate with:",
          "", f"    {command}", "", INTERVAL_ROW, "", *table, *footnotes(rows, table)]
    for metric in shown[1:]:
        table = _markdown(rows, metric, compute=False)
        md += ["", f"{metric.heading} on split `{study.split}`, mean ± std over seeds:", "", *table,
               *footnotes(rows, table)]
    written = [study.table / f"{study.name}.{ext}" for ext in ("md", "csv", "png")]
    if any(r["prompting"] for r in rows):
        table = _prompting_markdown(rows)
        md += ["", f"## Prompting: by class name and by held-out paraphrase (split `{study.split}`)", "",
               PROMPTING_CAPTION, "", *table, *footnotes(rows, table)]
        written.append(study.table / f"{study.name}-prompting.csv")
        _write_prompting_csv(written[3], rows)
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
