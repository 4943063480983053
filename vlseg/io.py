"""Scans in and masks out, in the scan's own geometry.

The model works on RAS-canonical arrays (axis 0 runs from the patient's left towards the Right, 1 towards Anterior,
2 towards Superior, i.e. the world coordinate grows along each axis in the R, A, S directions).  ``load_scan`` brings
a NIfTI file, an NRRD/MetaImage file or a folder holding one DICOM series into that layout and remembers how;
``Scan.to_original`` and ``save_like`` undo it exactly, so every output (always NIfTI) lies voxel for voxel on the
input's grid.  Bad input of any kind becomes one ``VlsegError`` line naming the file and the problem.

Files are read eagerly and in full (gzip streams are decompressed to the end, so their CRC is checked): nibabel reads
lazily and only as many bytes as the header asks for, which lets a damaged stream pass unnoticed or fail much later.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from vlseg.atomic import atomic_path
from vlseg.errors import VlsegError, first_line, shape_str
from vlseg.itk_formats import ITK_SUFFIXES, is_dicom_series, read_dicom, read_itk

__all__ = ["Scan", "load_scan", "load_label", "save_like", "is_dicom_series", "resample_to_spacing",
           "resample_to_shape", "normalize_intensity", "MODALITIES"]

RAS = axcodes2ornt(("R", "A", "S"))
MODALITIES = {"CT": "CT", "MR": "MR", "MRI": "MR"}  # accepted spelling (upper-cased) → canonical name

_GZIP_MAGIC = b"\x1f\x8b"
_HEADER_SIZES = {348: nib.Nifti1Image, 540: nib.Nifti2Image}  # sizeof_hdr → single-file image class
_MIN_VOXEL_MM = 1e-6


@dataclass(eq=False)
class Scan:
    """A 3D scan on its RAS-canonical grid, plus what is needed to put results back onto the file's own grid."""

    data: np.ndarray = field(repr=False)  # float32 [X, Y, Z], RAS-canonical, slope/intercept applied
    affine: np.ndarray  # 4x4 voxel → world (mm) affine of ``data``
    spacing: tuple[float, float, float]  # voxel sizes of ``data`` along its axes, mm
    path: Path | None  # the file it came from; None for an in-memory image
    original_shape: tuple[int, int, int]  # spatial shape of the file's array
    original_affine: np.ndarray  # 4x4 affine of the file's array
    header: object | None = field(default=None, repr=False)  # the NIfTI file's header; None for NRRD/DICOM input
    original_ornt: np.ndarray | None = field(default=None, repr=False)  # io_orientation of the file's array

    def __post_init__(self):
        if self.original_ornt is None:
            self.original_ornt = io_orientation(self.original_affine)

    @property
    def name(self) -> str:
        """How messages refer to this scan."""
        return str(self.path) if self.path is not None else "<in-memory image>"

    @property
    def to_canonical_ornt(self) -> np.ndarray:
        """nibabel orientation transform: file array layout → canonical layout."""
        return ornt_transform(self.original_ornt, RAS)

    @property
    def to_original_ornt(self) -> np.ndarray:
        """nibabel orientation transform: canonical layout → file array layout."""
        return ornt_transform(RAS, self.original_ornt)

    def _map(self, arr, ornt, expected: tuple[int, ...], where: str) -> np.ndarray:
        arr = np.asarray(arr)
        if arr.ndim not in (3, 4) or tuple(arr.shape[-3:]) != tuple(expected):
            raise VlsegError(f"{self.name}: array of shape {shape_str(arr.shape)} is not on the {where} grid "
                             f"{shape_str(expected)} (expected [X, Y, Z] or channels-first [C, X, Y, Z])")
        if arr.ndim == 4:
            return np.ascontiguousarray(np.stack([apply_orientation(a, ornt) for a in arr]))
        return np.ascontiguousarray(apply_orientation(arr, ornt))

    def to_original(self, arr) -> np.ndarray:
        """Canonical-grid array ([X, Y, Z] or channels-first [C, X, Y, Z]) → the file's array layout."""
        return self._map(arr, self.to_original_ornt, self.data.shape, "scan's canonical")

    def to_canonical(self, arr) -> np.ndarray:
        """File-layout array ([X, Y, Z] or channels-first [C, X, Y, Z]) → the canonical grid (inverse of
        ``to_original``)."""
        return self._map(arr, self.to_canonical_ornt, self.original_shape, "file's original")


