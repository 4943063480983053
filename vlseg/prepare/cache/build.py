"""The preprocessing cache: each case brought once into the form the model trains on and stored as memory-mappable
arrays, so that a training crop reads only the voxels it needs instead of a whole NIfTI.

Layout (``<cache>`` defaults to ``<manifest folder>/cache``)::

    <cache>/plan.json                       spacing per dataset and the settings of the last run
    <cache>/report.json                     the last run: written / skipped case ids, errors {case, file, problem}
    <cache>/<dataset>/<case_id>/image.npy       float16 [X, Y, Z], RAS-canonical, normalised, resampled
    <cache>/<dataset>/<case_id>/label.npy       uint8 [X, Y, Z] (uint16 when a label value exceeds 255), same grid
    <cache>/<dataset>/<case_id>/foreground.npz  per present class up to 20 000 voxel coordinates [N, 3]
    <cache>/<dataset>/<case_id>/meta.json       format, key, shape, spacing, classes, boxes, voxel counts ...

How a case is made: ``load_scan`` / ``load_label(like=scan)`` (RAS canonical, label on the image grid),
``normalize_intensity`` (CT: ``ct_window`` clipped and scaled to [-1, 1]; MR: percentile clip and z-score), then
``resample_to_spacing`` to the dataset's planned spacing (image linear, label nearest).  ``meta.json`` records per
class present on the cached grid its box ``[x0, y0, z0, x1, y1, z1]`` (end exclusive) and voxel count; the
foreground coordinates are a deterministic sample (sorted, without replacement) when a class has more voxels.

Spacing plan (``plan_corpus``), from ``settings["target_spacing"]``:

* ``None`` — every case keeps its native (canonical) spacing; the plan holds ``None`` for the dataset;
* ``[x, y, z]`` — that spacing for every dataset;
* ``"auto"`` — per dataset, nnU-Net's rule (``plan_spacing``) over that dataset's training-split cases among those
  given (all its given cases when none is in the training split);

``settings["spacing_per_dataset"]`` (dataset → ``[x, y, z]``) overrides single datasets; entries naming a dataset
that has no case in the list are ignored, so one config serves every split.  The spacing recorded for a resampled
case is the planned one (the grid has ``round(n * native / planned)`` voxels over the same field of view).

Keys and idempotence: ``meta.json`` holds a SHA-256 key over the format version, the settings that shape the case
(canonical modality, the CT window for CT, the planned spacing, the class table) and the absolute path, size and
``mtime_ns`` of every source file (each file of a DICOM series folder; the data file beside an ``.mhd``/``.nhdr``
header).  A run skips a case whose key matches and whose arrays are there with the recorded shape, and rewrites it
otherwise: a changed CT window or spacing, or a touched or replaced source file, rewrites that case only.

Atomicity: a case is written into a hidden temporary folder beside its final place and renamed into place (an
existing entry is first renamed aside, then removed), so an interrupted run leaves either the old complete entry,
the new complete entry, or no entry — never half a case.  Temporary folders left by a crashed process are removed by
the next run that writes the same case.  Case folders of cases no longer in the manifest are left alone (another
manifest or split may share the cache); delete the cache folder to reclaim them.

Failures: a case whose files cannot be read (``VlsegError``: missing file, NaN voxels, label on another grid, ...) is
recorded in the report with its file and problem; the other cases are still processed.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import tempfile
import time
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from vlseg.atomic import atomic_path
from vlseg.errors import VlsegError
from vlseg.prepare.manifest import Case, bounding_boxes

__all__ = ["FORMAT_VERSION", "MAX_FOREGROUND", "CachedCase", "default_cache_dir", "case_dir", "plan_spacing",
           "plan_corpus", "preprocess_corpus", "verify_corpus", "open_cache"]

FORMAT_VERSION = 2
MAX_FOREGROUND = 20_000  # foreground coordinates kept per class
ANISOTROPY = 3.0  # nnU-Net: anisotropic when the coarsest median spacing exceeds 3x the finest
COARSE_PERCENTILE = 10.0
RERUN = "run python -m data_prep.preprocess --manifest <manifest> (with the training config) to bring it up to date"


def default_cache_dir(manifest_path) -> Path:
    """``<manifest folder>/cache``."""
    return Path(manifest_path).expanduser().absolute().parent / "cache"


def case_dir(cache_dir, case: Case) -> Path:
    """Where a case lives in the cache: ``<cache>/<dataset>/<case_id>``."""
    return Path(cache_dir) / case.dataset / case.case_id


# ------------------------------------------------------------------------------------------------------------ plans


def _spacing_triple(value, what: str) -> list[float]:
    try:
        out = [float(v) for v in value]
    except (TypeError, ValueError):
        out = []
    if len(out) != 3 or not all(np.isfinite(v) and v > 0 for v in out):
        raise VlsegError(f"{what} must be three positive numbers (mm), got {value!r}")
    return out


def plan_spacing(spacings: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """nnU-Net's target spacing for one dataset.

    The per-axis median of the cases' spacings.  When the dataset is anisotropic — the largest of the three medians
    is more than ``ANISOTROPY`` (3) times the smallest — the coarse axis (the one with the largest median) takes the
    10th percentile of its spacings instead of the median: a finer grid along that axis, so that the cases with thin
    slices do not lose most of their resolution there to the thick-slice majority (nnU-Net's rationale).  Example:
    medians (0.7, 0.7, 5.0) are anisotropic (5.0 / 0.7 > 3), so z becomes the 10th percentile of the z spacings.
    """
    rows = [_spacing_triple(s, "plan_spacing: each spacing") for s in spacings]
    if not rows:
        raise VlsegError("plan_spacing: no spacings to plan from (no cases)")
    arr = np.asarray(rows, dtype=np.float64)
    target = np.median(arr, axis=0)
    if target.max() / target.min() > ANISOTROPY:
        coarse = int(np.argmax(target))
        target[coarse] = np.percentile(arr[:, coarse], COARSE_PERCENTILE)
    return tuple(float(v) for v in target)


def _check_settings(settings: dict) -> None:
    from vlseg.transforms.intensity import intensity_window

    if not isinstance(settings, dict):
        raise VlsegError(f"preprocessing settings must be a mapping, got {type(settings).__name__}")
    intensity_window(settings.get("ct_window", (-200.0, 300.0)), "data.ct_window")
    per_dataset = settings.get("spacing_per_dataset") or {}
    if not isinstance(per_dataset, dict):
        raise VlsegError(f"data.spacing_per_dataset must map dataset names to [x, y, z], got {per_dataset!r}")
    for name, value in per_dataset.items():
        _spacing_triple(value, f"data.spacing_per_dataset.{name}")


def plan_corpus(cases: list[Case], settings: dict) -> dict[str, list[float] | None]:
    """Dataset → the spacing its cases are cached at, ``None`` meaning each case's own native spacing.

    See the module docstring for ``target_spacing`` (None / [x, y, z] / "auto") and ``spacing_per_dataset``."""
    _check_settings(settings)
    target = settings.get("target_spacing")
    per_dataset = settings.get("spacing_per_dataset") or {}
    if isinstance(target, str) and target.strip().lower() != "auto":
        raise VlsegError(f"data.target_spacing must be null, \"auto\" or three numbers (mm), got {target!r}")
    fixed = None if target is None or isinstance(target, str) else _spacing_triple(target, "data.target_spacing")
    plan: dict[str, list[float] | None] = {}
    for dataset in sorted({c.dataset for c in cases}):
        if dataset in per_dataset:
            plan[dataset] = _spacing_triple(per_dataset[dataset], f"data.spacing_per_dataset.{dataset}")
        elif target is None:
            plan[dataset] = None
        elif fixed is not None:
            plan[dataset] = list(fixed)
        else:
            mine = [c for c in cases if c.dataset == dataset]
            train = [c for c in mine if c.split == "train"]
            plan[dataset] = list(plan_spacing([c.spacing for c in (train or mine)]))
    return plan


def _relevant_settings(case: Case, spacing) -> dict:
    """What shapes a case's cached arrays and meta, besides its source files."""
    from vlseg.io.scan import canonical_modality

    modality = canonical_modality(case.modality, where=str(case.image))
    return {"modality": modality, "spacing": None if spacing is None else [float(v) for v in spacing],
            "classes": {str(k): [int(v) for v in vals] for k, vals in sorted(case.classes.items())}}


# -------------------------------------------------------------------------------------------------------------- keys


def _source_files(path: Path) -> list[Path]:
    """The files whose content makes up ``path``: itself, every file of a DICOM folder, or a header's data file."""
    path = Path(path)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.is_file())
    if not path.exists():
        raise VlsegError(f"{path}: file not found")
    files = [path]
    if path.suffix.lower() in (".mhd", ".nhdr"):  # detached headers: the voxel data lies in a sibling file
        files += sorted(p for p in path.parent.glob(f"{path.stem}.*") if p != path and p.is_file())
    return files


