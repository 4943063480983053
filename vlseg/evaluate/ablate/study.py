"""Ablation studies: a YAML grid × seeds → training and evaluation runs → one table.

    vlseg ablate configs/ablations/<study>.yaml                  # run what is missing, then the table
    vlseg ablate configs/ablations/<study>.yaml --emit-commands  # one shell line per run, for a scheduler
    vlseg ablate configs/ablations/<study>.yaml --collect        # only the table, from finished runs
    vlseg ablate configs/ablations/<study>.yaml --seeds 0        # only some of the study's seeds
    vlseg ablate configs/ablations/<study>.yaml --variants naive # ... or of its variants

A study file::

    name: masked_vs_naive              # default: the file's stem
    base: configs/phantom.yaml         # the experiment every run starts from
    overrides: [train.steps=300]       # applied to every run
    variants:                          # named sets of overrides (optional) ...
      masked: [loss.name=masked]
      naive: [loss.name=naive]
    grid:                              # ... and/or keys whose values are crossed (optional)
      fusion.layers: [1, 2]
    seeds: [0, 1, 2]
    evaluate: {split: test}            # manifest: default the run's own; all_classes: false
    output: checkpoints/ablations/masked_vs_naive
    table: docs/results/masked_vs_naive   # where the markdown/CSV/PNG go (default: output)

Every variant × grid point × seed is one run in ``<output>/<variant>/seed<k>/``, starting from
``<output>/base.yaml`` (``base`` plus ``overrides``), trained with ``--resume auto`` (a run that finished is skipped,
an interrupted one continues) and evaluated once.  A run identical to a finished run of another study under the same
parent folder (the same resolved config apart from where it is written) is linked to that run instead of being trained
again.  The table gives Dice mean ± std over seeds per class and overall (and on held-out paraphrases where the
vocabulary has them), with the compute each cost: parameters in the checkpoint, training time (``run_info.json``) and
evaluation seconds per case.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
import shlex
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from vlseg.config import load_yaml
from vlseg.errors import VlsegError


@dataclass
class Run:
    variant: str  # the label: the variant's name, then the grid point ("masked,fusion.layers=1")
    seed: int
    overrides: list[str]
    output_root: Path
    named: str = ""  # the study's variant the run belongs to ("" in a study without named variants)
    run_name: str = field(init=False)

    def __post_init__(self):
        self.run_name = f"seed{self.seed}"

    @property
    def run_dir(self) -> Path:
        return self.output_root / self.run_name

    def all_overrides(self) -> list[str]:
        return [*self.overrides, f"seed={self.seed}", f"output_root={self.output_root}", f"run_name={self.run_name}"]


@dataclass
class Study:
    name: str
    base: str | None
    common: list[str]
    runs: list[Run]
    split: str
    manifest: str | None
    all_classes: bool
    output: Path
    table: Path

    def eval_dir(self, run: Run) -> Path:
        # Named by the evaluation settings, so a run shared with another study keeps each study's evaluation apart.
        suffix = ("-all" if self.all_classes else "") + (f"-{_slug(Path(self.manifest).stem)}" if self.manifest else "")
        return run.run_dir / f"eval-{self.split}{suffix}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", text).strip("_") or "base"


def _as_overrides(value, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, dict):
        return [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise VlsegError(f"{where}: expected a list of key=value strings or a mapping")


def load_study(path: str | Path) -> Study:
    path = Path(path)
    spec = load_yaml(path, what="study file")
    known = {"name", "base", "overrides", "variants", "grid", "seeds", "evaluate", "output", "table"}
    unknown = sorted(set(spec) - known)
    if unknown:
        raise VlsegError(f"{path}: unknown study key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    name = str(spec.get("name") or path.stem)
    common = _as_overrides(spec.get("overrides"), f"{path}: overrides")
    variants = {str(k): _as_overrides(v, f"{path}: variants.{k}") for k, v in (spec.get("variants") or {}).items()}
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
        raise VlsegError(f"{path}: grid maps each config key to a non-empty list of values")
    seeds = spec.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise VlsegError(f"{path}: seeds is a non-empty list of integers")
    output = Path(spec.get("output") or f"checkpoints/ablations/{name}")
    points = []
    for variant, extra in (variants or {"": []}).items():
        for values in itertools.product(*grid.values()):
            assignment = [f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}" for k, v in zip(grid, values)]
            label = ",".join([variant] * bool(variant) + assignment) or "base"
            points.append((label, [*extra, *assignment], variant))
    labels = [label for label, _, _ in points]
    if len(set(map(_slug, labels))) != len(labels):
        raise VlsegError(f"{path}: two variants share the name {labels!r}")
    runs = [Run(label, seed, overrides, output / _slug(label), variant) for label, overrides, variant in points
            for seed in seeds]
    evaluation = spec.get("evaluate") or {}
    return Study(name=name, base=spec.get("base"), common=common, runs=runs, split=str(evaluation.get("split", "test")),
                 manifest=evaluation.get("manifest"), all_classes=bool(evaluation.get("all_classes", False)),
                 output=output, table=Path(spec.get("table") or output))


# ------------------------------------------------------------------------------------------------------------- running

def study_base(study: Study) -> Path:
    """The study's starting config (its ``base`` with the common ``overrides``) resolved into ``<output>/base.yaml``.

    Runs start from this file, so a variant that switches a component (``fusion.name=dodnet``) drops the settings
    the common overrides gave the previous one, exactly as switching it in an experiment file would."""
    from vlseg.config import load_config, save_config

    return save_config(load_config(study.base, study.common), study.output / "base.yaml")


def run_config(study: Study, run: Run) -> dict:
    from vlseg.config import load_config

    return load_config(study_base(study), run.all_overrides())


REQUEST_FILE = "ablation_request.json"


def fingerprint(cfg: dict) -> str:
    """What a run computes, independent of where it is written: its resolved config without the output location."""
    import hashlib

    content = {k: v for k, v in cfg.items() if k not in ("output_root", "run_name")}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def record_request(study: Study, run: Run, cfg: dict) -> None:
    """Write the run's requested config ``cfg`` and its fingerprint into the run directory (once)."""
    path = run.run_dir / REQUEST_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"fingerprint": fingerprint(cfg), "study": study.name, "variant": run.variant,
                                    "seed": run.seed, "config": cfg}, indent=1, default=str))


