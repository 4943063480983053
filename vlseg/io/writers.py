"""Masks out: NIfTI on the input scan's own grid."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.volumeutils import native_code

from vlseg.atomic import atomic_path
from vlseg.errors import VlsegError, first_line, shape_str
from vlseg.io.scan import Scan


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


def _checked(arr, scan: Scan, path: Path, dtype) -> tuple[np.ndarray, np.dtype]:
    """The array (3D, on the scan's canonical grid) and the data type, which must hold its values."""
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
    return arr, dtype


ZERO_MEMBERS: dict[int, bytes] = {}  # length → a gzip member of that many zero bytes, compressed once


def _member(block: np.ndarray | None, length: int) -> bytes:
    """One gzip member: of ``block``'s bytes, or (None) of ``length`` zero bytes, compressed once per length."""
    if block is not None:
        return gzip.compress(block.tobytes(), compresslevel=1, mtime=0)
    if length not in ZERO_MEMBERS:
        ZERO_MEMBERS[length] = gzip.compress(bytes(length), compresslevel=1, mtime=0)
    return ZERO_MEMBERS[length]


def write_nifti_gz(img: nib.Nifti1Image, data: np.ndarray, path: Path, member_bytes: int = 1 << 22) -> None:
    """A single-file NIfTI-1 as a gzip file of several members, each a group of planes along the last axis (NIfTI's
    slowest): a group without any voxel set (most of a mask) is a member of zeros compressed once and reused, so
    writing costs in proportion to the mask's extent, not the scan's size.  Concatenated members are standard gzip
    (RFC 1952): zlib, Python's gzip, nibabel and ITK read them as one stream."""
    header = img.header.copy()
    header.extensions.clear()
    header["vox_offset"] = 352
    plane = int(np.prod(data.shape[:-1])) * data.dtype.itemsize
    group = max(1, member_bytes // max(plane, 1))
    box = _nonzero_box(data)
    with open(path, "wb") as fh:
        fh.write(gzip.compress(header.binaryblock + b"\0" * 4, compresslevel=1, mtime=0))
        for z0 in range(0, data.shape[-1], group):
            z1 = min(z0 + group, data.shape[-1])
            block = None
            if box is not None and z0 < box[1][2] and z1 > box[0][2]:  # planes the mask reaches: zeros + its box
                block = np.zeros((z1 - z0, data.shape[1], data.shape[0]), data.dtype)
                (x0, y0, _), (x1, y1, _) = box
                block[:, y0:y1, x0:x1] = data[x0:x1, y0:y1, z0:z1].transpose()
            fh.write(_member(block, plane * (z1 - z0)))


def _nonzero_box(data: np.ndarray):
    """``(lo, hi)`` of the non-zero voxels of a 3D array, reading the whole array once and then only the planes the
    mask reaches; None when all are zero."""
    planes = np.nonzero(data.any(axis=(0, 1)))[0]
    if planes.size == 0:
        return None
    footprint = data[:, :, planes[0]:planes[-1] + 1].any(axis=2)
    xs, ys = np.nonzero(footprint.any(axis=1))[0], np.nonzero(footprint.any(axis=0))[0]
    return (xs[0], ys[0], planes[0]), (xs[-1] + 1, ys[-1] + 1, planes[-1] + 1)


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
    arr, dtype = _checked(arr, scan, path, dtype)
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
            if suffix == ".nii.gz" and data.dtype == np.uint8 and img.header.endianness == native_code:
                write_nifti_gz(img, data, tmp)
            else:
                nib.save(img, tmp)
    except OSError as exc:
        raise VlsegError(f"{path}: cannot write ({exc.strerror or first_line(exc)})") from None
    return path
