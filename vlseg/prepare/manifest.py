"""The corpus manifest: JSON Lines, one case per line, written next to the data.

Paths inside are relative to the manifest's folder.  Schema version 2 (the full description, with field meanings, is
``docs/manifest.md``)::

    {"schema": 2, "case_id": "PhantomLiver_000", "dataset": "PhantomLiver", "modality": "CT",
     "image": "Dataset001_PhantomLiver/imagesTr/PhantomLiver_000_0000.nii.gz",
     "label": "Dataset001_PhantomLiver/labelsTr/PhantomLiver_000.nii.gz",
     "classes": {"liver": [1, 2], "liver tumor": [2]},
     "present": {"liver": true, "liver tumor": false},
     "shape": [64, 64, 48], "spacing": [3.0, 3.0, 3.0], "split": "train",
     "boxes": {"liver": [3, 20, 11, 30, 52, 40]},          # per present class, on the canonical (RAS) grid
     "affine": [[3, 0, 0, -96], [0, 3, 0, -96], [0, 0, 3, -72], [0, 0, 0, 1]]}   # the image file's own

``classes`` lists the canonical classes the case's dataset *annotates*, each mapped to the label values whose union is
that class (the liver includes its tumours).  Masked back-propagation supervises exactly these classes, present or
absent; a class not listed is unknown for the case, never background.  ``present`` says, per annotated class, whether
the case's label map contains it.  ``image`` may be a file (NIfTI, NRRD, MHA) or a folder holding one DICOM series.
Schema 1 lines (``boxes`` and ``affine`` optional) are still read; schema 2 requires both.  Unknown extra fields are
ignored, so later minor additions stay readable.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlseg.atomic import atomic_path
from vlseg.errors import VlsegError
from vlseg.prepare.tables import Flags, Interner, Rows, SharedTable

MANIFEST_SCHEMA = 2
SPLITS = ("train", "val", "test")
FIELDS = ("schema", "case_id", "dataset", "modality", "image", "label", "classes", "present", "shape", "spacing",
          "split")


@dataclass
class Case:
    case_id: str
    dataset: str
    modality: str
    image: Path  # absolute after reading
    label: Path  # absolute after reading
    # Read from a manifest, classes/present/boxes are compact mappings that read like these dicts (one class table
    # shared by a dataset's cases, bit flags, packed boxes; vlseg.prepare.tables); any mapping may be given.
    classes: dict[str, list[int]]  # annotated canonical class -> label values whose union is the class
    present: dict[str, bool]  # annotated class -> does this case contain it
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    split: str
    boxes: dict[str, list[int]] = field(default_factory=dict)  # present class -> [x0, y0, z0, x1, y1, z1]
    affine: list[list[float]] | None = None  # the image file's own 4x4 affine

    def class_mask(self, label: np.ndarray, name: str) -> np.ndarray:
        """Boolean mask of class ``name`` in a label map of this case's dataset."""
        if name not in self.classes:
            raise VlsegError(f"{self.label}: dataset {self.dataset} does not annotate {name!r} "
                             f"(annotated: {', '.join(self.classes) or 'nothing'})")
        values = self.classes[name]
        return label == values[0] if len(values) == 1 else np.isin(label, values)

    def to_json(self, root: Path) -> dict:
        """The manifest row, with image/label paths relative to ``root`` (the manifest's folder)."""
        root = os.path.abspath(root)

        def rel(p) -> str:
            return Path(os.path.relpath(os.path.abspath(p), root)).as_posix()

        # Schema 2 needs the image's affine; a case built without one (in memory) is written as schema 1.
        schema = MANIFEST_SCHEMA if self.affine is not None else 1
        return {"schema": schema, "case_id": self.case_id, "dataset": self.dataset, "modality": self.modality,
                "image": rel(self.image), "label": rel(self.label),
                "classes": {str(k): [int(v) for v in vals] for k, vals in self.classes.items()},
                "present": {str(k): bool(v) for k, v in self.present.items()},
                "shape": [int(n) for n in self.shape], "spacing": [float(s) for s in self.spacing],
                "split": self.split,
                **({"boxes": {k: [int(v) for v in b] for k, b in self.boxes.items()}}
                   if self.boxes or schema >= 2 else {}),
                **({"affine": [[float(v) for v in r] for r in self.affine]} if self.affine is not None else {})}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_header(row: dict, where: str) -> int:
    """The row's schema (a one-line error for a missing field or a schema this vlseg cannot read)."""
    for key in FIELDS:
        if key not in row:
            raise VlsegError(f"{where}: missing field {key!r}")
    schema = row["schema"]
    if not _is_int(schema) or schema < 1:
        raise VlsegError(f"{where}: 'schema' must be a positive integer, got {schema!r}")
    if schema > MANIFEST_SCHEMA:
        raise VlsegError(f"{where}: manifest schema {schema} is newer than this vlseg supports ({MANIFEST_SCHEMA})")
    return schema