# ---------------------------------------------------------------------------------------------------------- reading


def _read_bytes(path: Path) -> bytes:
    """The file's NIfTI bytes, decompressed (and CRC-checked) when the content is gzip, whatever the name says."""
    if not path.exists():
        raise VlsegError(f"{path}: file not found")
    if not path.is_file():
        raise VlsegError(f"{path}: not a file (it is a directory)" if path.is_dir() else f"{path}: not a regular file")
    try:
        with open(path, "rb") as fh:
            compressed = fh.read(2) == _GZIP_MAGIC
            fh.seek(0)
            if not compressed:
                return fh.read()
            with gzip.GzipFile(fileobj=fh, mode="rb") as gz:
                return gz.read()
    except EOFError:
        raise VlsegError(f"{path}: truncated or corrupt gzip stream (file ends early)") from None
    except (gzip.BadGzipFile, zlib.error) as exc:
        raise VlsegError(f"{path}: truncated or corrupt gzip stream ({first_line(exc)})") from None
    except OSError as exc:
        raise VlsegError(f"{path}: cannot read ({exc.strerror or first_line(exc)})") from None


def _parse(raw: bytes, name: str):
    """Bytes of a single-file NIfTI-1/2 image → nibabel image (data not yet read)."""
    if not raw:
        raise VlsegError(f"{name}: not a NIfTI image (empty file)")
    if raw[128:132] == b"DICM":  # the DICOM preamble is 128 bytes, then this magic
        raise VlsegError(f"{name}: a single DICOM file; pass the folder holding the whole series")
    if len(raw) < 348:
        raise VlsegError(f"{name}: not a NIfTI image (only {len(raw)} bytes, shorter than a NIfTI header)")
    klass = None
    for order in ("<", ">"):
        klass = klass or _HEADER_SIZES.get(int(np.frombuffer(raw[:4], dtype=f"{order}i4")[0]))
    if klass is nib.Nifti1Image:
        magic = raw[344:348]
        if magic == b"ni1\x00":
            raise VlsegError(f"{name}: not a NIfTI image (a .hdr of a .hdr/.img pair; use a single .nii/.nii.gz)")
        if magic != b"n+1\x00":
            klass = None  # an Analyze 7.5 header has the same size but no magic
    elif klass is nib.Nifti2Image and (len(raw) < 540 or raw[4:8] != b"n+2\x00"):
        klass = None
    if klass is None:
        raise VlsegError(f"{name}: not a NIfTI image (no NIfTI header found)")
    try:
        return klass.from_bytes(raw)
    except Exception as exc:  # nibabel's header checks raise a variety of types for nonsense fields
        raise VlsegError(f"{name}: not a NIfTI image (invalid header: {first_line(exc)})") from None


def _spatial_shape(img, name: str) -> tuple[int, int, int]:
    """The 3D shape of the image; 4D+ is accepted only when every extra dimension is 1 (squeezed)."""
    shape = tuple(int(n) for n in img.shape)
    if len(shape) < 3 or any(n != 1 for n in shape[3:]):
        raise VlsegError(f"{name}: not a 3D image (shape {shape_str(shape)})")
    if any(n < 1 for n in shape[:3]):
        raise VlsegError(f"{name}: empty image (shape {shape_str(shape)})")
    return shape[:3]


def _check_size(img, raw_len: int, name: str) -> None:
    """Fail before reading when the file is shorter than the header's shape and data type need."""
    dtype = img.header.get_data_dtype()
    if dtype.kind not in "biuf":
        raise VlsegError(f"{name}: unsupported voxel data type {dtype} (need integers or reals)")
    offset = int(getattr(img.dataobj, "offset", img.header.get_data_offset()))
    need = offset + math.prod(img.shape) * dtype.itemsize
    if raw_len < need:
        raise VlsegError(f"{name}: truncated file (a {shape_str(img.shape)} {dtype} volume needs {need} bytes, "
                         f"found {raw_len})")


def _check_affine(affine: np.ndarray, name: str) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise VlsegError(f"{name}: degenerate affine (non-finite entries)")
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(zooms < _MIN_VOXEL_MM):
        raise VlsegError(f"{name}: degenerate affine (voxel sizes {[round(float(z), 6) for z in zooms]} mm)")
    # Columns that are (nearly) parallel leave the grid flat in world space: no orientation can be read from it.
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6 * float(np.prod(zooms)):
        raise VlsegError(f"{name}: degenerate affine (voxel axes are not independent)")
    return affine


