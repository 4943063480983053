"""Reading the cache for training: ``open_cache`` opens every case's entry as memory maps (``CachedCase``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlseg.errors import VlsegError
from vlseg.prepare.cache.keys import RERUN, cache_jobs, case_key, entry_current, error_line, read_meta
from vlseg.prepare.manifest import Case


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
        raise VlsegError(f"{folder}: unreadable cache entry ({error_line(exc)}); delete this folder and "
                         f"{RERUN}") from None
    if image.shape != shape or label.shape != shape or image.dtype != np.float16:
        raise VlsegError(f"{folder}: cached arrays ({image.dtype} {list(image.shape)}, {label.dtype} "
                         f"{list(label.shape)}) do not match the recorded float16 {list(shape)}; {RERUN}")
    return CachedCase(case=case, image=image, label=label, spacing=spacing, boxes=boxes, foreground=foreground,
                      shape=shape, voxels=voxels, fill=fill)


def open_cache(cases: list[Case], cache_dir, settings: dict) -> list[CachedCase]:
    """Open every case's cache entry (memory maps), in the order of ``cases``.

    If any entry is missing or out of date (key or files), raises one VlsegError naming the first such case and how
    many there are, telling the user to run ``vlseg prepare cache``."""
    _, jobs = cache_jobs(cases, Path(cache_dir), settings)
    stale, metas = [], []
    for case, folder, spacing, _ in jobs:
        meta = read_meta(folder)
        if not entry_current(folder, meta, case_key(case, spacing, settings)):
            stale.append((case, folder, "missing" if meta is None else "out of date"))
        metas.append(meta)
    if stale:
        case, folder, why = stale[0]
        raise VlsegError(f"{folder}: preprocessing cache entry of case {case.case_id!r} is {why} ({len(stale)} of "
                         f"{len(cases)} cases missing or out of date); {RERUN}")
    return [_open_entry(case, folder, meta) for (case, folder, _, _), meta in zip(jobs, metas)]
