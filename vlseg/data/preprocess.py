"""The preprocessing cache: every training case once brought to the model's working form, stored as memory-mappable
arrays so that a training crop reads only the voxels it needs.

Per case (``<cache>/<dataset>/<case_id>/``):

* ``image.npy`` — float16 [X, Y, Z], RAS-canonical, normalised (CT: clipped to ``ct_window`` and scaled to [-1, 1];
  MR: percentile clipping and z-score — ``vlseg.io.normalize_intensity``), resampled to the dataset's planned spacing;
* ``label.npy`` — the label map on the same grid (uint8, or uint16 for values above 255), nearest-neighbour resampled;
* ``foreground.npz`` — per present class, up to 20 000 of its voxel coordinates (drawn deterministically), so a
  foreground-centred crop needs no scan of the label;
* ``meta.json`` — format version, the cache key, shape, spacing, the class → label values table, per present class
  its box (``[x0, y0, z0, x1, y1, z1]``, end exclusive, on the cached grid) and voxel count.

The key is a hash of the format version, the settings that shape the arrays (CT window, planned spacing, modality) and
the size and modification time of every source file (all files of a DICOM series folder).  A re-run skips a case
whose key matches and rewrites it otherwise; a case is written into a temporary folder and renamed into place, so an
interrupted run never leaves half a case.  Case folders of cases no longer in the manifest are left alone.

Target spacing (``settings["target_spacing"]``): None keeps each case's native grid; a list of three numbers applies
to every dataset; ``"auto"`` plans it per dataset with nnU-Net's rule (``plan_spacing``); ``spacing_per_dataset``
overrides single datasets.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from vlseg.atomic import atomic_path
from vlseg.data.manifest import Case, bounding_boxes
from vlseg.errors import VlsegError

FORMAT_VERSION = 1
MAX_FOREGROUND = 20_000
ANISOTROPY = 3.0  # nnU-Net: a dataset is anisotropic when its coarsest median spacing exceeds 3x its finest


def default_cache_dir(manifest) -> Path:
    return Path(manifest).resolve().parent / "cache"


def plan_spacing(spacings) -> tuple[float, float, float]:
    """nnU-Net's target-spacing rule: the per-axis median of the cases' spacings; for an anisotropic dataset (coarsest
    median > 3 × finest) the coarse axis takes the 10th percentile instead, so thick-slice outliers do not dictate
    an even coarser grid."""
    arr = np.asarray([tuple(map(float, s)) for s in spacings], dtype=float)
    if arr.ndim != 2 or arr.shape[1] != 3 or not len(arr):
        raise VlsegError(f"plan_spacing: expected a list of (x, y, z) spacings, got shape {arr.shape}")
    target = np.median(arr, axis=0)
    coarse = int(np.argmax(target))
    if target[coarse] > ANISOTROPY * target.min():
        target[coarse] = np.percentile(arr[:, coarse], 10)
    return tuple(float(v) for v in target)


def _triple(value, what: str) -> list[float]:
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        out = []
    if len(out) != 3 or not all(np.isfinite(v) and v > 0 for v in out):
        raise VlsegError(f"{what} must be three positive numbers (mm), got {value!r}")
    return out


def plan_corpus(cases: list[Case], settings: dict) -> dict[str, list[float] | None]:
    """Dataset → the spacing its cases are cached at (None: each case's native spacing)."""
    target = settings.get("target_spacing")
    per_dataset = settings.get("spacing_per_dataset") or {}
    datasets = sorted({c.dataset for c in cases})
    unknown = sorted(set(per_dataset) - set(datasets))
    if unknown:
        raise VlsegError(f"data.spacing_per_dataset: {unknown[0]!r} is not a dataset of the corpus "
                         f"({', '.join(datasets)})")
    plan: dict[str, list[float] | None] = {}
    for ds in datasets:
        if ds in per_dataset:
            plan[ds] = _triple(per_dataset[ds], f"data.spacing_per_dataset.{ds}")
        elif target is None:
            plan[ds] = None
        elif isinstance(target, str):
            if target != "auto":
                raise VlsegError(f"data.target_spacing must be null, 'auto' or three numbers, got {target!r}")
            plan[ds] = list(plan_spacing([c.spacing for c in cases if c.dataset == ds]))
        else:
            plan[ds] = _triple(target, "data.target_spacing")
    return plan


def _source_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]


