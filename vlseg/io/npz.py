"""NumPy ``.npz`` volumes as the CVPR 2025 text-guided segmentation challenge (CVPR-BiomedSegFM) ships them.

A file holds ``imgs`` (D, H, W; intensities 0–255), ``spacing`` (three voxel sizes, mm) and, for training cases,
``gts`` (D, H, W; label values); validation and test inputs carry ``text_prompts`` instead of ``gts``: a pickled dict
(label id as text → prompt, plus ``instance_label``).  The array is read as SimpleITK hands it out ([z, y, x]: the
slice axis first, then rows and columns), so it becomes the scan's x, y, z axes reversed, on a grid with ITK's
identity direction (the file has no orientation): affine ``diag(-sx, -sy, sz)``, as ``vlseg.io.itk`` reads the same
array from an ITK image.

The order of the three ``spacing`` entries is not fixed by the format (baselines disagree), so it is read on the
data: the in-plane pair (rows and columns, H and W) has equal voxel sizes, so ``(a, b, b)`` is in array order
(``zyx``) and ``(b, b, a)`` is ITK order (``xyz``).  Isotropic spacing needs no order; three different values (or
``(a, b, a)``) do not tell it, and reading such a file needs the order named (``spacing_order: xyz|zyx`` in a
convert map).

Files are read with ``allow_pickle=False``; ``text_prompts`` alone is unpickled, by ``vlseg.io.safe_pickle``, which
refuses anything but plain data.
"""

from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

from vlseg.errors import VlsegError, first_line, shape_str
from vlseg.io.readers import scan_reader
from vlseg.io.safe_pickle import load_plain_pickle

SPACING_ORDERS = ("xyz", "zyx")


def npz_members(path: Path) -> list[str]:
    """The array names an ``.npz`` file holds (``imgs``, ``gts`` ...), read from its zip index only."""
    try:
        with zipfile.ZipFile(path) as archive:
            return [n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy")]
    except FileNotFoundError:
        raise VlsegError(f"{path}: file not found") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise VlsegError(f"{path}: not a readable .npz archive ({first_line(exc)})") from None


def read_member(path: Path, member: str) -> np.ndarray:
    """One array of an ``.npz`` file, never unpickling (an object array is an error here; see ``read_text_prompts``)."""
    members = npz_members(path)
    if member not in members:
        raise VlsegError(f"{path}: no {member!r} array (it holds: {', '.join(members) or 'nothing'})")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return np.asarray(npz[member])
    except ValueError as exc:
        if "allow_pickle" in str(exc):
            raise VlsegError(f"{path}: {member!r} holds pickled Python objects, not numbers") from None
        raise VlsegError(f"{path}: unreadable {member!r} array ({first_line(exc)})") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise VlsegError(f"{path}: unreadable {member!r} array ({first_line(exc)})") from None


def spacing_order(spacing, name: str, order: str | None = None) -> str:
    """``zyx`` or ``xyz``: the order of the three voxel sizes, read on the data (the in-plane pair is equal); for
    spacing that does not tell, ``order`` — or, without one, a one-line error."""
    values = [float(v) for v in np.ravel(np.asarray(spacing, dtype=np.float64))]
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise VlsegError(f"{name}: spacing {values} is not three positive voxel sizes")
    a, b, c = values
    same = lambda u, v: math.isclose(u, v, rel_tol=1e-4)  # noqa: E731
    if same(a, b) and same(b, c):
        return order or "zyx"  # isotropic: either order gives the same grid
    if same(b, c) and not same(a, b):
        return "zyx"
    if same(a, b) and not same(b, c):
        return "xyz"
    if order is None:
        raise VlsegError(f"{name}: spacing {values} does not tell its axis order (no equal in-plane pair); name it "
                         f"in the map: spacing_order: xyz or zyx")
    if order not in SPACING_ORDERS:
        raise VlsegError(f"{name}: spacing_order {order!r}: expected one of {', '.join(SPACING_ORDERS)}")
    return order


def npz_image(path: Path, member: str = "imgs", order: str | None = None) -> nib.Nifti1Image:
    """The ``member`` array of an ``.npz`` file (D, H, W) → nibabel image on the grid its ``spacing`` gives."""
    array = read_member(path, member)
    if array.ndim != 3 or 0 in array.shape:
        raise VlsegError(f"{path}: {member!r} is not a 3D volume (shape {shape_str(array.shape)})")
    if array.dtype.kind not in "biuf":
        raise VlsegError(f"{path}: {member!r} has unsupported data type {array.dtype}")
    spacing = read_member(path, "spacing")
    sizes = [float(v) for v in np.ravel(spacing)]
    sx, sy, sz = sizes if spacing_order(spacing, str(path), order) == "xyz" else sizes[::-1]
    return nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), np.diag([-sx, -sy, sz, 1.0]))


@scan_reader("npz", suffixes=(".npz",))
def read_npz(path: Path) -> nib.Nifti1Image:
    """A CVPR-BiomedSegFM ``.npz`` file: its ``imgs`` volume."""
    return npz_image(path, "imgs")


def read_text_prompts(path: Path) -> dict[str, str | int]:
    """The ``text_prompts`` dict of a validation/test input (label id → prompt, ``instance_label`` → 0/1), unpickled
    with an allow-list of plain data types: a file asking for anything else is refused before it runs."""
    name = f"{path}: text_prompts"
    try:
        with zipfile.ZipFile(path) as archive:
            raw = archive.read("text_prompts.npy")
    except KeyError:
        raise VlsegError(f"{path}: no 'text_prompts' array") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise VlsegError(f"{path}: not a readable .npz archive ({first_line(exc)})") from None
    prompts = _object_scalar(raw, name)
    if not isinstance(prompts, dict) or not all(isinstance(k, str) and isinstance(v, (str, int, np.integer))
                                                for k, v in prompts.items()):
        raise VlsegError(f"{name}: not a dict of label id → prompt text (got {type(prompts).__name__})")
    return {k: v if isinstance(v, str) else int(v) for k, v in prompts.items()}


def _object_scalar(raw: bytes, name: str):
    """The one object a 0-d ``.npy`` object array holds (its header read by NumPy, its pickle by the allow-list)."""
    stream = io.BytesIO(raw)
    try:
        major, _ = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(stream)
    except ValueError as exc:
        raise VlsegError(f"{name}: not a .npy array ({first_line(exc)})") from None
    if dtype != np.dtype(object) or shape != ():
        raise VlsegError(f"{name}: expected one pickled dict, got a {dtype} array of shape {shape}")
    array = load_plain_pickle(stream.read(), name)
    return array.item() if isinstance(array, np.ndarray) else array


def save_segs(path: Path, segs) -> Path:
    """A prediction in the challenge's format: ``segs`` (D, H, W) with prompt ids as values, compressed."""
    segs = np.asarray(segs)
    if segs.ndim != 3 or segs.dtype.kind not in "biu" or (segs.size and segs.min() < 0):
        raise VlsegError(f"{path}: segs must be a 3D array of non-negative prompt ids (got {segs.dtype} "
                         f"{shape_str(segs.shape)})")
    dtype = np.uint8 if not segs.size or segs.max() <= 255 else np.uint16
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, segs=segs.astype(dtype))
    return path