def find_identical(study: Study, run: Run, cfg: dict) -> Path | None:
    """A finished run of another study (a sibling of this study's output folder) with the same fingerprint.

    Shipped studies share their baseline (configs/real.yaml, 1,500 steps): it is trained once per seed and the
    other studies link to it instead of spending another quarter of an hour recomputing the same weights."""
    digest = fingerprint(cfg)
    for request in sorted(study.output.parent.glob(f"*/*/seed*/{REQUEST_FILE}")):
        other = request.parent
        if other.resolve() == run.run_dir.resolve() or other.is_symlink():
            continue
        try:
            found = json.loads(request.read_text()).get("fingerprint")
        except (OSError, ValueError):
            continue
        if found == digest and _finished(other):
            return other
    return None


def _finished(run_dir: Path) -> bool:
    from vlseg.checkpoint import list_checkpoints, read_metadata

    found = list_checkpoints(run_dir)
    if not found:
        return False
    meta = read_metadata(found[-1])
    return int(meta["step"]) >= int(meta["config"]["train"]["steps"])


def is_trained(study: Study, run: Run) -> bool:
    return _finished(run.run_dir)


def is_evaluated(study: Study, run: Run) -> bool:
    return (study.eval_dir(run) / "summary.json").is_file()


def execute(study: Study, progress: bool = True) -> None:
    """Train and evaluate, in this process and one after another, every run that is not finished yet."""
    from vlseg.evaluate.evaluate import evaluate
    from vlseg.infer.segmenter import Segmenter
    from vlseg.train.loop import train

    for i, run in enumerate(study.runs, 1):
        head = f"[{i}/{len(study.runs)}] {run.variant} seed {run.seed}"
        if is_trained(study, run) and is_evaluated(study, run):
            print(f"{head}: done, skipped", flush=True)
            continue
        if not is_trained(study, run):
            cfg = run_config(study, run)
            same = None if run.run_dir.exists() else find_identical(study, run, cfg)
            if same is not None:  # a relative link, so the results folder can move as a whole
                run.run_dir.parent.mkdir(parents=True, exist_ok=True)
                run.run_dir.symlink_to(os.path.relpath(same, run.run_dir.parent), target_is_directory=True)
                print(f"{head}: identical to the finished run {same}, linked", flush=True)
                if is_evaluated(study, run):
                    continue
            else:
                record_request(study, run, cfg)
                print(f"{head}: training", flush=True)
                train(cfg, resume="auto", progress=progress)
        print(f"{head}: evaluating", flush=True)
        segmenter = Segmenter.from_pretrained(run.run_dir)
        manifest = study.manifest or segmenter.config["data"]["manifest"]
        evaluate(segmenter, manifest, study.split, study.eval_dir(run), classes="all" if study.all_classes else None,
                 progress=progress)


def commands(study: Study, study_path: str | Path) -> list[str]:
    """One shell line per run (train with --resume auto, then evaluate), then the one that builds the table."""
    lines, base = [], study_base(study)
    for run in study.runs:
        train_cmd = ["vlseg", "train", "--config", str(base), "--resume", "auto", "--no-progress",
                     *run.all_overrides()]
        eval_cmd = ["vlseg", "evaluate", "--checkpoint", str(run.run_dir), "--split", study.split,
                    "--out", str(study.eval_dir(run)), "--no-progress",
                    *(["--manifest", study.manifest] if study.manifest else []),
                    *(["--all-classes"] if study.all_classes else [])]
        lines.append(f"{shlex.join(train_cmd)} && {shlex.join(eval_cmd)}")
    lines.append(shlex.join(["vlseg", "ablate", str(study_path), "--collect"]))
    return lines


