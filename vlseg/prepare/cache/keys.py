"""What a cache entry depends on, where it lives, and whether it is up to date.

``meta.json`` holds a SHA-256 key over the format version, the settings that shape the case (canonical modality, the
CT window for CT, the planned spacing, the class table) and the absolute path, size and ``mtime_ns`` of every source
file (each file of a DICOM series folder; the data file beside an ``.mhd``/``.nhdr`` header).  An entry is up to date
when its key matches and its arrays are there with the recorded shapes and dtypes: a changed CT window or spacing, or a
touched or replaced source file, makes that case's entry stale and no other.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from vlseg.config import DataSection
from vlseg.errors import VlsegError
from vlseg.prepare.cache.plan import ct_window, plan_corpus
from vlseg.prepare.manifest import Case

FORMAT_VERSION = 2
# What a message about a missing or stale cache entry tells the user to run.
RERUN = "run vlseg prepare cache --manifest <manifest> (with the training config) to bring it up to date"


def default_cache_dir(manifest_path) -> Path:
    """``<manifest folder>/cache``."""
    return Path(manifest_path).expanduser().absolute().parent / "cache"


def cache_settings(data: DataSection) -> dict:
    """The settings of a config's ``data`` section that a cache entry depends on."""
    return {"ct_window": list(data.ct_window), "target_spacing": data.target_spacing,
            "spacing_per_dataset": dict(data.spacing_per_dataset), "intensity": data.intensity}


def cache_location(data: DataSection) -> Path:
    """``data.cache``, else ``<manifest folder>/cache``."""
    return Path(data.cache) if data.cache else default_cache_dir(data.manifest)


def case_dir(cache_dir, case: Case) -> Path:
    """Where a case lives in the cache: ``<cache>/<dataset>/<case_id>``."""
    return Path(cache_dir) / case.dataset / case.case_id


def cache_jobs(cases: list[Case], cache_dir, settings: dict) -> tuple[dict, list]:
    """(the spacing plan, one ``(case, entry folder, planned spacing, settings)`` per case); a one-line error for a
    case id listed twice or unusable settings."""
    ids = {}
    for c in cases:
        if c.case_id in ids:
            raise VlsegError(f"{c.case_id}: duplicate case id in the case list")
        ids[c.case_id] = c
    plan = plan_corpus(cases, settings)
    return plan, [(c, case_dir(cache_dir, c), plan[c.dataset], settings) for c in cases]


def relevant_settings(case: Case, spacing) -> dict:
    """What shapes a case's cached arrays and meta, besides its source files (the CT window is added for CT)."""
    from vlseg.io.scan import canonical_modality

    modality = canonical_modality(case.modality, where=str(case.image))
    return {"modality": modality, "spacing": None if spacing is None else [float(v) for v in spacing],
            "classes": {str(k): [int(v) for v in vals] for k, vals in sorted(case.classes.items())}}


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
    relevant = relevant_settings(case, spacing)
    if relevant["modality"] == "CT":
        relevant["ct_window"] = list(ct_window(settings))
    if settings.get("intensity", "vlseg") != "vlseg":  # (absent by default, so caches built before it stay valid)
        relevant["intensity"] = settings["intensity"]
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


def read_meta(folder: Path) -> dict | None:
    """An entry's ``meta.json``; None when missing or unreadable."""
    try:
        meta = json.loads((Path(folder) / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def array_header(path: Path):
    """(shape, dtype) of an .npy file from its header; None when missing, unreadable, or shorter than its header says
    (the cases in which mapping it would fail).  Only the header is read: no memory map is made."""
    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = reader(f)
            offset, size = f.tell(), os.fstat(f.fileno()).st_size
    except (OSError, ValueError):
        return None
    if dtype.hasobject or size < offset + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        return None
    return tuple(int(n) for n in shape), dtype


def entry_headers(folder: Path, meta: dict):
    """(image header, label header) when the entry's files are there with the shapes and dtypes its meta records
    (headers only; cheap), else None."""
    try:
        shape = tuple(int(n) for n in meta["shape"])
        label_dtype = np.dtype(meta["label_dtype"])
    except (KeyError, TypeError, ValueError):
        return None
    image = array_header(folder / "image.npy")
    if image != (shape, np.dtype(np.float16)):
        return None
    label = array_header(folder / "label.npy")
    if label != (shape, label_dtype) or not (folder / "foreground.npz").is_file():
        return None
    return image, label


def entry_complete(folder: Path, meta: dict) -> bool:
    """The entry's files are there with the shapes and dtypes its meta records (headers only; cheap)."""
    return entry_headers(folder, meta) is not None


def entry_current(folder: Path, meta: dict | None, key: str) -> bool:
    """The entry in ``folder`` (its ``meta``, None when missing) has ``key`` and is complete."""
    return meta is not None and meta.get("key") == key and entry_complete(folder, meta)


def up_to_date(case: Case, folder: Path, spacing, settings: dict) -> tuple[bool, str]:
    """(whether the entry is current, the case's key).  Raises VlsegError for a missing source."""
    key = case_key(case, spacing, settings)
    return entry_current(folder, read_meta(folder), key), key


def error_line(exc: BaseException) -> str:
    """``"<type>: <first line>"`` of an exception from numpy or the file system, for a one-line problem."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
