"""Masks out: NIfTI on the input scan's own grid."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

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
            nib.save(img, tmp)
    except OSError as exc:
        raise VlsegError(f"{path}: cannot write ({exc.strerror or first_line(exc)})") from None
    return path
