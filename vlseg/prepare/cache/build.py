"""Computing and writing cache entries: ``preprocess_corpus`` brings every case's entry up to date.

How a case is made: ``load_scan`` / ``load_label(like=scan)`` (RAS canonical, label on the image grid), then the
model's frame (``vlseg.transforms.frame``: CT window or MR z-score, resampled to the dataset's planned spacing, image
linear and label nearest).  ``meta.json`` records per class present on the cached grid its box ``[x0, y0, z0, x1, y1,
z1]`` (end exclusive) and voxel count; the foreground coordinates are a deterministic sample (sorted, without
replacement) when a class has more than ``MAX_FOREGROUND`` voxels.

Atomicity: a case is written into a hidden temporary folder beside its final place and renamed into place (an
existing entry is first renamed aside, then removed), so an interrupted run leaves either the old complete entry,
the new complete entry, or no entry — never half a case.  Temporary folders left by a crashed process are removed by
the next run that writes the same case.  Case folders of cases no longer in the manifest are left alone (another
manifest or split may share the cache); delete the cache folder to reclaim them.

Failures: a case whose files cannot be read (``VlsegError``: missing file, NaN voxels, label on another grid, ...) is
recorded in the report with its file and problem; the other cases are still processed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from vlseg.atomic import atomic_path
from vlseg.errors import VlsegError, split_error
from vlseg.prepare.cache.keys import FORMAT_VERSION, cache_jobs, relevant_settings, up_to_date
from vlseg.prepare.cache.plan import ct_window, settings_record
from vlseg.prepare.cache.pool import run_jobs
from vlseg.prepare.manifest import Case
from vlseg.transforms.boxes import class_boxes

MAX_FOREGROUND = 20_000  # foreground coordinates kept per class


def _class_stats(label: np.ndarray, classes: dict[str, list[int]], case_id: str):
    """Per class present in ``label``: box (end exclusive), voxel count and up to MAX_FOREGROUND coordinates."""
    coord_dtype = np.int16 if max(label.shape) <= np.iinfo(np.int16).max else np.int32
    boxes = class_boxes(label, classes)
    voxels, foreground = {}, {}
    for name, box in boxes.items():
        region = label[box[0]:box[3], box[1]:box[4], box[2]:box[5]]
        flat = np.flatnonzero(np.isin(region, [int(v) for v in classes[name] if int(v) > 0]))
        n = int(flat.size)
        if n > MAX_FOREGROUND:
            rng = np.random.default_rng(zlib.crc32(f"{case_id}\0{name}".encode("utf-8")))
            flat = flat[np.sort(rng.choice(n, MAX_FOREGROUND, replace=False))]
        coords = np.stack(np.unravel_index(flat, region.shape), axis=1) + np.asarray(box[:3])
        voxels[name], foreground[name] = n, coords.astype(coord_dtype)
    return boxes, voxels, foreground


def compute_case(case: Case, spacing, settings: dict):
    """The cached form of one case, in memory: (float16 image, label, foreground, meta without key).  Raises
    VlsegError."""
    from vlseg.io.scan import load_label, load_scan
    from vlseg.transforms.frame import to_model_frame

    relevant = relevant_settings(case, spacing)
    scan = load_scan(case.image)
    label = load_label(case.label, like=scan)
    image, frame = to_model_frame(scan, relevant["modality"], ct_window(settings), spacing,
                                  settings.get("intensity", "vlseg"))
    label = frame.label(label)
    lo, hi = (int(label.min()), int(label.max())) if label.size else (0, 0)
    if lo < 0 or hi > np.iinfo(np.uint16).max:
        raise VlsegError(f"{case.label}: label values must lie in 0..65535, found {lo}..{hi}")
    label = label.astype(np.uint8 if hi <= 255 else np.uint16)
    image16 = image.astype(np.float16)
    if not np.all(np.isfinite(image16)):
        raise VlsegError(f"{case.image}: normalised intensities overflow float16 (max |value| "
                         f"{float(np.abs(image).max()):.4g})")
    foreground, meta = entry_meta(case, relevant, image16, label, frame.spacing, scan.spacing)
    return image16, label, foreground, meta


def entry_meta(case: Case, relevant: dict, image16: np.ndarray, label: np.ndarray, spacing, native_spacing):
    """(foreground coordinates, meta without key) of a case's cached arrays: ``image16`` and ``label`` on the cached
    grid of ``spacing``; ``relevant`` is ``relevant_settings(case, planned spacing)``."""
    boxes, voxels, foreground = _class_stats(label, case.classes, case.case_id)
    meta = {"format": FORMAT_VERSION, "case_id": case.case_id, "dataset": case.dataset,
            "modality": relevant["modality"], "shape": [int(n) for n in image16.shape],
            "spacing": [float(v) for v in spacing], "native_spacing": [float(v) for v in native_spacing],
            "label_dtype": label.dtype.name, "image_min": float(image16.min()), "classes": relevant["classes"],
            "boxes": boxes, "voxels": voxels, "foreground": {name: f"c{i}" for i, name in enumerate(foreground)},
            "image": str(case.image), "label": str(case.label)}
    return foreground, meta


# ---------------------------------------------------------------------------------------------------------- writing


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_case(folder: Path, image16, label, foreground, meta: dict) -> None:
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


def _write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------------------ the corpus


def _preprocess_job(args) -> dict:
    """Worker: bring one case up to date.  → {"case", "status": written|skipped|error, ["file", "problem"]}."""
    case, folder, spacing, settings = args
    folder = Path(folder)
    try:
        current, key = up_to_date(case, folder, spacing, settings)
        if current:
            return {"case": case.case_id, "status": "skipped"}
        image16, label, foreground, meta = compute_case(case, spacing, settings)
        meta["key"] = key
        try:
            write_case(folder, image16, label, foreground, meta)
        except OSError as exc:
            raise VlsegError(f"{folder}: cannot write the cache entry ({exc.strerror or exc})") from None
        return {"case": case.case_id, "status": "written"}
    except VlsegError as exc:
        file, problem = split_error(exc, case.image)
        return {"case": case.case_id, "status": "error", "file": file, "problem": problem}


def _stale(jobs: list) -> list[int]:
    """Indices of the jobs whose entry is not up to date (file stats and .npy headers only, so a run with nothing to
    do starts no worker process; the workers recheck before they write)."""
    todo = []
    for i, (case, folder, spacing, settings) in enumerate(jobs):
        try:
            if up_to_date(case, folder, spacing, settings)[0]:
                continue
        except VlsegError:
            pass  # the job reports it
        todo.append(i)
    return todo


def preprocess_corpus(cases: list[Case], cache_dir, settings: dict, workers: int = 2, progress: bool = True) -> dict:
    """Bring every case's cache entry up to date; returns the report (also written to ``<cache>/report.json``)::

        {"written": [case ids], "skipped": [case ids], "errors": [{"case", "file", "problem"}], "seconds": float}

    A failing case never stops the others.  ``workers`` processes (0 or 1: this process)."""
    t0 = time.perf_counter()
    cache_dir = Path(cache_dir)
    plan, jobs = cache_jobs(cases, cache_dir, settings)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VlsegError(f"{cache_dir}: cannot create the cache folder ({exc.strerror or exc})") from None
    results: list = [{"case": case.case_id, "status": "skipped"} for case, *_ in jobs]
    todo = _stale(jobs)
    for i, r in zip(todo, run_jobs(_preprocess_job, [jobs[i] for i in todo], workers, "preprocessing", progress)):
        results[i] = r
    report = {"written": [], "skipped": [], "errors": []}
    for r in results:
        if r["status"] == "error":
            report["errors"].append({"case": r["case"], "file": r["file"], "problem": r["problem"]})
        else:
            report[r["status"]].append(r["case"])
    report["seconds"] = round(time.perf_counter() - t0, 3)
    _write_json(cache_dir / "plan.json", {"format": FORMAT_VERSION, "spacing": plan,
                                          "settings": settings_record(settings)})
    _write_json(cache_dir / "report.json", report)
    return report