def _case_key(case: Case, spacing, settings: dict) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT_VERSION, "modality": case.modality, "spacing": spacing,
                         "ct_window": [float(v) for v in settings["ct_window"]] if case.modality == "CT" else None,
                         "classes": case.classes}, sort_keys=True).encode())
    for source in (Path(case.image), Path(case.label)):
        if not source.exists():
            raise VlsegError(f"{source}: file not found")
        for f in _source_files(source):
            st = f.stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def case_dir(cache_dir, case: Case) -> Path:
    return Path(cache_dir) / case.dataset / case.case_id


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def process_case(case: Case, folder: Path, spacing, settings: dict) -> dict:
    """Read, normalise, resample and write one case; returns its meta."""
    from vlseg.io import load_label, load_scan, normalize_intensity, resample_to_spacing

    key = _case_key(case, spacing, settings)
    scan = load_scan(case.image)
    label = load_label(case.label, like=scan)
    image = normalize_intensity(scan.data, case.modality, tuple(settings["ct_window"]))
    out_spacing = list(scan.spacing)
    if spacing is not None:
        image = resample_to_spacing(image, scan.spacing, spacing, order=1)
        label = resample_to_spacing(label, scan.spacing, spacing, order=0)
        out_spacing = [float(s) for s in spacing]
    top = int(label.max()) if label.size else 0
    label = label.astype(np.uint8 if top <= 255 else np.uint16)
    boxes = bounding_boxes(label, case.classes)
    rng = np.random.default_rng(0)
    foreground, counts = {}, {}
    for name in boxes:
        x0, y0, z0, x1, y1, z1 = boxes[name]
        where = np.argwhere(np.isin(label[x0:x1, y0:y1, z0:z1], case.classes[name])) + [x0, y0, z0]
        counts[name] = int(len(where))
        if len(where) > MAX_FOREGROUND:
            where = where[np.sort(rng.choice(len(where), MAX_FOREGROUND, replace=False))]
        foreground[name] = where.astype(np.int32)
    meta = {"format": FORMAT_VERSION, "key": key, "case_id": case.case_id, "dataset": case.dataset,
            "shape": [int(n) for n in image.shape], "spacing": out_spacing, "classes": case.classes,
            "boxes": boxes, "voxels": counts, "label_dtype": str(label.dtype)}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    np.save(tmp / "image.npy", image.astype(np.float16))
    np.save(tmp / "label.npy", label)
    np.savez(tmp / "foreground.npz", **{f"c{i}": foreground[n] for i, n in enumerate(boxes)})
    (tmp / "meta.json").write_text(json.dumps(meta))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return meta


def _job(args) -> tuple[str, str | None, str | None, str]:
    """Worker entry: (case id, error file, error problem, status)."""
    case, folder, spacing, settings = args
    try:
        from vlseg.io import canonical_modality

        canonical_modality(case.modality, where=str(case.image))
        meta = _read_meta(folder)
        if meta is not None and meta.get("key") == _case_key(case, spacing, settings):
            return case.case_id, None, None, "skipped"
        process_case(case, folder, spacing, settings)
        return case.case_id, None, None, "written"
    except VlsegError as exc:
        text = str(exc)
        file, sep, problem = text.partition(": ")
        return case.case_id, file if sep else str(case.image), problem if sep else text, "error"


def _run(fn, jobs, workers: int, desc: str, progress: bool):
    """``fn`` over ``jobs`` in order, in ``workers`` processes (≤ 1: in this process), with a progress bar."""
    if workers <= 1 or len(jobs) <= 1:
        yield from tqdm(map(fn, jobs), total=len(jobs), desc=desc, disable=not progress, unit="case")
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from tqdm(pool.map(fn, jobs), total=len(jobs), desc=desc, disable=not progress, unit="case")


def preprocess_corpus(cases: list[Case], cache_dir, settings: dict, workers: int = 2, progress: bool = True) -> dict:
    """Bring every case into the cache (up-to-date cases are skipped).  Returns and writes ``report.json``:
    ``{"written": [...], "skipped": [...], "errors": [{"case", "file", "problem"}]}`` — a failing case never stops
    the others."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    plan = plan_corpus(cases, settings)
    jobs = [(c, case_dir(cache_dir, c), plan[c.dataset], settings) for c in cases]
    report = {"written": [], "skipped": [], "errors": []}
    for case_id, file, problem, status in _run(_job, jobs, int(workers), "preprocessing", progress):
        if status == "error":
            report["errors"].append({"case": case_id, "file": file, "problem": problem})
        else:
            report[status].append(case_id)
    with atomic_path(cache_dir / "plan.json") as tmp:
        tmp.write_text(json.dumps({"format": FORMAT_VERSION, "spacing": plan, "settings": settings}, indent=2))
    with atomic_path(cache_dir / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    return report


@dataclass
class CachedCase:
    """One cached case, opened as memory maps: reading a crop touches only that region's pages."""

    case: Case
    image: np.ndarray  # float16 [X, Y, Z] memmap
    label: np.ndarray  # uint8/uint16 [X, Y, Z] memmap
    spacing: tuple[float, float, float]
    boxes: dict[str, list[int]]
    foreground: dict[str, np.ndarray] = field(repr=False)
    voxels: dict[str, int] = field(default_factory=dict)
    fill: float = -1.0  # padding value for the image outside the volume

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape)

    def crop(self, starts, size) -> tuple[np.ndarray, np.ndarray]:
        """The region ``[starts, starts + size)`` as (float32 image, label); outside the volume the image is padded
        with its minimum and the label with 0."""
        src, dst = [], []
        for st, s, n in zip(starts, size, self.image.shape):
            lo, hi = max(int(st), 0), min(int(st) + int(s), n)
            src.append(slice(lo, max(lo, hi)))
            dst.append(slice(lo - int(st), lo - int(st) + max(0, hi - lo)))
        image = np.full(tuple(int(s) for s in size), self.fill, np.float32)
        label = np.zeros(tuple(int(s) for s in size), self.label.dtype)
        image[tuple(dst)] = self.image[tuple(src)]
        label[tuple(dst)] = self.label[tuple(src)]
        return image, label

    def class_mask(self, label_region: np.ndarray, name: str) -> np.ndarray:
        return np.isin(label_region, self.case.classes[name])


