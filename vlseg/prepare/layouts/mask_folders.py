"""Folders of per-class masks, as TotalSegmentator writes them: ``<case>/<image>`` and
``<case>/segmentations/<name>.nii.gz``, one binary mask per class.  The map's ``image`` key names the image file
(default ``ct.nii.gz``) and its ``labels`` keys are the mask names.  Each case's masks are merged into one label map
written beside the manifest (``labels/<dataset>/<case>.nii.gz``, in the image's geometry).  Recognised by a case
folder holding ``segmentations/``; also the fallback for a folder no layout recognises.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from vlseg.errors import VlsegError
from vlseg.io.scan import load_label, load_scan
from vlseg.io.writers import save_like
from vlseg.prepare.layouts.base import Listing, dataset_layout
from vlseg.vocab.vocabulary import Vocabulary


def _recognises(source: Path) -> bool:
    return source.is_dir() and any((d / "segmentations").is_dir() for d in source.iterdir())


@dataset_layout("mask_folders", recognises=_recognises, fallback=True)
def list_mask_folders(source: Path, spec: dict, manifest: Path) -> Listing:
    if not source.is_dir():
        raise VlsegError(f"{source}: not a folder (expected a folder of case folders)")
    image_name = str(spec.get("image", "ct.nii.gz"))
    stems = [str(k) for k in spec["labels"]]
    cases = [(d.name, d / image_name, manifest.parent / "labels" / str(spec["dataset"]) / f"{d.name}.nii.gz")
             for d in sorted(source.iterdir()) if (d / "segmentations").is_dir()]
    if not cases:
        raise VlsegError(f"{source}: no case folders with a segmentations/ folder inside")
    mask_classes = {str(k): str(v) for k, v in spec["labels"].items()}
    local = {stem: [i + 1] for i, stem in enumerate(stems)}
    return Listing(local, cases, partial(merge_masks, mask_classes=mask_classes))


def merge_masks(image: Path, out_path: Path, vocabulary: Vocabulary, mask_classes: dict[str, str]):
    """The per-class binary masks in ``segmentations/`` beside ``image`` → one label map (value i+1 for the i-th
    mapped mask), written like the image; returns ``(scan, label)`` so the case is not read again.

    A mask included in another (a tumour in its organ) is painted after it and wins; any other overlap is an error,
    since one label map cannot hold it."""
    scan = load_scan(image)
    label = np.zeros(scan.data.shape, np.uint8)
    stems = list(mask_classes)
    depth = {s: len(vocabulary.parents(mask_classes[s])) for s in stems}  # parents first, then what they include
    for i in sorted(range(len(stems)), key=lambda k: depth[stems[k]]):
        path = image.parent / "segmentations" / f"{stems[i]}.nii.gz"
        mask = load_label(path, like=scan)
        if not set(np.unique(mask).tolist()) <= {0, 1}:
            raise VlsegError(f"{path}: not a binary mask (values {sorted(set(np.unique(mask).tolist()))[:5]})")
        mask = mask.astype(bool)
        for value in set(np.unique(label[mask]).tolist()) - {0}:
            other = stems[value - 1]
            if mask_classes[stems[i]] not in vocabulary.includes[mask_classes[other]]:
                raise VlsegError(f"{path}: overlaps {other}.nii.gz, which does not contain it")
        label[mask] = i + 1
    save_like(label, scan, out_path)
    return scan, label
