"""Scans in and masks out, in the scan's own geometry.

The model works on RAS-canonical arrays (axis 0 → patient Left, 1 → Anterior, 2 → Superior); every output is mapped
back to the input file's array layout and written with its affine.  Bad input becomes one ``VlsegError`` line naming
the file and the problem.
"""

from __future__ import annotations

import gzip
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from vlseg.errors import VlsegError

RAS = axcodes2ornt(("R", "A", "S"))
MODALITIES = {"CT": "CT", "MR": "MR", "MRI": "MR"}


@dataclass
class Scan:
    data: np.ndarray  # float32, RAS-canonical
    affine: np.ndarray  # affine of the canonical array
    spacing: tuple[float, float, float]
    path: Path | None
    original_shape: tuple[int, int, int]
    original_affine: np.ndarray
    header: object | None
    to_canonical_ornt: np.ndarray  # original array layout → canonical

    @property
    def name(self) -> str:
        return self.path.name if self.path else "<image>"

    def to_original(self, arr: np.ndarray) -> np.ndarray:
        """Canonical-grid array (3D, or channels-first 4D) → the input file's array layout."""
        back = ornt_transform(RAS, io_orientation(self.original_affine))
        if arr.ndim == 4:
            return np.stack([apply_orientation(a, back) for a in arr])
        return apply_orientation(arr, back)


def _gzip_intact(path: Path) -> bool:
    if path.suffix != ".gz":
        return True
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 20):
                pass
        return True
    except (EOFError, OSError, zlib.error):
        return False


def _read(path: Path, what: str) -> nib.Nifti1Image:
    if not path.exists():
        raise VlsegError(f"{path}: file not found")
    if not path.is_file():
        raise VlsegError(f"{path}: not a file")
    try:
        img = nib.load(str(path))
        img.get_fdata(dtype=np.float32)  # nibabel reads lazily: force the read so corrupt data fails here
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise VlsegError(f"{path}: truncated or corrupt gzip stream ({exc})") from None
    except nib.filebasedimages.ImageFileError:
        if not _gzip_intact(path):  # a cut .gz fails as "unknown format" when the cut is inside the header
            raise VlsegError(f"{path}: truncated or corrupt gzip stream") from None
        raise VlsegError(f"{path}: not a NIfTI {what} (unrecognised file format)") from None
    except (OSError, ValueError, MemoryError) as exc:
        raise VlsegError(f"{path}: unreadable {what} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return img


def _squeeze_3d(img: nib.Nifti1Image, name: str) -> nib.Nifti1Image:
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        return nib.Nifti1Image(np.asarray(img.dataobj)[..., 0], img.affine, img.header)
    if len(shape) != 3:
        raise VlsegError(f"{name}: not a 3D image (shape {'x'.join(map(str, shape))})")
    return img


def load_scan(source) -> Scan:
    """A path, a ``nibabel`` image or a ``Scan`` → validated RAS-canonical ``Scan``."""
    if isinstance(source, Scan):
        return source
    if isinstance(source, nib.spatialimages.SpatialImage):
        img, path = source, None
    else:
        path = Path(source)
        img = _read(path, "image")
    name = str(path) if path else "<image>"
    img = _squeeze_3d(img, name)
    affine = np.asarray(img.affine, dtype=np.float64)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.all(np.isfinite(affine)) or np.any(zooms < 1e-6):
        raise VlsegError(f"{name}: degenerate affine (voxel sizes {np.round(zooms, 4).tolist()})")
    ornt = ornt_transform(io_orientation(affine), RAS)
    data = apply_orientation(np.asarray(img.get_fdata(dtype=np.float32)), ornt)
    bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise VlsegError(f"{name}: {bad} voxels are NaN or infinite")
    canon_affine = affine @ nib.orientations.inv_ornt_aff(ornt, img.shape)
    spacing = tuple(float(z) for z in np.linalg.norm(canon_affine[:3, :3], axis=0))
    return Scan(np.ascontiguousarray(data, dtype=np.float32), canon_affine, spacing, path, tuple(img.shape), affine,
                img.header, ornt)


def load_label(path, like: Scan | None = None) -> np.ndarray:
    """Integer label volume in canonical orientation; with ``like``, its grid must be the scan's."""
    path = Path(path)
    label = load_scan(path)
    if like is not None:
        if label.data.shape != like.data.shape or not np.allclose(label.affine, like.affine, atol=1e-3):
            raise VlsegError(f"{path}: label grid {label.original_shape} does not match image {like.name} "
                             f"{like.original_shape} (shape or affine differ)")
    return np.rint(label.data).astype(np.int32)


def save_like(arr: np.ndarray, scan: Scan, path, dtype=np.uint8) -> Path:
    """Write a canonical-grid array in the scan's original shape, orientation and affine (atomically)."""
    path = Path(path)
    data = np.ascontiguousarray(scan.to_original(np.asarray(arr)).astype(dtype))
    header = scan.header.copy() if isinstance(scan.header, nib.Nifti1Header) else None
    img = nib.Nifti1Image(data, scan.original_affine, header)
    if header is not None:
        img.set_qform(scan.original_affine, int(header["qform_code"]) or 1)
        img.set_sform(scan.original_affine, int(header["sform_code"]) or 1)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=path.parent)
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _interpolate(data: np.ndarray, shape, order: int) -> np.ndarray:
    # torch's interpolate is a single vectorised call for all channels (scipy's zoom loops per channel and is several
    # times slower on 3D volumes); order 0 is nearest, which keeps label values.
    t = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    t = t[None, None] if data.ndim == 3 else t[None]
    mode = "trilinear" if order == 1 else "nearest-exact"
    out = F.interpolate(t, size=tuple(int(s) for s in shape), mode=mode,
                        **({"align_corners": False} if order == 1 else {}))
    out = out[0, 0] if data.ndim == 3 else out[0]
    return out.numpy().astype(data.dtype if order == 0 else np.float32)


def resample_to_shape(data: np.ndarray, shape, order: int = 1) -> np.ndarray:
    return _interpolate(data, shape, order)


def resample_to_spacing(data: np.ndarray, spacing, target_spacing, order: int = 1) -> np.ndarray:
    spatial = data.shape[-3:]
    shape = [max(1, int(round(n * s / t))) for n, s, t in zip(spatial, spacing, target_spacing)]
    return data if list(shape) == list(spatial) else _interpolate(data, shape, order)


def normalize_intensity(data: np.ndarray, modality: str, ct_window=(-200.0, 300.0)) -> np.ndarray:
    """CT: clip to the window, scale to [-1, 1].  MR: clip to the 0.5–99.5 percentiles of non-zero voxels, z-score."""
    kind = MODALITIES.get(str(modality).upper())
    if kind is None:
        raise VlsegError(f"modality {modality!r}: unknown; use one of CT, MR")
    if kind == "CT":
        lo, hi = float(ct_window[0]), float(ct_window[1])
        return ((np.clip(data, lo, hi) - lo) / (hi - lo) * 2.0 - 1.0).astype(np.float32)
    fg = data[data != 0]
    if fg.size == 0:
        return np.zeros_like(data, dtype=np.float32)
    lo, hi = np.percentile(fg, [0.5, 99.5])
    clipped = np.clip(data, lo, hi)
    vals = clipped[data != 0]
    return ((clipped - vals.mean()) / max(float(vals.std()), 1e-6)).astype(np.float32)
