"""A study file read into its runs (``vlseg.evaluate.ablate`` describes the file)."""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from vlseg.config import config_path, load_yaml
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
    retrieval: bool = False  # evaluation also scores the text encoder's paraphrase → class retrieval

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
    """A study file, or a shipped study by name (``configs/ablations/fusion.yaml`` works from any folder)."""
    path = config_path(path)
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
                 output=output, table=Path(spec.get("table") or output),
                 retrieval=bool(evaluation.get("retrieval", False)))