def _read_voxels(img, name: str) -> np.ndarray:
    try:
        # get_fdata applies scl_slope / scl_inter; nibabel reads lazily, so this is where bad data surfaces.
        return np.asarray(img.get_fdata(dtype=np.float32))
    except VlsegError:
        raise
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise VlsegError(f"{name}: truncated or corrupt gzip stream ({first_line(exc)})") from None
    except MemoryError:
        raise VlsegError(f"{name}: image too large to load (shape {shape_str(img.shape)})") from None
    except Exception as exc:
        raise VlsegError(f"{name}: unreadable voxel data ({first_line(exc)})") from None


def load_scan(source) -> Scan:
    """A ``.nii``/``.nii.gz`` (or NRRD/MetaImage) path, a folder holding one DICOM series, a nibabel image or a
    ``Scan`` → validated RAS-canonical ``Scan``.  Outputs for NRRD or DICOM input are NIfTI files on the same world
    grid.

    A ``Scan`` is returned as is.  A nibabel image gets ``path=None`` (messages use its file name when it has one).
    """
    if isinstance(source, Scan):
        return source
    # Only a NIfTI header of the user's is kept for outputs; the one built here for NRRD/DICOM data says nothing the
    # affine does not, and without it ``save_like`` writes both a qform and an sform.
    own_header = True
    if isinstance(source, nib.spatialimages.SpatialImage):
        img, path = source, None
        name = source.get_filename() or "<in-memory image>"
        try:
            shape3 = _spatial_shape(img, name)
        except (AttributeError, TypeError) as exc:
            raise VlsegError(f"{name}: unusable image ({first_line(exc)})") from None
    elif isinstance(source, (str, os.PathLike)) and Path(source).expanduser().is_dir():
        path = Path(source).expanduser()
        name = str(path)
        img = read_dicom(path)  # every folder is taken for a DICOM series; read_dicom says what is wrong with it
        shape3 = _spatial_shape(img, name)
        own_header = False
    elif isinstance(source, (str, os.PathLike)) and Path(source).suffix.lower() in ITK_SUFFIXES:
        path = Path(source).expanduser()
        name = str(path)
        img = read_itk(path)
        shape3 = _spatial_shape(img, name)
        own_header = False
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        name = str(path)
        raw = _read_bytes(path)
        img = _parse(raw, name)
        shape3 = _spatial_shape(img, name)
        _check_size(img, len(raw), name)
        del raw
    else:
        raise VlsegError(f"load_scan: expected a .nii/.nii.gz path, a DICOM series folder, a nibabel image or a "
                         f"Scan, got {type(source).__name__}")

    affine = _check_affine(img.affine, name)
    data = _read_voxels(img, name).reshape(shape3)
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise VlsegError(f"{name}: {bad} voxels are NaN or infinite")

    original_ornt = io_orientation(affine)
    to_canonical = ornt_transform(original_ornt, RAS)
    canonical = np.ascontiguousarray(apply_orientation(data, to_canonical), dtype=np.float32)
    canonical_affine = affine @ inv_ornt_aff(to_canonical, shape3)
    spacing = tuple(float(z) for z in np.linalg.norm(canonical_affine[:3, :3], axis=0))
    header = img.header if own_header and isinstance(img.header, nib.Nifti1Header) else None
    return Scan(canonical, canonical_affine, spacing, path, shape3, affine, header, original_ornt)


def load_label(path, like: Scan | None = None) -> np.ndarray:
    """Integer (int32) label volume in canonical orientation.

    With ``like``, the label's canonical grid must be the scan's: same shape and affine (entries within 1e-3 mm).
    """
    label = load_scan(path)
    values = label.data
    rounded = np.rint(values)
    off = np.abs(values - rounded) > 1e-3
    if off.any():
        raise VlsegError(f"{label.name}: not a label map ({int(off.sum())} voxels are not whole numbers, "
                         f"e.g. {float(values[off][0]):g})")
    if like is not None:
        if label.data.shape != like.data.shape:
            raise VlsegError(f"{label.name}: label grid does not match image {like.name}: shape "
                             f"{shape_str(label.original_shape)} vs {shape_str(like.original_shape)}")
        diff = float(np.max(np.abs(label.affine - like.affine)))
        if diff > 1e-3:
            raise VlsegError(f"{label.name}: label grid does not match image {like.name}: affines differ by up to "
                             f"{diff:.4g} mm")
    return rounded.astype(np.int32)


