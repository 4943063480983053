"""Folders of per-class masks, as TotalSegmentator writes them: one folder per case holding the image and one binary
mask file per structure.  The map says where they lie in a case folder and sends mask names to classes::

    image: ct.nii.gz                      # the image (default); may hold {case}, the case folder's name
    masks: segmentations/{name}.nii.gz    # each structure's mask (default); {name} is a key of labels
    labels: {liver: liver, liver_tumor: liver tumor}

(PDDCA: ``image: img.nrrd``, ``masks: structures/{name}.nrrd``; HaN-Seg: ``image: "{case}_IMG_CT.nrrd"``,
``masks: "{case}_OAR_{name}.seg.nrrd"``.)  The case folders are the source's subfolders that hold the masks' folder.
Each case's masks are merged into one label map written beside the manifest (``labels/<dataset>/<case>.nii.gz``, in
the image's geometry).  A structure whose mask file a case lacks is not annotated in that case (its manifest line
leaves the class out); a case with none of the masks is an error.  Recognised by a case folder holding
``segmentations/``; also the fallback for a folder no layout recognises.
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

DEFAULT_IMAGE = "ct.nii.gz"
DEFAULT_MASKS = "segmentations/{name}.nii.gz"


def _recognises(source: Path) -> bool:
    return source.is_dir() and any((d / "segmentations").is_dir() for d in source.iterdir())


def _fill(pattern: str, case: str, name: str = "") -> str:
    return pattern.replace("{case}", case).replace("{name}", name)


def _keys(source: Path, spec: dict) -> tuple[str, str, dict[str, str]]:
    image, masks, labels = str(spec.get("image", DEFAULT_IMAGE)), str(spec.get("masks", DEFAULT_MASKS)), spec["labels"]
    if "{name}" not in masks:
        raise VlsegError(f"{source}: masks {masks!r} must hold {{name}}, the place of the mask's name")
    if not isinstance(labels, dict):
        raise VlsegError(f"{source}: layout mask_folders needs labels as a mapping (mask name → canonical class)")
    return image, masks, {str(k): str(v) for k, v in labels.items()}


@dataset_layout("mask_folders", recognises=_recognises, fallback=True)
def list_mask_folders(source: Path, spec: dict, manifest: Path) -> Listing:
    if not source.is_dir():
        raise VlsegError(f"{source}: not a folder (expected a folder of case folders)")
    image, masks, mask_classes = _keys(source, spec)
    folders = [d for d in sorted(source.iterdir()) if (d / _fill(masks, d.name)).parent.is_dir()]
    if not folders:
        inner = Path(masks).parent.as_posix()
        raise VlsegError(f"{source}: no case folders" + (f" with a {inner}/ folder inside" if inner != "." else ""))
    out = manifest.parent / "labels" / str(spec["dataset"])
    cases, mask_files = [], {}
    for d in folders:
        label = out / f"{d.name}.nii.gz"
        mask_files[label] = {stem: d / _fill(masks, d.name, stem) for stem in mask_classes}
        cases.append((d.name, d / _fill(image, d.name), label))
    local = {stem: [i + 1] for i, stem in enumerate(mask_classes)}
    return Listing(local, cases, partial(merge_masks, mask_classes=mask_classes, mask_files=mask_files))


def merge_masks(image: Path, out_path: Path, vocabulary: Vocabulary, mask_classes: dict[str, str],
                mask_files: dict[Path, dict[str, Path]]):
    """A case's per-class binary masks → one label map (value i+1 for the i-th mapped mask), written like the image;
    returns ``(scan, label)`` so the case is not read again, plus the case's own local labels when it lacks some
    masks.

    A mask included in another (a tumour in its organ) is painted after it and wins; any other overlap is an error,
    since one label map cannot hold it."""
    files = mask_files[out_path]
    stems = list(mask_classes)
    present = [s for s in stems if files[s].exists()]
    if not present:
        raise VlsegError(f"{files[stems[0]].parent}: none of the {len(stems)} mask files of the map is there "
                         f"(e.g. {files[stems[0]].name})")
    scan = load_scan(image)
    label = np.zeros(scan.data.shape, np.uint8 if len(stems) < 256 else np.uint16)
    depth = {s: len(vocabulary.parents(mask_classes[s])) for s in present}  # parents first, then what they include
    for stem in sorted(present, key=lambda s: depth[s]):
        _paint(label, stem, files, scan, stems, mask_classes, vocabulary)
    save_like(label, scan, out_path, dtype=label.dtype)
    if len(present) == len(stems):
        return scan, label
    return scan, label, {s: [stems.index(s) + 1] for s in present}


def _paint(label, stem, files, scan, stems, mask_classes, vocabulary) -> None:
    path = files[stem]
    mask = load_label(path, like=scan)
    if not set(np.unique(mask).tolist()) <= {0, 1}:
        raise VlsegError(f"{path}: not a binary mask (values {sorted(set(np.unique(mask).tolist()))[:5]})")
    mask = mask.astype(bool)
    for value in set(np.unique(label[mask]).tolist()) - {0}:
        other = stems[value - 1]
        if mask_classes[stem] not in vocabulary.includes[mask_classes[other]]:
            raise VlsegError(f"{path}: overlaps {files[other].name}, which does not contain it")
    label[mask] = stems.index(stem) + 1