def _check_names(row: dict, where: str) -> None:
    """Ids, paths and split; the class table and the present flags."""
    for key in ("case_id", "dataset", "modality", "image", "label", "split"):
        if not isinstance(row[key], str) or not row[key].strip():
            raise VlsegError(f"{where}: {key!r} must be a non-empty string, got {row[key]!r}")
    if row["split"] not in SPLITS:
        raise VlsegError(f"{where}: unknown split {row['split']!r} (expected one of {', '.join(SPLITS)})")

    classes = row["classes"]
    if not isinstance(classes, dict):
        raise VlsegError(f"{where}: 'classes' must be an object mapping class names to label values")
    for name, values in classes.items():
        if not isinstance(values, list) or not values or not all(_is_int(v) and v > 0 for v in values):
            raise VlsegError(f"{where}: class {name!r} must map to a non-empty list of positive integer label "
                             f"values, got {values!r}")

    present = row["present"]
    if not isinstance(present, dict) or not all(isinstance(v, bool) for v in present.values()):
        raise VlsegError(f"{where}: 'present' must be an object mapping class names to true/false")
    if set(present) != set(classes):
        missing = sorted(set(classes) - set(present))
        extra = sorted(set(present) - set(classes))
        problem = f"no entry for {missing[0]!r}" if missing else f"{extra[0]!r} is not an annotated class"
        raise VlsegError(f"{where}: 'present' must cover exactly the annotated classes: {problem}")


def _check_geometry(row: dict, where: str, schema: int) -> None:
    """Shape, spacing, boxes and affine."""
    classes = row["classes"]
    shape, spacing = row["shape"], row["spacing"]
    if not isinstance(shape, list) or len(shape) != 3 or not all(_is_int(n) and n > 0 for n in shape):
        raise VlsegError(f"{where}: 'shape' must be three positive integers, got {shape!r}")
    if not isinstance(spacing, list) or len(spacing) != 3 or not all(_is_number(s) and s > 0 for s in spacing):
        raise VlsegError(f"{where}: 'spacing' must be three positive numbers, got {spacing!r}")

    if schema >= 2:
        for key in ("boxes", "affine"):
            if key not in row:
                raise VlsegError(f"{where}: missing field {key!r} (required from schema 2)")
    boxes = row.get("boxes") or {}
    if not isinstance(boxes, dict) or not all(
            name in classes and isinstance(b, list) and len(b) == 6 and all(_is_int(v) and v >= 0 for v in b)
            and all(b[i] < b[i + 3] for i in range(3)) for name, b in boxes.items()):
        raise VlsegError(f"{where}: 'boxes' must map annotated classes to [x0, y0, z0, x1, y1, z1] with x0 < x1 ...")
    affine = row.get("affine")
    if affine is not None and (not isinstance(affine, list) or len(affine) != 4 or not all(
            isinstance(r, list) and len(r) == 4 and all(_is_number(v) for v in r) for r in affine)):
        raise VlsegError(f"{where}: 'affine' must be a 4x4 list of numbers")


def _parse(line: str, where: str, root: str, share: Interner) -> Case:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise VlsegError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise VlsegError(f"{where}: expected a JSON object, got {type(row).__name__}")
    schema = _check_header(row, where)
    _check_names(row, where)
    _check_geometry(row, where, schema)
    classes, present, shape, spacing = row["classes"], row["present"], row["shape"], row["spacing"]
    boxes, affine = row.get("boxes") or {}, row.get("affine")
    name = sys.intern  # class and dataset names repeat on every line: one copy each in memory, however many cases
    # The class table is one shared object per distinct table, the flags a bit mask, the boxes packed integers: a
    # corpus of tens of thousands of cases stays small (vlseg.prepare.tables).
    table = share.table({name(k): v for k, v in classes.items()})
    return Case(case_id=row["case_id"], dataset=name(row["dataset"]), modality=name(row["modality"]),
                image=Path(os.path.normpath(os.path.join(root, row["image"]))),
                label=Path(os.path.normpath(os.path.join(root, row["label"]))),
                classes=SharedTable(table), present=Flags.of({name(k): v for k, v in present.items()}, share),
                shape=tuple(shape), spacing=tuple(float(s) for s in spacing), split=name(row["split"]),
                boxes=Rows.of({name(k): v for k, v in boxes.items()}, share, width=6), affine=affine)


def read_manifest(path, split: str | None = None, datasets: list[str] | None = None) -> list[Case]:
    """Read and validate every line of a manifest; keep the cases of ``split`` and ``datasets`` when given.

    Any problem raises ``VlsegError`` naming ``path:line`` and what is wrong.
    """
    path = Path(path)
    if split is not None and split not in SPLITS:
        raise VlsegError(f"{path}: unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    if isinstance(datasets, str):
        datasets = [datasets]
    if not path.exists():
        raise VlsegError(f"{path}: manifest not found")
    if not path.is_file():
        raise VlsegError(f"{path}: manifest is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise VlsegError(f"{path}: manifest is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise VlsegError(f"{path}: cannot read manifest ({exc.strerror or exc})") from None

    root = str(path.resolve().parent)
    cases, seen, share = [], {}, Interner()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        case = _parse(line, where, root, share)
        if case.case_id in seen:
            raise VlsegError(f"{where}: duplicate case_id {case.case_id!r} (first on line {seen[case.case_id]})")
        seen[case.case_id] = lineno
        cases.append(case)
    return [c for c in cases if (split is None or c.split == split) and (datasets is None or c.dataset in datasets)]


def write_manifest(path, cases: list[Case]) -> Path:
    """Write ``cases`` as a manifest at ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = path.resolve().parent
    text = "".join(json.dumps(c.to_json(root)) + "\n" for c in cases)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
