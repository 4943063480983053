"""Scans in and masks out, in the scan's own geometry.

The model works on RAS-canonical arrays (axis 0 runs from the patient's left towards the Right, 1 towards Anterior,
2 towards Superior, i.e. the world coordinate grows along each axis in the R, A, S directions).  ``load_scan`` brings
any input the table of scan formats reads (``vlseg.io.readers``: a NIfTI file, an NRRD/MetaImage file, a folder
holding one DICOM series) into that layout and remembers how; ``Scan.to_original`` and ``save_like`` undo it exactly,
so every output (always NIfTI) lies voxel for voxel on the input's grid.  Bad input of any kind becomes one
``VlsegError`` line naming the file and the problem.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from vlseg.errors import VlsegError, first_line, shape_str
from vlseg.io.readers import find_reader, spatial_shape

RAS = axcodes2ornt(("R", "A", "S"))
MODALITIES = {"CT": "CT", "MR": "MR", "MRI": "MR"}  # accepted spelling (upper-cased) → canonical name


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

_MIN_VOXEL_MM = 1e-6


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
    """A path the table of scan formats reads (``.nii``/``.nii.gz``, NRRD/MetaImage, a folder holding one DICOM
    series: ``vlseg.io.readers``), a nibabel image or a ``Scan`` → validated RAS-canonical ``Scan``.  Outputs for
    other formats than NIfTI are NIfTI files on the same world grid.

    A ``Scan`` is returned as is.  A nibabel image gets ``path=None`` (messages use its file name when it has one).
    """
    if isinstance(source, Scan):
        return source
    if isinstance(source, nib.spatialimages.SpatialImage):
        return _to_canonical(source, None, source.get_filename() or "<in-memory image>", keeps_header=True)
    if not isinstance(source, (str, os.PathLike)):
        raise VlsegError(f"load_scan: expected a .nii/.nii.gz path, a DICOM series folder, a nibabel image or a "
                         f"Scan, got {type(source).__name__}")
    path = Path(source).expanduser()
    reader = find_reader(path)
    return _to_canonical(reader.read(path), path, str(path), reader.keeps_header)


def _to_canonical(img, path: Path | None, name: str, keeps_header: bool) -> Scan:
    """What every scan must pass, whatever its format (3D, a usable affine, finite voxels), and the step to the
    RAS-canonical grid.  Only a NIfTI header of the user's is kept for outputs (``keeps_header``): one built by a
    reader says nothing the affine does not, and without it ``save_like`` writes both a qform and an sform."""
    try:
        shape3 = spatial_shape(img, name)
        affine = _check_affine(img.affine, name)
    except (AttributeError, TypeError) as exc:
        raise VlsegError(f"{name}: unusable image ({first_line(exc)})") from None
    data = _read_voxels(img, name).reshape(shape3)
    bad = int(data.size - np.count_nonzero(np.isfinite(data)))
    if bad:
        raise VlsegError(f"{name}: {bad} voxels are NaN or infinite")

    original_ornt = io_orientation(affine)
    to_canonical = ornt_transform(original_ornt, RAS)
    canonical = np.ascontiguousarray(apply_orientation(data, to_canonical), dtype=np.float32)
    canonical_affine = affine @ inv_ornt_aff(to_canonical, shape3)
    spacing = tuple(float(z) for z in np.linalg.norm(canonical_affine[:3, :3], axis=0))
    header = img.header if keeps_header and isinstance(img.header, nib.Nifti1Header) else None
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


def crop_scan(scan: Scan, lo, hi) -> Scan:
    """The box ``[lo, hi)`` of a scan's canonical grid as an in-memory scan of its own: its affine is the scan's moved
    to the box's first voxel, so each kept voxel keeps its world position (outputs of the crop lie on the scan)."""
    lo, hi = np.asarray(lo, dtype=int), np.asarray(hi, dtype=int)
    if lo.shape != (3,) or hi.shape != (3,) or np.any(lo < 0) or np.any(hi > scan.data.shape) or np.any(hi <= lo):
        raise VlsegError(f"{scan.name}: crop box {lo.tolist()}..{hi.tolist()} is not inside its grid "
                         f"{shape_str(scan.data.shape)}")
    data = np.ascontiguousarray(scan.data[tuple(slice(a, b) for a, b in zip(lo, hi))])
    affine = scan.affine.copy()
    affine[:3, 3] = scan.affine[:3, :3] @ lo + scan.affine[:3, 3]
    return Scan(data, affine, scan.spacing, None, tuple(data.shape), affine.copy())


# --------------------------------------------------------------------------------------------------------- modality


def canonical_modality(name, where: str = "") -> str:
    """"CT" or "MR" for any accepted spelling ("mri", "Ct" ...); else a one-line error (prefixed by ``where``)."""
    kind = MODALITIES.get(str(name).strip().upper())
    if kind is None:
        raise VlsegError(f"{where + ': ' if where else ''}modality {name!r}: unknown; use one of CT, MR")
    return kind


