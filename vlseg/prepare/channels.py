"""One channel of a multi-channel image, for datasets that store several sequences in one 4D file (MSD Task01
BrainTumour: FLAIR, T1w, t1gd, T2w; Task05 Prostate: T2, ADC).  Scans are 3D, so a map (or recipe) naming
``channel: N`` has that channel written as a 3D NIfTI in the source's geometry beside the manifest,
``images/<dataset>/<case>_000N.nii.gz``, and the manifest points to it.  Works with any layout whose images are
read as they are; the source file is only read.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np

from vlseg.atomic import atomic_path
from vlseg.errors import VlsegError, first_line
from vlseg.io.nifti import read_nifti_channels
from vlseg.io.scan import load_label, load_scan
from vlseg.prepare.layouts.base import Listing


def channel_listing(listing: Listing, spec: dict, manifest: Path, where: str) -> Listing:
    """The listing with each image replaced by its channel ``spec["channel"]``, written when the case is loaded."""
    channel = spec["channel"]
    if not isinstance(channel, int) or isinstance(channel, bool) or channel < 0:
        raise VlsegError(f"{where}: channel must be a channel index (0, 1, ...), got {channel!r}")
    if listing.load is not None:
        raise VlsegError(f"{where}: channel: {channel} needs a layout whose images are read as they are (this one "
                         f"builds its cases itself)")
    folder = manifest.parent / "images" / str(spec["dataset"])
    sources, cases = {}, []
    for case_id, image, label in listing.cases:
        derived = folder / f"{case_id}_{channel:04d}.nii.gz"
        sources[derived] = Path(image)
        cases.append((case_id, derived, label))
    return replace(listing, cases=cases, load=partial(_load_channel, sources=sources, channel=channel))


def _load_channel(image: Path, label: Path, vocabulary, sources: dict[Path, Path], channel: int):
    write_channel(sources[image], channel, image)
    scan = load_scan(image)
    return scan, load_label(label, like=scan)


def write_channel(source: Path, channel: int, out: Path) -> Path:
    """Channel ``channel`` of the 4D NIfTI ``source`` (channels along its 4th axis) → a 3D NIfTI ``out`` with the
    source's affine."""
    if not source.name.lower().endswith((".nii", ".nii.gz")):
        raise VlsegError(f"{source}: channel extraction reads NIfTI files (.nii, .nii.gz) only")
    img = read_nifti_channels(source)
    shape = tuple(int(n) for n in img.shape)
    if channel >= shape[3]:
        raise VlsegError(f"{source}: has {shape[3]} channels; channel {channel} does not exist")
    try:
        data = np.asarray(img.dataobj[..., channel])
    except Exception as exc:
        raise VlsegError(f"{source}: unreadable voxel data ({first_line(exc)})") from None
    if data.dtype == np.float64:
        data = data.astype(np.float32)
    with atomic_path(out, suffix=".tmp.nii.gz") as tmp:
        nib.save(nib.Nifti1Image(data, img.affine), tmp)
    return out