# ---------------------------------------------------------------------------------------------------------- writing


def _output_header(scan: Scan) -> nib.Nifti1Header | None:
    """A copy of the scan's NIfTI-1 header with the fields that describe the old data (scaling, display range,
    intent, extensions) reset; the geometry fields (qform, sform, pixdim, units) are kept as they were."""
    src = scan.header
    if type(src) is not nib.Nifti1Header:  # NIfTI-2 or none: build a fresh header below
        return None
    hdr = src.copy()
    hdr.extensions.clear()
    hdr["cal_min"] = hdr["cal_max"] = 0.0
    hdr.set_intent("none")
    return hdr


def save_like(arr, scan: Scan, path, dtype=np.uint8) -> Path:
    """Write a canonical-grid 3D array as NIfTI in the scan's original shape, orientation and affine.

    The file is written under a temporary name in the same folder and moved into place with ``os.replace``, so
    readers never see a half-written file.  ``path`` must end in ``.nii`` or ``.nii.gz``.
    """
    path = Path(path).expanduser()
    lower = path.name.lower()
    if lower.endswith(".nii.gz"):
        suffix = ".nii.gz"
    elif lower.endswith(".nii"):
        suffix = ".nii"
    else:
        raise VlsegError(f"{path}: output name must end in .nii or .nii.gz")
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise VlsegError(f"{path}: can only write a 3D array, got shape {shape_str(arr.shape)}")
    if arr.shape != scan.data.shape:
        raise VlsegError(f"{path}: array of shape {shape_str(arr.shape)} is not on the scan's canonical grid "
                         f"{shape_str(scan.data.shape)} ({scan.name})")
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise VlsegError(f"{path}: unknown data type {dtype!r}") from None
    if dtype.kind in "iu" and arr.size:
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise VlsegError(f"{path}: array has NaN or infinite values; cannot store them as {dtype}")
        info = np.iinfo(dtype)
        lo, hi = arr.min(), arr.max()
        if lo < info.min or hi > info.max:
            raise VlsegError(f"{path}: values {lo}..{hi} do not fit in {dtype}")
    data = scan.to_original(arr).astype(dtype if dtype != np.bool_ else np.uint8, copy=False)

    header = _output_header(scan)
    affine = scan.original_affine
    try:
        # With the original header, nibabel keeps its qform/sform untouched as long as they give this affine.
        img = nib.Nifti1Image(data, affine, header=header)
        if header is None or not np.allclose(img.header.get_best_affine(), affine, atol=1e-6):
            codes = (int(scan.header["qform_code"]), int(scan.header["sform_code"])) if scan.header is not None \
                else (0, 0)
            img.header.set_sform(affine, code=codes[1] or 2)
            img.header.set_qform(affine, code=codes[0] or 1)
        img.set_data_dtype(data.dtype)
        img.header.set_slope_inter(1.0, 0.0)
    except Exception as exc:
        raise VlsegError(f"{path}: cannot write as NIfTI ({first_line(exc)})") from None

    try:
        with atomic_path(path, suffix=f".tmp{suffix}") as tmp:
            nib.save(img, tmp)
    except OSError as exc:
        raise VlsegError(f"{path}: cannot write ({exc.strerror or first_line(exc)})") from None
    return path


# ------------------------------------------------------------------------------------------------------- resampling


def positive_triple(values, what: str, where: str = "resample") -> tuple[float, float, float]:
    """Three finite positive numbers (a spacing, a shape), or a VlsegError saying ``where: what must be ...``."""
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(math.isfinite(v) and v > 0 for v in out):
        raise VlsegError(f"{where}: {what} must be 3 positive numbers, got {values!r}")
    return out


