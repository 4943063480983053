"""``verify_corpus``: every problem of the raw files against the manifest, and of their cache entries."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vlseg.errors import VlsegError, split_error
from vlseg.prepare.cache.keys import RERUN, cache_jobs, case_key, error_line, read_meta
from vlseg.prepare.cache.pool import run_jobs
from vlseg.prepare.manifest import Case
from vlseg.transforms.boxes import class_boxes


class _Problems(list):
    """The problems found in one case, each ``{"case", "file", "problem"}``."""

    def __init__(self, case: Case):
        super().__init__()
        self.case = case

    def add(self, file, problem: str) -> None:
        self.append({"case": self.case.case_id, "file": str(file), "problem": problem})

    def attempt(self, fn, default_file):
        """``fn()``, or None with its one-line error recorded."""
        try:
            return fn()
        except VlsegError as exc:
            self.add(*split_error(exc, default_file))
            return None


def _check_sources(case: Case, found: _Problems):
    """The image and label files against the manifest; the label (canonical, on the image grid when it could be
    read) or None."""
    from vlseg.io.scan import canonical_modality, load_label, load_scan

    found.attempt(lambda: canonical_modality(case.modality, where=str(case.image)), case.image)
    scan = found.attempt(lambda: load_scan(case.image), case.image)
    if scan is None:  # the label can still be checked on its own
        return found.attempt(lambda: load_label(case.label), case.label)
    if tuple(scan.original_shape) != tuple(case.shape):
        found.add(case.image, f"shape {list(scan.original_shape)} differs from the manifest's {list(case.shape)}")
    if not np.allclose(scan.spacing, case.spacing, rtol=1e-3, atol=1e-4):
        found.add(case.image, f"spacing {[round(s, 4) for s in scan.spacing]} differs from the manifest's "
                              f"{list(case.spacing)}")
    if case.affine is not None and not np.allclose(scan.original_affine, np.asarray(case.affine), atol=1e-3):
        found.add(case.image, "affine differs from the manifest's (the image was replaced; convert it again)")
    return found.attempt(lambda: load_label(case.label, like=scan), case.label)


def _check_label(case: Case, label: np.ndarray, found: _Problems) -> None:
    """The manifest's ``present`` flags and ``boxes`` against the label."""
    actual = class_boxes(label, case.classes)
    for name in case.classes:
        there, said = name in actual, bool(case.present.get(name))
        if there != said:
            found.add(case.label, f"manifest says {name!r} is {'present' if said else 'absent'}, the label "
                                  f"{'contains' if there else 'does not contain'} it")
    if case.boxes or case.affine is not None:  # schema 2 always lists the boxes of the present classes
        for name in sorted(set(actual) | set(case.boxes)):
            if case.boxes.get(name) != actual.get(name):
                found.add(case.label, f"manifest box of {name!r} is {case.boxes.get(name)}, the label gives "
                                      f"{actual.get(name)}")


def _check_arrays(folder: Path, meta: dict, found: _Problems) -> None:
    """The entry's arrays: there, loadable, with the recorded shapes and dtypes, a finite image."""
    shape = meta.get("shape")
    for name, dtype in (("image.npy", "float16"), ("label.npy", meta.get("label_dtype"))):
        path = folder / name
        if not path.is_file():
            found.add(path, f"missing from the cache entry ({RERUN})")
            continue
        try:
            arr = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            found.add(path, f"unreadable cached array ({error_line(exc)})")
            continue
        if list(arr.shape) != shape or arr.dtype.name != dtype:
            found.add(path, f"cached array is {arr.dtype.name} {list(arr.shape)}, expected {dtype} {shape}")
        elif name == "image.npy" and not np.all(np.isfinite(arr)):
            found.add(path, "cached image has NaN or infinite values")
    path = folder / "foreground.npz"
    try:
        with np.load(path) as fg:
            missing = [n for n, k in (meta.get("foreground") or {}).items() if k not in fg.files]
        if missing:
            found.add(path, f"no foreground coordinates for {missing[0]!r}")
    except FileNotFoundError:
        found.add(path, f"missing from the cache entry ({RERUN})")
    except (OSError, ValueError) as exc:
        found.add(path, f"unreadable ({error_line(exc)})")


def _verify_job(args) -> list[dict]:
    """Worker: every problem of one case (raw files against the manifest, then its cache entry)."""
    case, folder, spacing, settings = args
    folder = Path(folder)
    found = _Problems(case)
    label = _check_sources(case, found)
    if label is not None:
        _check_label(case, label, found)
    meta = read_meta(folder)
    if meta is None:
        found.add(folder, f"not in the preprocessing cache ({RERUN})")
        return list(found)
    try:
        key = case_key(case, spacing, settings)
    except VlsegError:
        key = None  # a source is missing: already reported above
    if key is not None and meta.get("key") != key:
        found.add(folder / "meta.json", f"cache entry is out of date (its sources or the settings changed; {RERUN})")
    _check_arrays(folder, meta, found)
    return list(found)


def verify_corpus(cases: list[Case], cache_dir, settings: dict, workers: int = 2, progress: bool = True) -> list[dict]:
    """Check every case and return every problem found, each ``{"case", "file", "problem"}`` (empty: all good).

    Per case: the raw image and label readable and finite, the label on the image grid, the image's shape, spacing
    and affine as the manifest says, the manifest's ``present`` flags and ``boxes`` (native canonical grid) against
    the label, and the cache entry present, up to date and loadable with the recorded shapes and dtypes."""
    _, jobs = cache_jobs(cases, Path(cache_dir), settings)
    found = run_jobs(_verify_job, jobs, workers, "verifying", progress)
    return [p for problems in found for p in problems]