# ------------------------------------------------------------------------------------------------------------ the table

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


def collect(study: Study) -> list[dict]:
    """One row per variant: per-class and overall Dice over seeds, and compute."""
    by_variant: dict[str, list[Run]] = {}
    for run in study.runs:
        by_variant.setdefault(run.variant, []).append(run)
    rows = []
    for variant, runs in by_variant.items():
        done = [r for r in runs if is_evaluated(study, r)]
        summaries = [json.loads((study.eval_dir(r) / "summary.json").read_text()) for r in done]
        row = {"variant": variant, "seeds": len(done), "of": len(runs), "classes": {}}
        classes = sorted({c["class"] for s in summaries for c in s["by_class"]})
        for name in classes:
            row["classes"][name] = _mean_std([next((c["dice_mean"] for c in s["by_class"] if c["class"] == name),
                                                   None) for s in summaries])
        row["overall"] = _mean_std([s["overall"][0]["dice_mean"] if s["overall"] else None for s in summaries])
        row["heldout"] = _mean_std([statistics.fmean(c["dice_mean"] for c in s["by_class_heldout"])
                                    if s.get("by_class_heldout") else None for s in summaries])
        infos = [json.loads((r.run_dir / "run_info.json").read_text()) for r in done
                 if (r.run_dir / "run_info.json").is_file()]
        row["train_seconds"] = _mean_std([i["train_seconds"] for i in infos])[0]
        row["seconds_per_case"] = _mean_std([s.get("seconds_per_case") for s in summaries])[0]
        row["parameters"] = _parameters(done[0].run_dir) if done else None
        rows.append(row)
    return rows


def _fmt(stat: tuple[float, float, int]) -> str:
    mean, std, n = stat
    if n == 0:
        return "–"
    return f"{mean:.3f}" if n == 1 else f"{mean:.3f} ± {std:.3f}"  # one seed has no spread to show


def write_table(study: Study, rows: list[dict], command: str) -> list[Path]:
    study.table.mkdir(parents=True, exist_ok=True)
    classes = sorted({c for r in rows for c in r["classes"]})
    header = ["variant", "seeds", "overall Dice", *classes, "held-out paraphrases", "parameters (M)", "train (s)",
              "eval (s/case)"]

    def cells(r: dict) -> list[str]:
        return [r["variant"], f"{r['seeds']}/{r['of']}", _fmt(r["overall"]),
                *[_fmt(r["classes"].get(c, (0, 0, 0))) for c in classes], _fmt(r["heldout"]),
                "–" if r["parameters"] is None else f"{r['parameters'] / 1e6:.3f}",
                "–" if r["train_seconds"] != r["train_seconds"] else f"{r['train_seconds']:.0f}",
                "–" if r["seconds_per_case"] != r["seconds_per_case"] else f"{r['seconds_per_case']:.1f}"]

    md = [f"# {study.name}", "", f"Dice on split `{study.split}`, mean ± std over seeds. Regenerate with:", "",
          f"    {command}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    md += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    written = [study.table / f"{study.name}.md", study.table / f"{study.name}.csv", study.table / f"{study.name}.png"]
    written[0].write_text("\n".join(md) + "\n")
    with open(written[1], "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["variant", "seeds", "group", "dice_mean", "dice_std", "parameters", "train_seconds",
                         "eval_seconds_per_case"])
        for r in rows:
            for group, stat in [("overall", r["overall"]), ("heldout", r["heldout"]),
                                *[(f"class:{c}", r["classes"][c]) for c in sorted(r["classes"])]]:
                writer.writerow([r["variant"], r["seeds"], group, stat[0], stat[1], r["parameters"],
                                 r["train_seconds"], r["seconds_per_case"]])
    bar_chart(rows, written[2], f"{study.name}: overall Dice (mean ± std over seeds)")
    return written


def bar_chart(rows: list[dict], path: Path, title: str) -> None:
    """Overall Dice per variant with its spread over seeds. Drawn with Pillow (already a dependency for the
    overlays) rather than adding matplotlib for one chart."""
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
        mean, std, n = r["overall"]
        x0 = left + 20 + 110 * i
        if n:
            draw.rectangle([x0, y(mean), x0 + 60, y(0)], fill=(70, 120, 190))
            draw.line([(x0 + 30, y(mean - std)), (x0 + 30, y(mean + std))], fill="black", width=2)
            for v in (mean - std, mean + std):
                draw.line([(x0 + 22, y(v)), (x0 + 38, y(v))], fill="black", width=2)
            draw.text((x0 + 8, y(mean) - 14), f"{mean:.3f}", fill="black")
        label = r["variant"] if len(r["variant"]) <= 16 else r["variant"][:15] + "…"
        draw.text((x0 - 4, height - bottom + 8), label, fill="black")
        draw.text((x0 - 4, height - bottom + 24), f"n={n}", fill=(90, 90, 90))
    img.save(path)
