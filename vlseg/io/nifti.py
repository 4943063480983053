"""The NIfTI reader: files read eagerly and checked before nibabel sees them.

Files are read in full (gzip streams are decompressed to the end, so their CRC is checked): nibabel reads lazily and
only as many bytes as the header asks for, which lets a damaged stream pass unnoticed or fail much later.  NIfTI is
also the fallback for files no other format claims: its messages say what such a file is not.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from vlseg.errors import VlsegError, first_line, shape_str
from vlseg.io.readers import scan_reader, spatial_shape

_GZIP_MAGIC = b"\x1f\x8b"


_HEADER_SIZES = {348: nib.Nifti1Image, 540: nib.Nifti2Image}  # sizeof_hdr → single-file image class


@scan_reader("nifti", suffixes=(".nii", ".nii.gz"), fallback=True, keeps_header=True)
def read_nifti(path: Path) -> nib.Nifti1Image | nib.Nifti2Image:
    """A single-file NIfTI-1/2 image, read whole and checked: header, 3D shape, enough bytes for its voxels."""
    raw = _read_bytes(path)
    img = _parse(raw, str(path))
    spatial_shape(img, str(path))  # before the size check, which would otherwise speak for a 2D file first
    _check_size(img, len(raw), str(path))
    return img


def read_nifti_channels(path: Path) -> nib.Nifti1Image | nib.Nifti2Image:
    """A single-file NIfTI image with channels along its 4th axis (X, Y, Z, C: MR sequences, mask channels), read
    whole and checked as ``read_nifti`` checks a scan; not a scan format of its own (scans are 3D)."""
    raw = _read_bytes(path)
    img = _parse(raw, str(path))
    if len(img.shape) != 4:
        raise VlsegError(f"{path}: not a multi-channel image (shape {shape_str(img.shape)}; channels along a 4th "
                         f"axis expected)")
    _check_size(img, len(raw), str(path))
    return img


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

