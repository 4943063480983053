"""Reading the cache for training: ``open_cache`` opens every case's entry as memory maps (``CachedCase``)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from vlseg.errors import VlsegError
from vlseg.prepare.cache.keys import (
    RERUN,
    cache_jobs,
    case_key,
    entry_headers,
    error_line,
    read_meta,
)
from vlseg.prepare.manifest import Case
from vlseg.prepare.tables import Interner, Rows


class Foreground(Mapping):
    """Per present class, its voxel coordinates ``[N, 3]``, read from the entry's ``foreground.npz`` when asked for:
    an opened corpus holds the class names only, not every case's coordinates (up to 20 000 per class).  ``names[i]``
    is stored as archive member ``members[i]`` (both tuples, shared between cases where equal)."""

    __slots__ = ("folder", "names", "members")

    def __init__(self, folder: Path, names: tuple, members: tuple):
        self.folder, self.names, self.members = folder, names, members  # folder: the CachedCase's own Path

    @property
    def path(self) -> Path:
        return self.folder / "foreground.npz"

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            member = self.members[self.names.index(name)]
        except ValueError:
            raise KeyError(name) from None  # a class the case does not contain, as a dict
        try:
            with np.load(self.path) as fg:
                return fg[member]
        except (OSError, ValueError, KeyError) as exc:
            raise VlsegError(f"{self.folder}: unreadable cache entry ({error_line(exc)}); delete this folder "
                             f"and {RERUN}") from None

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name) -> bool:
        return name in self.names

    def __reduce__(self):
        return Foreground, (self.folder, self.names, self.members)


class CachedCase:
    """One case opened from the cache: its arrays are memory-mapped when read, so a crop reads only its region's pages.

    An opened corpus holds no open file per case (a mapping keeps its file open, and a process may hold only so many:
    a SAT-sized corpus has 44 000 arrays): ``image`` and ``label`` map the entry's arrays afresh at each access, and
    the mapping closes when dropped.  Built with arrays (``folder`` None), the case holds them."""

    def __init__(self, case: Case, image: np.ndarray | None, label: np.ndarray | None, spacing, boxes: dict,
                 foreground, shape=(), voxels: dict | None = None, fill: float = -1.0, folder: Path | None = None,
                 label_dtype=None):
        self.case, self._image, self._label, self.folder = case, image, label, folder
        self.spacing = spacing
        self.boxes = boxes  # present class → [x0, y0, z0, x1, y1, z1] on the cached grid, end exclusive
        self.foreground = foreground  # present class → voxel coordinates [N, 3]
        self.shape = tuple(shape) if shape else tuple(int(n) for n in self.image.shape)
        self.voxels = voxels if voxels is not None else {}  # present class → voxel count
        self.fill = fill  # the image's minimum: padding outside the volume
        self.label_dtype = np.dtype(label_dtype) if label_dtype is not None else self.label.dtype

    def _array(self, held, name: str) -> np.ndarray:
        if held is not None:
            return held
        try:
            return np.load(self.folder / name, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise VlsegError(f"{self.folder}: unreadable cache entry ({error_line(exc)}); delete this folder and "
                             f"{RERUN}") from None

    @property
    def image(self) -> np.ndarray:
        """float16 [X, Y, Z] (a memory map of a cache entry)."""
        return self._array(self._image, "image.npy")

    @property
    def label(self) -> np.ndarray:
        """uint8 / uint16 [X, Y, Z] (a memory map of a cache entry)."""
        return self._array(self._label, "label.npy")

    def __repr__(self) -> str:
        return (f"CachedCase(case={self.case.case_id!r}, shape={self.shape}, spacing={self.spacing}, "
                f"folder={str(self.folder) if self.folder else None!r})")

    def crop(self, starts, size) -> tuple[np.ndarray, np.ndarray]:
        """The region ``[starts, starts + size)`` as (float32 image, label), read from the memory maps; where it
        leaves the volume the image is padded with its minimum and the label with 0."""
        size = tuple(int(s) for s in size)
        starts = tuple(int(s) for s in starts)
        if len(size) != 3 or len(starts) != 3 or min(size) < 1:
            raise VlsegError(f"crop: need 3 starts and 3 positive sizes, got starts {list(starts)}, size {list(size)}")
        image = np.full(size, self.fill, dtype=np.float32)
        label = np.zeros(size, dtype=self.label_dtype)
        src, dst = [], []
        for st, n, total in zip(starts, size, self.shape):
            lo, hi = max(st, 0), min(st + n, total)
            if hi <= lo:
                return image, label  # entirely outside
            src.append(slice(lo, hi))
            dst.append(slice(lo - st, hi - st))
        image[tuple(dst)] = self.image[tuple(src)]  # each access maps the array, reads the region, drops the map
        label[tuple(dst)] = self.label[tuple(src)]
        return image, label

    def class_mask(self, label_region: np.ndarray, name: str) -> np.ndarray:
        """Boolean mask of class ``name`` (the union of its label values, ``case.classes[name]``)."""
        return self.case.class_mask(label_region, name)


def _open_entry(case: Case, folder: Path, meta: dict, headers: tuple, share: Interner) -> CachedCase:
    """The entry's ``CachedCase``; ``headers``: its arrays' (shape, dtype), as checked by ``entry_headers``."""
    image, label = headers
    try:
        with np.load(folder / "foreground.npz") as fg:
            members = {sys.intern(str(name)): str(key) for name, key in meta["foreground"].items()}
            missing = [key for key in members.values() if key not in fg.files]
            if missing:
                raise KeyError(f"{missing[0]} is not a file in the archive")
        foreground = Foreground(folder, share.names(tuple(members)), share.names(tuple(members.values())))
        shape = tuple(int(n) for n in meta["shape"])
        spacing = tuple(float(v) for v in meta["spacing"])
        boxes = Rows.of({sys.intern(str(k)): [int(v) for v in b] for k, b in meta["boxes"].items()}, share, width=6)
        voxels = Rows.of({sys.intern(str(k)): int(v) for k, v in meta.get("voxels", {}).items()}, share)
        fill = float(meta["image_min"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VlsegError(f"{folder}: unreadable cache entry ({error_line(exc)}); delete this folder and "
                         f"{RERUN}") from None
    (image_shape, image_dtype), (label_shape, label_dtype) = image, label
    if image_shape != shape or label_shape != shape or image_dtype != np.float16:
        raise VlsegError(f"{folder}: cached arrays ({image_dtype} {list(image_shape)}, {label_dtype} "
                         f"{list(label_shape)}) do not match the recorded float16 {list(shape)}; {RERUN}")
    return CachedCase(case=case, image=None, label=None, spacing=spacing, boxes=boxes, foreground=foreground,
                      shape=shape, voxels=voxels, fill=fill, folder=folder, label_dtype=label_dtype)


def open_cache(cases: list[Case], cache_dir, settings: dict) -> list[CachedCase]:
    """Open every case's cache entry (memory maps), in the order of ``cases``.

    If any entry is missing or out of date (key or files), raises one VlsegError naming the first such case and how
    many there are, telling the user to run ``vlseg prepare cache``."""
    _, jobs = cache_jobs(cases, Path(cache_dir), settings)
    stale, found = [], []
    for case, folder, spacing, _ in jobs:
        meta = read_meta(folder)
        key = case_key(case, spacing, settings)  # (a missing source file: its one-line error, entry or not)
        current = meta is not None and meta.get("key") == key
        headers = entry_headers(folder, meta) if current else None  # the arrays' headers, read once
        if headers is None:
            stale.append((case, folder, "missing" if meta is None else "out of date"))
        found.append((meta, headers))
    if stale:
        case, folder, why = stale[0]
        raise VlsegError(f"{folder}: preprocessing cache entry of case {case.case_id!r} is {why} ({len(stale)} of "
                         f"{len(cases)} cases missing or out of date); {RERUN}")
    share = Interner()  # name tuples shared between cases, and with the manifest's boxes where equal
    for case in cases:
        share.adopt(case.boxes)
    return [_open_entry(case, folder, meta, headers, share)
            for (case, folder, _, _), (meta, headers) in zip(jobs, found)]
