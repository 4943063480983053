"""The table of scan formats ``load_scan`` reads: one registered ``ScanReader`` per format, defined beside its code.

A format is recognised by the end of its name (``.nii.gz``, ``.nrrd``) or, for what suffixes cannot tell apart (a
folder of DICOM slices), by a predicate; a file or folder no entry claims goes to the fallback reader of its kind,
whose message says what the input is not.  Adding a format is adding one decorated function::

    @scan_reader("npz", suffixes=(".npz",))
    def read_npz(path: Path) -> nib.Nifti1Image:
        ...

A reader returns a nibabel image (array and voxel → world affine, RAS, in mm) and reports bad input as one
``VlsegError`` line naming the file; ``load_scan`` then checks what every scan must pass and takes it to the
RAS-canonical grid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib

from vlseg.errors import VlsegError, shape_str
from vlseg.registry import SCAN_READERS


@dataclass(frozen=True)
class ScanReader:
    """One scan format: how an input is recognised as it, and how it is read."""

    name: str
    read: Callable[[Path], nib.spatialimages.SpatialImage]  # path → image; bad input is one VlsegError line
    suffixes: tuple[str, ...] = ()  # names ending so are this format (lower case; the longest match wins)
    claims: Callable[[Path], bool] | None = None  # else: whether an input is this format (asked when no suffix fits)
    folder: bool = False  # reads folders, not files
    fallback: bool = False  # reads any input of its kind (file or folder) that no entry claims
    keeps_header: bool = False  # the file's own NIfTI header is kept for outputs


def scan_reader(name: str, *, suffixes: tuple[str, ...] = (), claims: Callable[[Path], bool] | None = None,
                folder: bool = False, fallback: bool = False, keeps_header: bool = False):
    """Decorator: register ``read(path) -> nibabel image`` as the reader of a format (see ``ScanReader``)."""

    def decorator(read):
        SCAN_READERS.register(name)(ScanReader(name, read, tuple(s.lower() for s in suffixes), claims, folder,
                                               fallback, keeps_header))
        return read

    return decorator


def scan_readers() -> list[ScanReader]:
    return [SCAN_READERS.get(name) for name in SCAN_READERS.names()]


def scan_suffixes() -> tuple[str, ...]:
    """Every suffix a format is recognised by, longest first (so ``.nii.gz`` is tried before ``.gz``)."""
    return tuple(sorted({s for r in scan_readers() for s in r.suffixes}, key=lambda s: (-len(s), s)))


def find_reader(path: Path) -> ScanReader:
    """The reader of a file or folder: the format whose suffix ends its name (the longest), else the one whose
    ``claims`` accepts it, else the fallback of its kind (a missing path counts as a file)."""
    folder = path.is_dir()
    kind = "folder" if folder else "file"
    readers = [r for r in scan_readers() if r.folder == folder]
    name = path.name.lower()
    by_suffix = [(len(s), r) for r in readers for s in r.suffixes if name.endswith(s)]
    longest = max((n for n, _ in by_suffix), default=0)
    found = [r for n, r in by_suffix if n == longest] or [r for r in readers if r.claims is not None and r.claims(path)]
    found = found or [r for r in readers if r.fallback]
    if not found:
        known = ", ".join(r.name for r in scan_readers())
        raise VlsegError(f"{path}: no scan format reads this {kind} (known formats: {known})")
    if len(found) > 1:
        raise VlsegError(f"{path}: several scan formats claim this {kind} ({', '.join(r.name for r in found)})")
    return found[0]


def spatial_shape(img, name: str) -> tuple[int, int, int]:
    """The 3D shape of the image; 4D+ is accepted only when every extra dimension is 1 (squeezed)."""
    shape = tuple(int(n) for n in img.shape)
    if len(shape) < 3 or any(n != 1 for n in shape[3:]):
        raise VlsegError(f"{name}: not a 3D image (shape {shape_str(shape)})")
    if any(n < 1 for n in shape[:3]):
        raise VlsegError(f"{name}: empty image (shape {shape_str(shape)})")
    return shape[:3]