def _interpolate(data, shape, order: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    data = np.asarray(data)
    if data.ndim not in (3, 4):
        raise VlsegError(f"resample: expected a 3D [X, Y, Z] or channels-first 4D [C, X, Y, Z] array, "
                         f"got shape {shape_str(data.shape)}")
    if order not in (0, 1):
        raise VlsegError(f"resample: order must be 0 (nearest) or 1 (linear), got {order!r}")
    shape = tuple(int(round(s)) for s in positive_triple(shape, "shape"))
    if shape == tuple(data.shape[-3:]):
        return data.copy() if order == 0 else data.astype(np.float32)
    # torch's interpolate resamples all channels in one vectorised, multi-threaded call and is several times faster
    # than scipy.ndimage.zoom on 3D volumes.  Sizes are given explicitly with align_corners=False, so voxel centres
    # map the field of view onto itself (resampling to the training spacing and back returns to the same grid).
    # order 0 uses "nearest-exact" (centre-based rounding; plain "nearest" floors and shifts by half a voxel), which
    # only copies values, so label ids are kept.
    t = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    t = t[None, None] if data.ndim == 3 else t[None]
    if order == 1:
        out = F.interpolate(t, size=shape, mode="trilinear", align_corners=False)
    else:
        out = F.interpolate(t, size=shape, mode="nearest-exact")
    out = out[0, 0] if data.ndim == 3 else out[0]
    return out.numpy().astype(data.dtype if order == 0 else np.float32, copy=False)


def resample_to_shape(data, shape, order: int = 1) -> np.ndarray:
    """Resample the spatial (last three) axes of a 3D or channels-first 4D array to ``shape``.

    order 1: trilinear (float32 out); order 0: nearest (input dtype kept, values copied).
    """
    return _interpolate(data, shape, order)


def resample_to_spacing(data, spacing, target_spacing, order: int = 1) -> np.ndarray:
    """Resample from voxel size ``spacing`` to ``target_spacing`` (mm, per spatial axis); same field of view.

    Each axis gets ``round(n * spacing / target)`` voxels (at least 1); bring results back with
    ``resample_to_shape(result, original_shape)``.
    """
    data = np.asarray(data)
    spacing = positive_triple(spacing, "spacing")
    target = positive_triple(target_spacing, "target_spacing")
    if data.ndim not in (3, 4):
        raise VlsegError(f"resample: expected a 3D [X, Y, Z] or channels-first 4D [C, X, Y, Z] array, "
                         f"got shape {shape_str(data.shape)}")
    shape = [max(1, int(round(n * s / t))) for n, s, t in zip(data.shape[-3:], spacing, target)]
    return _interpolate(data, shape, order)


# ---------------------------------------------------------------------------------------------------- normalising


def canonical_modality(name, where: str = "") -> str:
    """"CT" or "MR" for any accepted spelling ("mri", "Ct" ...); else a one-line error (prefixed by ``where``)."""
    kind = MODALITIES.get(str(name).strip().upper())
    if kind is None:
        raise VlsegError(f"{where + ': ' if where else ''}modality {name!r}: unknown; use one of CT, MR")
    return kind


def intensity_window(window, what: str) -> tuple[float, float]:
    """``(low, high)`` as two finite floats with low < high, or a one-line error naming ``what``."""
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        lo = hi = float("nan")
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise VlsegError(f"{what} must be two finite numbers (low, high) with low < high, got {window!r}")
    return lo, hi


def normalize_intensity(data, modality: str, ct_window=(-200.0, 300.0)) -> np.ndarray:
    """Model-ready float32 intensities.

    CT: clip to ``ct_window`` (HU) and scale linearly to [-1, 1].  MR: clip to the 0.5–99.5 percentiles of the
    non-zero voxels, then z-score with the mean and standard deviation of those voxels (an all-zero image stays 0).
    ``modality`` is "CT" or "MR" in any case; "MRI" means MR.
    """
    kind = canonical_modality(modality)
    data = np.asarray(data, dtype=np.float32)
    if kind == "CT":
        lo, hi = intensity_window(ct_window, "ct_window")
        return ((np.clip(data, lo, hi) - lo) * (2.0 / (hi - lo)) - 1.0).astype(np.float32)
    foreground = data != 0
    values = data[foreground]
    if values.size == 0:
        return np.zeros_like(data, dtype=np.float32)
    lo, hi = np.percentile(values, [0.5, 99.5])
    clipped = np.clip(data, lo, hi)
    values = clipped[foreground].astype(np.float64)
    mean, std = float(values.mean()), float(values.std())
    return ((clipped - mean) / max(std, 1e-6)).astype(np.float32)
