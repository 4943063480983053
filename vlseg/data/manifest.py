"""The corpus manifest: JSON Lines, one case per line, paths relative to the manifest's folder.

Schema version 1 (issue #3 extends it)::

    {"schema": 1, "case_id": "PhantomLiver_000", "dataset": "PhantomLiver", "modality": "CT",
     "image": "Dataset001_PhantomLiver/imagesTr/PhantomLiver_000_0000.nii.gz",
     "label": "Dataset001_PhantomLiver/labelsTr/PhantomLiver_000.nii.gz",
     "classes": {"liver": [1, 2], "liver tumor": [2]},    # classes the dataset annotates → label values (union)
     "present": {"liver": true, "liver tumor": false},
     "shape": [64, 64, 48], "spacing": [3.0, 3.0, 3.0], "split": "train"}

``classes`` is what masked back-propagation runs on: a class listed there is supervised (present or not), a class not
listed is never.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlseg.errors import VlsegError

MANIFEST_SCHEMA = 1
REQUIRED = ("case_id", "dataset", "modality", "image", "label", "classes", "split")


@dataclass
class Case:
    case_id: str
    dataset: str
    modality: str
    image: Path
    label: Path
    classes: dict[str, list[int]]
    present: dict[str, bool]
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    split: str

    def class_mask(self, label: np.ndarray, name: str) -> np.ndarray:
        if name not in self.classes:
            raise VlsegError(f"{self.label}: dataset {self.dataset} does not annotate {name!r}")
        return np.isin(label, self.classes[name])

    def to_json(self, root: Path) -> dict:
        return {"schema": MANIFEST_SCHEMA, "case_id": self.case_id, "dataset": self.dataset,
                "modality": self.modality, "image": os.path.relpath(self.image, root),
                "label": os.path.relpath(self.label, root), "classes": self.classes, "present": self.present,
                "shape": list(self.shape), "spacing": list(self.spacing), "split": self.split}


def _parse(line: str, where: str, root: Path) -> Case:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise VlsegError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise VlsegError(f"{where}: expected a JSON object")
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        raise VlsegError(f"{where}: missing field {missing[0]!r}")
    if row.get("schema", MANIFEST_SCHEMA) > MANIFEST_SCHEMA:
        raise VlsegError(f"{where}: manifest schema {row['schema']} is newer than this vlseg ({MANIFEST_SCHEMA})")
    classes = row["classes"]
    if not isinstance(classes, dict) or not all(isinstance(v, list) and all(isinstance(i, int) for i in v)
                                                for v in classes.values()):
        raise VlsegError(f"{where}: 'classes' must map class names to lists of label values")
    return Case(str(row["case_id"]), str(row["dataset"]), str(row["modality"]), root / row["image"],
                root / row["label"], {str(k): list(v) for k, v in classes.items()},
                {str(k): bool(v) for k, v in (row.get("present") or {}).items()},
                tuple(row.get("shape") or ()), tuple(float(s) for s in row.get("spacing") or ()), str(row["split"]))


def read_manifest(path, split: str | None = None, datasets: list[str] | None = None) -> list[Case]:
    path = Path(path)
    if not path.is_file():
        raise VlsegError(f"{path}: manifest not found")
    root = path.resolve().parent
    cases = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            cases.append(_parse(line, f"{path}:{lineno}", root))
    return [c for c in cases if (split is None or c.split == split) and (datasets is None or c.dataset in datasets)]


def write_manifest(path, cases: list[Case]) -> Path:
    path = Path(path)
    root = path.resolve().parent
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(c.to_json(root)) + "\n" for c in cases))
    os.replace(tmp, path)
    return path