def case_key(case: Case, spacing, settings: dict) -> str:
    """The cache key of ``case`` at ``spacing`` under ``settings`` (see the module docstring)."""
    from vlseg.transforms.intensity import intensity_window

    relevant = _relevant_settings(case, spacing)
    if relevant["modality"] == "CT":
        relevant["ct_window"] = list(intensity_window(settings.get("ct_window", (-200.0, 300.0)), "data.ct_window"))
    sources = []
    for role, path in (("image", case.image), ("label", case.label)):
        for f in _source_files(Path(path)):
            try:
                st = f.stat()
            except OSError as exc:
                raise VlsegError(f"{f}: cannot read ({exc.strerror or exc})") from None
            sources.append([role, os.path.abspath(f), int(st.st_size), int(st.st_mtime_ns)])
    text = json.dumps({"format": FORMAT_VERSION, "settings": relevant, "sources": sources}, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------------------------------ one case


def _read_meta(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _array_header(path: Path):
    """(shape, dtype) of an .npy file, mapped but not read; None when missing or unreadable."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return None
    return tuple(int(n) for n in arr.shape), arr.dtype


def _entry_complete(folder: Path, meta: dict) -> bool:
    """The entry's files are there with the shapes and dtypes its meta records (headers only; cheap)."""
    try:
        shape = tuple(int(n) for n in meta["shape"])
        label_dtype = np.dtype(meta["label_dtype"])
    except (KeyError, TypeError, ValueError):
        return False
    return (_array_header(folder / "image.npy") == (shape, np.dtype(np.float16))
            and _array_header(folder / "label.npy") == (shape, label_dtype)
            and (folder / "foreground.npz").is_file())


def _class_stats(label: np.ndarray, classes: dict[str, list[int]], case_id: str):
    """Per class present in ``label``: box (end exclusive), voxel count and up to MAX_FOREGROUND coordinates."""
    from scipy import ndimage

    top = int(label.max()) if label.size else 0
    counts = np.bincount(label.ravel(), minlength=top + 1) if top else np.zeros(1, np.int64)
    slices = ndimage.find_objects(label) if top else []  # slices[v - 1]: bounding slices of value v
    coord_dtype = np.int16 if max(label.shape) <= np.iinfo(np.int16).max else np.int32
    boxes, voxels, foreground = {}, {}, {}
    for name, values in classes.items():
        vals = [int(v) for v in values if 0 < int(v) <= top and counts[int(v)]]
        if not vals:
            continue
        lo = np.min([[s.start for s in slices[v - 1]] for v in vals], axis=0)
        hi = np.max([[s.stop for s in slices[v - 1]] for v in vals], axis=0)
        box = [*map(int, lo), *map(int, hi)]
        region = label[box[0]:box[3], box[1]:box[4], box[2]:box[5]]
        flat = np.flatnonzero(np.isin(region, vals))
        n = int(flat.size)
        if n > MAX_FOREGROUND:
            rng = np.random.default_rng(zlib.crc32(f"{case_id}\0{name}".encode("utf-8")))
            flat = flat[np.sort(rng.choice(n, MAX_FOREGROUND, replace=False))]
        coords = np.stack(np.unravel_index(flat, region.shape), axis=1) + np.asarray(lo)
        boxes[name], voxels[name], foreground[name] = box, n, coords.astype(coord_dtype)
    return boxes, voxels, foreground


def compute_case(case: Case, spacing, settings: dict):
    """The cached form of one case, in memory: (float16 image, label, meta without key).  Raises VlsegError."""
    from vlseg.io.scan import load_label, load_scan
    from vlseg.transforms.intensity import normalize_intensity
    from vlseg.transforms.spatial import resample_to_spacing

    relevant = _relevant_settings(case, spacing)
    scan = load_scan(case.image)
    label = load_label(case.label, like=scan)
    image = normalize_intensity(scan.data, relevant["modality"], tuple(settings.get("ct_window", (-200.0, 300.0))))
    if spacing is not None:
        image = resample_to_spacing(image, scan.spacing, spacing, order=1)
        label = resample_to_spacing(label, scan.spacing, spacing, order=0)
        out_spacing = [float(v) for v in spacing]
    else:
        out_spacing = [float(v) for v in scan.spacing]
    lo, hi = (int(label.min()), int(label.max())) if label.size else (0, 0)
    if lo < 0 or hi > np.iinfo(np.uint16).max:
        raise VlsegError(f"{case.label}: label values must lie in 0..65535, found {lo}..{hi}")
    label = label.astype(np.uint8 if hi <= 255 else np.uint16)
    image16 = image.astype(np.float16)
    if not np.all(np.isfinite(image16)):
        raise VlsegError(f"{case.image}: normalised intensities overflow float16 (max |value| "
                         f"{float(np.abs(image).max()):.4g})")
    boxes, voxels, foreground = _class_stats(label, case.classes, case.case_id)
    meta = {"format": FORMAT_VERSION, "case_id": case.case_id, "dataset": case.dataset,
            "modality": relevant["modality"], "shape": [int(n) for n in image16.shape], "spacing": out_spacing,
            "native_spacing": [float(v) for v in scan.spacing], "label_dtype": label.dtype.name,
            "image_min": float(image16.min()), "classes": relevant["classes"], "boxes": boxes, "voxels": voxels,
            "foreground": {name: f"c{i}" for i, name in enumerate(foreground)},
            "image": str(case.image), "label": str(case.label)}
    return image16, label, foreground, meta


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_leftovers(parent: Path, case_id: str) -> None:
    """Temporary folders of this case left behind by a process that no longer runs."""
    if not parent.is_dir():
        return
    pattern = re.compile(rf"\.{re.escape(case_id)}\.tmp(\d+)-(old-)?[a-z0-9_]+")
    for p in parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and (int(m.group(1)) == os.getpid() or not _pid_alive(int(m.group(1)))):
            shutil.rmtree(p, ignore_errors=True)


def _write_case(folder: Path, image16, label, foreground, meta: dict) -> None:
    """Write the entry into a temporary folder beside ``folder`` and rename it into place."""
    parent = folder.parent
    parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(parent, folder.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp{os.getpid()}-", dir=parent))
    try:
        np.save(tmp / "image.npy", image16)
        np.save(tmp / "label.npy", label)
        np.savez(tmp / "foreground.npz", **{meta["foreground"][name]: arr for name, arr in foreground.items()})
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")  # last: marks it complete
        os.chmod(tmp, 0o777 & ~_umask())
        if folder.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp{os.getpid()}-old-", dir=parent))
            os.replace(folder, old)  # onto the empty folder just made
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _split_error(exc: VlsegError, default_file) -> tuple[str, str]:
    """A "<file>: <problem>" message → (file, problem)."""
    text = str(exc)
    file, sep, problem = text.partition(": ")
    return (file, problem) if sep and file else (str(default_file), text)


def _up_to_date(case: Case, folder: Path, spacing, settings: dict) -> tuple[bool, str]:
    """(whether the entry is current, the case's key).  Raises VlsegError for a missing source."""
    key = case_key(case, spacing, settings)
    meta = _read_meta(folder)
    return meta is not None and meta.get("key") == key and _entry_complete(folder, meta), key


def _preprocess_job(args) -> dict:
    """Worker: bring one case up to date.  → {"case", "status": written|skipped|error, ["file", "problem"]}."""
    case, folder, spacing, settings = args
    folder = Path(folder)
    try:
        current, key = _up_to_date(case, folder, spacing, settings)
        if current:
            return {"case": case.case_id, "status": "skipped"}
        image16, label, foreground, meta = compute_case(case, spacing, settings)
        meta["key"] = key
        try:
            _write_case(folder, image16, label, foreground, meta)
        except OSError as exc:
            raise VlsegError(f"{folder}: cannot write the cache entry ({exc.strerror or exc})") from None
        return {"case": case.case_id, "status": "written"}
    except VlsegError as exc:
        file, problem = _split_error(exc, case.image)
        return {"case": case.case_id, "status": "error", "file": file, "problem": problem}


# ---------------------------------------------------------------------------------------------------- parallelism


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


def _mp_context():
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([__name__])  # no effect once the server runs; then workers import it themselves
        return ctx
    return multiprocessing.get_context("spawn")


def _run_jobs(fn, jobs: list, workers: int, desc: str, progress: bool) -> list:
    """``fn`` over ``jobs``, results in job order; ``workers`` processes (0 or 1: in this process), progress bar.

    Workers are not forked from this process: a fork of a process whose OpenMP/torch thread pools have run can hang
    in the child.  They come from multiprocessing's fork server, which imports this module (and torch) once, so that
    starting workers costs ~1.5 s the first time in a process and almost nothing afterwards; where there is no fork
    server (Windows) they are spawned."""
    workers = int(workers)
    if workers < 0:
        raise VlsegError(f"workers must be 0 or more, got {workers}")
    bar = tqdm(total=len(jobs), desc=desc, unit="case", disable=not progress or not jobs)
    try:
        if workers <= 1 or len(jobs) <= 1:
            results = []
            for job in jobs:
                results.append(fn(job))
                bar.update(1)
            return results
        workers = min(workers, len(jobs))
        threads = max(1, (os.cpu_count() or 1) // workers)
        results = [None] * len(jobs)
        with ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context(),
                                 initializer=_worker_init, initargs=(threads,)) as pool:
            futures = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
            try:
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.update(1)
            except BrokenProcessPool:
                case = jobs[next((i for f, i in futures.items() if not f.done() or f.exception() is not None), 0)][0]
                raise VlsegError(f"{case.image}: a {desc} worker process ended abruptly on this or another case "
                                 f"(out of memory? see any messages above); retry with fewer workers or "
                                 f"workers=0") from None
        return results
    finally:
        bar.close()


def _jobs(cases: list[Case], cache_dir: Path, settings: dict) -> tuple[dict, list]:
    ids = {}
    for c in cases:
        if c.case_id in ids:
            raise VlsegError(f"{c.case_id}: duplicate case id in the case list")
        ids[c.case_id] = c
    plan = plan_corpus(cases, settings)
    return plan, [(c, case_dir(cache_dir, c), plan[c.dataset], settings) for c in cases]


def _settings_record(settings: dict) -> dict:
    return {"ct_window": [float(v) for v in settings.get("ct_window", (-200.0, 300.0))],
            "target_spacing": settings.get("target_spacing"),
            "spacing_per_dataset": {str(k): [float(v) for v in s]
                                    for k, s in (settings.get("spacing_per_dataset") or {}).items()}}


def _write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def preprocess_corpus(cases: list[Case], cache_dir, settings: dict, workers: int = 2, progress: bool = True) -> dict:
    """Bring every case's cache entry up to date; returns the report (also written to ``<cache>/report.json``)::

        {"written": [case ids], "skipped": [case ids], "errors": [{"case", "file", "problem"}], "seconds": float}

    A failing case never stops the others.  ``workers`` processes (0 or 1: this process)."""
    t0 = time.perf_counter()
    cache_dir = Path(cache_dir)
    plan, jobs = _jobs(cases, cache_dir, settings)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VlsegError(f"{cache_dir}: cannot create the cache folder ({exc.strerror or exc})") from None
    # Up-to-date entries are recognised here (file stats and .npy headers only), so a run with nothing to do
    # starts no worker process; the workers recheck before they write.
    results: list = [None] * len(jobs)
    todo = []
    for i, (case, folder, spacing, _) in enumerate(jobs):
        try:
            if _up_to_date(case, folder, spacing, settings)[0]:
                results[i] = {"case": case.case_id, "status": "skipped"}
                continue
        except VlsegError:
            pass  # the job reports it
        todo.append(i)
    for i, r in zip(todo, _run_jobs(_preprocess_job, [jobs[i] for i in todo], workers, "preprocessing", progress)):
        results[i] = r
    report = {"written": [], "skipped": [], "errors": []}
    for r in results:
        if r["status"] == "error":
            report["errors"].append({"case": r["case"], "file": r["file"], "problem": r["problem"]})
        else:
            report[r["status"]].append(r["case"])
    report["seconds"] = round(time.perf_counter() - t0, 3)
    _write_json(cache_dir / "plan.json", {"format": FORMAT_VERSION, "spacing": plan,
                                          "settings": _settings_record(settings)})
    _write_json(cache_dir / "report.json", report)
    return report


# ---------------------------------------------------------------------------------------------------- verification


def _verify_job(args) -> list[dict]:
    """Worker: every problem of one case (raw files against the manifest, then its cache entry)."""
    from vlseg.io.scan import canonical_modality, load_label, load_scan

    case, folder, spacing, settings = args
    folder = Path(folder)
    problems: list[dict] = []

    def add(file, problem):
        problems.append({"case": case.case_id, "file": str(file), "problem": problem})

    def attempt(fn, default_file):
        try:
            return fn()
        except VlsegError as exc:
            add(*_split_error(exc, default_file))
            return None

    attempt(lambda: canonical_modality(case.modality, where=str(case.image)), case.image)
    scan = attempt(lambda: load_scan(case.image), case.image)
    if scan is not None:
        if tuple(scan.original_shape) != tuple(case.shape):
            add(case.image, f"shape {list(scan.original_shape)} differs from the manifest's {list(case.shape)}")
        if not np.allclose(scan.spacing, case.spacing, rtol=1e-3, atol=1e-4):
            add(case.image, f"spacing {[round(s, 4) for s in scan.spacing]} differs from the manifest's "
                            f"{list(case.spacing)}")
        if case.affine is not None and not np.allclose(scan.original_affine, np.asarray(case.affine), atol=1e-3):
            add(case.image, "affine differs from the manifest's (the image was replaced; convert it again)")
        label = attempt(lambda: load_label(case.label, like=scan), case.label)
    else:  # the label can still be checked on its own
        label = attempt(lambda: load_label(case.label), case.label)

    if label is not None:
        actual = bounding_boxes(label, case.classes)
        for name in case.classes:
            found, said = name in actual, bool(case.present.get(name))
            if found != said:
                add(case.label, f"manifest says {name!r} is {'present' if said else 'absent'}, the label "
                                f"{'contains' if found else 'does not contain'} it")
        if case.boxes or case.affine is not None:  # schema 2 always lists the boxes of the present classes
            for name in sorted(set(actual) | set(case.boxes)):
                if case.boxes.get(name) != actual.get(name):
                    add(case.label, f"manifest box of {name!r} is {case.boxes.get(name)}, the label gives "
                                    f"{actual.get(name)}")

    meta = _read_meta(folder)
    if meta is None:
        add(folder, "not in the preprocessing cache (run python -m data_prep.preprocess)")
        return problems
    try:
        key = case_key(case, spacing, settings)
    except VlsegError:
        key = None  # a source is missing: already reported above
    if key is not None and meta.get("key") != key:
        add(folder / "meta.json", "cache entry is out of date (its sources or the settings changed; "
                                  "run python -m data_prep.preprocess)")
    shape = meta.get("shape")
    for name, dtype in (("image.npy", "float16"), ("label.npy", meta.get("label_dtype"))):
        path = folder / name
        if not path.is_file():
            add(path, "missing from the cache entry (run python -m data_prep.preprocess)")
            continue
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            add(path, f"unreadable cached array ({_first_line(exc)})")
            continue
        if list(arr.shape) != shape or arr.dtype.name != dtype:
            add(path, f"cached array is {arr.dtype.name} {list(arr.shape)}, expected {dtype} {shape}")
        elif name == "image.npy" and not np.all(np.isfinite(arr)):
            add(path, "cached image has NaN or infinite values")
    path = folder / "foreground.npz"
    try:
        with np.load(path) as fg:
            missing = [n for n, k in (meta.get("foreground") or {}).items() if k not in fg.files]
        if missing:
            add(path, f"no foreground coordinates for {missing[0]!r}")
    except FileNotFoundError:
        add(path, "missing from the cache entry (run python -m data_prep.preprocess)")
    except (OSError, ValueError) as exc:
        add(path, f"unreadable ({_first_line(exc)})")
    return problems


def verify_corpus(cases: list[Case], cache_dir, settings: dict, workers: int = 2, progress: bool = True) -> list[dict]:
    """Check every case and return every problem found, each ``{"case", "file", "problem"}`` (empty: all good).

    Per case: the raw image and label readable and finite, the label on the image grid, the image's shape, spacing
    and affine as the manifest says, the manifest's ``present`` flags and ``boxes`` (native canonical grid) against
    the label, and the cache entry present, up to date and loadable with the recorded shapes and dtypes."""
    cache_dir = Path(cache_dir)
    _, jobs = _jobs(cases, cache_dir, settings)
    found = _run_jobs(_verify_job, jobs, workers, "verifying", progress)
    return [p for problems in found for p in problems]


# -------------------------------------------------------------------------------------------------------- reading


@dataclass
class CachedCase:
    """One case opened from the cache: the arrays are memory maps, so a crop reads only its region's pages."""

    case: Case
    image: np.ndarray = field(repr=False)  # float16 [X, Y, Z] memmap
    label: np.ndarray = field(repr=False)  # uint8 / uint16 [X, Y, Z] memmap
    spacing: tuple[float, float, float]
    boxes: dict[str, list[int]]  # present class → [x0, y0, z0, x1, y1, z1] on the cached grid, end exclusive
    foreground: dict[str, np.ndarray] = field(repr=False)  # present class → voxel coordinates [N, 3]
    shape: tuple[int, int, int] = ()
    voxels: dict[str, int] = field(default_factory=dict)  # present class → voxel count
    fill: float = -1.0  # the image's minimum: padding outside the volume

    def __post_init__(self):
        if not self.shape:
            self.shape = tuple(int(n) for n in self.image.shape)

    def crop(self, starts, size) -> tuple[np.ndarray, np.ndarray]:
        """The region ``[starts, starts + size)`` as (float32 image, label), read from the memory maps; where it
        leaves the volume the image is padded with its minimum and the label with 0."""
        size = tuple(int(s) for s in size)
        starts = tuple(int(s) for s in starts)
        if len(size) != 3 or len(starts) != 3 or min(size) < 1:
            raise VlsegError(f"crop: need 3 starts and 3 positive sizes, got starts {list(starts)}, size {list(size)}")
        image = np.full(size, self.fill, dtype=np.float32)
        label = np.zeros(size, dtype=self.label.dtype)
        src, dst = [], []
        for st, n, total in zip(starts, size, self.shape):
            lo, hi = max(st, 0), min(st + n, total)
            if hi <= lo:
                return image, label  # entirely outside
            src.append(slice(lo, hi))
            dst.append(slice(lo - st, hi - st))
        image[tuple(dst)] = self.image[tuple(src)]
        label[tuple(dst)] = self.label[tuple(src)]
        return image, label

    def class_mask(self, label_region: np.ndarray, name: str) -> np.ndarray:
        """Boolean mask of class ``name`` (the union of its label values, ``case.classes[name]``)."""
        return self.case.class_mask(label_region, name)


def _open_entry(case: Case, folder: Path, meta: dict) -> CachedCase:
    try:
        image = np.load(folder / "image.npy", mmap_mode="r")
        label = np.load(folder / "label.npy", mmap_mode="r")
        with np.load(folder / "foreground.npz") as fg:
            foreground = {name: fg[key] for name, key in meta["foreground"].items()}
        shape = tuple(int(n) for n in meta["shape"])
        spacing = tuple(float(v) for v in meta["spacing"])
        boxes = {str(k): [int(v) for v in b] for k, b in meta["boxes"].items()}
        voxels = {str(k): int(v) for k, v in meta.get("voxels", {}).items()}
        fill = float(meta["image_min"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VlsegError(f"{folder}: unreadable cache entry ({_first_line(exc)}); delete this folder and "
                         f"{RERUN}") from None
    if image.shape != shape or label.shape != shape or image.dtype != np.float16:
        raise VlsegError(f"{folder}: cached arrays ({image.dtype} {list(image.shape)}, {label.dtype} "
                         f"{list(label.shape)}) do not match the recorded float16 {list(shape)}; {RERUN}")
    return CachedCase(case=case, image=image, label=label, spacing=spacing, boxes=boxes, foreground=foreground,
                      shape=shape, voxels=voxels, fill=fill)


def open_cache(cases: list[Case], cache_dir, settings: dict) -> list[CachedCase]:
    """Open every case's cache entry (memory maps), in the order of ``cases``.

    If any entry is missing or out of date (key or files), raises one VlsegError naming the first such case and how
    many there are, telling the user to run ``python -m data_prep.preprocess``."""
    cache_dir = Path(cache_dir)
    _, jobs = _jobs(cases, cache_dir, settings)
    stale, metas = [], []
    for case, folder, spacing, _ in jobs:
        meta = _read_meta(folder)
        if meta is None or meta.get("key") != case_key(case, spacing, settings) or not _entry_complete(folder, meta):
            stale.append((case, folder, "missing" if meta is None else "out of date"))
        metas.append(meta)
    if stale:
        case, folder, why = stale[0]
        raise VlsegError(f"{folder}: preprocessing cache entry of case {case.case_id!r} is {why} ({len(stale)} of "
                         f"{len(cases)} cases missing or out of date); {RERUN}")
    return [_open_entry(case, folder, meta) for (case, folder, _, _), meta in zip(jobs, metas)]
