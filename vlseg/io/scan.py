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

import os
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from vlseg.errors import VlsegError, first_line, shape_str
from vlseg.io.itk import ITK_SUFFIXES, is_dicom_series, read_dicom, read_itk
from vlseg.io.nifti import _MIN_VOXEL_MM, _check_size, _parse, _read_bytes, _read_voxels

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


def _spatial_shape(img, name: str) -> tuple[int, int, int]:
    """The 3D shape of the image; 4D+ is accepted only when every extra dimension is 1 (squeezed)."""
    shape = tuple(int(n) for n in img.shape)
    if len(shape) < 3 or any(n != 1 for n in shape[3:]):
        raise VlsegError(f"{name}: not a 3D image (shape {shape_str(shape)})")
    if any(n < 1 for n in shape[:3]):
        raise VlsegError(f"{name}: empty image (shape {shape_str(shape)})")
    return shape[:3]


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


# ------------------------------------------------------------------------------------------------------- resampling


# ---------------------------------------------------------------------------------------------------- normalising


def canonical_modality(name, where: str = "") -> str:
    """"CT" or "MR" for any accepted spelling ("mri", "Ct" ...); else a one-line error (prefixed by ``where``)."""
    kind = MODALITIES.get(str(name).strip().upper())
    if kind is None:
        raise VlsegError(f"{where + ': ' if where else ''}modality {name!r}: unknown; use one of CT, MR")
    return kind