def _open(case: Case, folder: Path) -> CachedCase:
    meta = _read_meta(folder)
    with np.load(folder / "foreground.npz") as fg:
        foreground = {name: fg[f"c{i}"] for i, name in enumerate(meta["boxes"])}
    image = np.load(folder / "image.npy", mmap_mode="r")
    label = np.load(folder / "label.npy", mmap_mode="r")
    if list(image.shape) != meta["shape"] or list(label.shape) != meta["shape"]:
        raise VlsegError(f"{folder}: cached arrays do not have the recorded shape {meta['shape']}")
    fill = -1.0 if case.modality == "CT" else float(np.min(image[:: max(1, image.shape[0] // 16)]))
    return CachedCase(case, image, label, tuple(meta["spacing"]), meta["boxes"], foreground,
                      meta.get("voxels", {}), fill)


def open_cache(cases: list[Case], cache_dir, settings: dict) -> list[CachedCase]:
    """Open every case's cache entry; a missing or stale entry is one error naming the first and the count."""
    plan = plan_corpus(cases, settings)
    stale = []
    for c in cases:
        meta = _read_meta(case_dir(cache_dir, c))
        if meta is None or meta.get("key") != _case_key(c, plan[c.dataset], settings):
            stale.append(c)
    if stale:
        raise VlsegError(f"{case_dir(cache_dir, stale[0])}: preprocessing cache missing or out of date for case "
                         f"{stale[0].case_id!r} ({len(stale)} of {len(cases)} cases); run python -m "
                         f"data_prep.preprocess --manifest <manifest> (training does this itself)")
    try:
        return [_open(c, case_dir(cache_dir, c)) for c in cases]
    except (OSError, ValueError, KeyError) as exc:
        raise VlsegError(f"{cache_dir}: unreadable cache entry ({exc}); delete it and preprocess again") from None


def _verify_job(args) -> list[dict]:
    case, folder, spacing, settings = args
    from vlseg.io import load_label, load_scan

    problems = []

    def problem(file, text):
        problems.append({"case": case.case_id, "file": str(file), "problem": text})

    try:
        from vlseg.io import canonical_modality

        canonical_modality(case.modality, where=str(case.image))
        scan = load_scan(case.image)
        label = load_label(case.label, like=scan)
    except VlsegError as exc:
        file, sep, text = str(exc).partition(": ")
        problem(file if sep else case.image, text if sep else str(exc))
        return problems
    for name, values in case.classes.items():
        found = bool(np.isin(label, values).any())
        if found != case.present.get(name):
            problem(case.label, f"manifest says {name!r} is {'present' if case.present.get(name) else 'absent'}, "
                                f"the label says {'present' if found else 'absent'}")
    if case.boxes:
        actual = bounding_boxes(label, {n: case.classes[n] for n in case.boxes if n in case.classes})
        for name, box in case.boxes.items():
            if actual.get(name) != list(box):
                problem(case.label, f"manifest box of {name!r} is {box}, the label gives {actual.get(name)}")
    meta = _read_meta(folder)
    if meta is None:
        problem(folder, "not in the preprocessing cache (run python -m data_prep.preprocess)")
    elif meta.get("key") != _case_key(case, spacing, settings):
        problem(folder, "cache entry is out of date (sources or settings changed; run python -m data_prep.preprocess)")
    else:
        for name, dtype in (("image.npy", "float16"), ("label.npy", meta.get("label_dtype"))):
            try:
                arr = np.load(folder / name, mmap_mode="r")
                if list(arr.shape) != meta["shape"] or str(arr.dtype) != dtype:
                    problem(folder / name, f"expected {dtype} {meta['shape']}, found {arr.dtype} {list(arr.shape)}")
            except (OSError, ValueError) as exc:
                problem(folder / name, f"unreadable ({exc})")
        if not (folder / "foreground.npz").is_file():
            problem(folder / "foreground.npz", "missing")
    return problems


def verify_corpus(cases: list[Case], cache_dir, settings: dict, workers: int = 2, progress: bool = True) -> list:
    """Check every case and return every problem found (``{"case", "file", "problem"}``); stops at none."""
    plan = plan_corpus(cases, settings)
    jobs = [(c, case_dir(cache_dir, c), plan[c.dataset], settings) for c in cases]
    return [p for found in _run(_verify_job, jobs, int(workers), "verifying", progress) for p in found]
