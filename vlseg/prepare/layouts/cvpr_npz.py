"""CVPR-BiomedSegFM, the CVPR 2025 text-guided 3D segmentation challenge's data (huggingface junma/CVPR-BiomedSegFM)::

    CVPR-BiomedSegFM/
        CVPR25_TextSegFMData_with_class.json   {"<dataset>": {"1": ["Liver", "liver", ...], ..., "instance_label": 0}}
        3D_train_npz_all/<modality>/<dataset>/<case>.npz     imgs, gts, spacing   (modality: CT, MR, PET, US3D, ...)
        3D_val_npz/<dataset>_<case>.npz                      imgs, spacing, text_prompts (no gts)

``--source`` is a folder of ``.npz`` files (sub-folders included: a training tree, one modality or one dataset).
Each file's dataset is its folder's name when the prompt JSON has that entry, else the longest entry its file name
starts with (``<dataset>_...``, as validation files are named); ``prompt_dataset:`` in the map names it for all.
The prompt JSON is the map's ``prompts:`` (a path), else ``CVPR25_TextSegFMData_with_class.json`` in ``--source``
or one of the three folders above it.

Labels: in a dataset's entry, label id → phrasings, the first being the class name; with ``labels: auto`` the name
goes to its canonical class through the vocabulary.  The other phrasings (candidate synonyms) and ``instance_label``
are kept in the convert report (``prompts``).  An instance dataset (``instance_label: 1``) has one class whose
instances are the values of ``gts``: every value found covers it.  Values of ``gts`` that no id of the entry names
are set to 0 and listed in the report (``unprompted_values``).  ``gts`` is written as a label map beside the
manifest (``labels/<dataset>/<case>.nii.gz``); the image stays the ``.npz`` (read by ``vlseg.io.npz``), except where
its spacing does not tell its axis order: then the map's ``spacing_order: xyz|zyx`` decides and the image is written
beside the manifest too (``images/<dataset>/<case>.nii.gz``), since later readers of the ``.npz`` cannot know it.

The modality is the folder (``CT``, ``MR`` ...) or the file name's first part (``CT_...``); vlseg converts CT and MR,
other cases are per-case errors.  Files without ``gts`` (validation and test inputs) are not training cases: they
are counted in the report (``without_gts``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np

from vlseg.errors import VlsegError, first_line
from vlseg.io.npz import npz_image, npz_members, read_member, spacing_order
from vlseg.io.scan import canonical_modality, load_scan
from vlseg.io.writers import save_like
from vlseg.prepare.layouts.base import Listing, dataset_layout

PROMPTS_FILE = "CVPR25_TextSegFMData_with_class.json"
MODALITY_NAMES = ("CT", "MR", "PET", "US3D", "Microscopy")  # the training tree's modality folders


@dataclass
class _File:
    npz: Path
    key: str | None  # its dataset's entry in the prompt JSON
    order: str | None  # spacing_order from the map
    problem: str | None = None


def _recognises(source: Path) -> bool:
    return source.is_dir() and any(any(source.glob(p)) for p in ("*.npz", "*/*.npz", "*/*/*.npz"))


@dataset_layout("cvpr_npz", recognises=_recognises)
def list_cvpr_npz(source: Path, spec: dict, manifest: Path) -> Listing:
    if not source.is_dir():
        raise VlsegError(f"{source}: not a folder (expected a folder of CVPR-BiomedSegFM .npz files)")
    prompts_path = _prompts_file(source, spec)
    prompts = read_prompts(prompts_path)
    files = sorted(p for p in source.rglob("*.npz") if not p.name.startswith("._"))
    if not files:
        raise VlsegError(f"{source}: no .npz files")
    out = manifest.parent
    report: dict = {"prompts": {}, "without_gts": 0, "unprompted_values": {}}
    found, cases, modalities, labels = {}, [], {}, {}
    for path in files:
        entry = _file(path, source, spec, prompts, prompts_path)
        if entry is None:
            report["without_gts"] += 1
            continue
        case_id = path.name[: -len(".npz")]
        folder = str(spec["dataset"])
        image = out / "images" / folder / f"{case_id}.nii.gz" if _needs_image(entry) else path
        label = out / "labels" / folder / f"{case_id}.nii.gz"
        found[str(label)] = entry
        cases.append((case_id, image, label))
        modality = _modality(path, source, entry)
        if modality:
            modalities[case_id] = modality
        if entry.key and entry.key not in report["prompts"]:
            report["prompts"][entry.key] = _describe(prompts[entry.key])
            for name, values in entry_labels(prompts[entry.key]).items():
                labels.setdefault(name, []).extend(v for v in values if v not in labels.get(name, []))
    return Listing(labels, cases, partial(_load_case, files=found, prompts=prompts, report=report),
                   modalities=modalities, report=report)


def _prompts_file(source: Path, spec: dict) -> Path:
    if spec.get("prompts"):
        path = Path(str(spec["prompts"])).expanduser()
        if not path.is_file():
            raise VlsegError(f"{path}: prompt JSON not found (the map's 'prompts:')")
        return path
    for folder in [source, *source.resolve().parents][:4]:  # a dataset folder is three below the download's top
        if (folder / PROMPTS_FILE).is_file():
            return folder / PROMPTS_FILE
    raise VlsegError(f"{source / PROMPTS_FILE}: not found (nor in the three folders above); name the prompt JSON "
                     f"in the map (prompts: PATH)")


def read_prompts(path: Path) -> dict[str, dict]:
    """The challenge's prompt JSON: dataset → {label id: [phrasings, first = class name], "instance_label": 0|1}."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VlsegError(f"{path}: unreadable prompt JSON ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise VlsegError(f"{path}: not a mapping of dataset → label prompts")
    for key, entry in data.items():
        ok = isinstance(entry, dict) and all(
            k == "instance_label" or (str(k).isdigit() and isinstance(v, list) and v and isinstance(v[0], str))
            for k, v in entry.items())
        if not ok:
            raise VlsegError(f"{path}: entry {key!r} is not label id → [phrasings] (plus instance_label)")
    return data


def entry_labels(entry: dict) -> dict[str, list[int]]:
    """A dataset's label names (first phrasing) → label ids."""
    labels: dict[str, list[int]] = {}
    for key, phrasings in entry.items():
        if key != "instance_label":
            labels.setdefault(phrasings[0], []).append(int(key))
    return labels


def _describe(entry: dict) -> dict:
    """What the report keeps of a dataset's prompts: each id's name and its other phrasings, and instance_label."""
    ids = {k: {"name": v[0], "synonyms": list(dict.fromkeys(v[1:]))} for k, v in entry.items() if k.isdigit()}
    return {"labels": ids, "instance_label": int(entry.get("instance_label", 0))}


def _file(path: Path, source: Path, spec: dict, prompts: dict, prompts_path: Path) -> _File | None:
    """The file's dataset entry, or None for a file without ``gts`` (not a training case)."""
    entry = _File(path, None, spec.get("spacing_order"))
    try:
        if "gts" not in npz_members(path):
            return None
    except VlsegError as exc:
        entry.problem = str(exc)
        return entry
    key = spec.get("prompt_dataset") or (path.parent.name if path.parent.name in prompts else None)
    if key is None:
        starts = [k for k in prompts if path.name.startswith(f"{k}_")]
        key = max(starts, key=len) if starts else None
    if key not in prompts:
        entry.problem = f"{path}: no entry of {prompts_path.name} names its dataset (by folder or start of name)"
    else:
        entry.key = str(key)
    return entry


def _needs_image(entry: _File) -> bool:
    """Whether the image must be written as NIfTI: its spacing tells no axis order, and the map names one."""
    if entry.problem or entry.order is None:
        return False
    try:
        spacing_order(read_member(entry.npz, "spacing"), str(entry.npz))
    except VlsegError:
        return True
    return False


def _modality(path: Path, source: Path, entry: _File) -> str | None:
    parts = path.relative_to(source).parts[:-1] + source.parts[-2:]
    name = next((p for p in parts if p in MODALITY_NAMES), path.name.split("_")[0])
    try:
        return canonical_modality(name)
    except VlsegError:
        entry.problem = entry.problem or f"{path}: modality {name!r} is not one vlseg converts (CT or MR)"
        return None


def _load_case(image: Path, label: Path, vocabulary, files: dict, prompts: dict, report: dict) -> tuple:
    """Read one file → (scan, label map from ``gts``, the case's local labels), writing the label map (and the image,
    where it is not the .npz)."""
    entry = files[str(label)]
    if entry.problem:
        raise VlsegError(entry.problem)
    img = npz_image(entry.npz, "imgs", entry.order)
    if image != entry.npz:
        _save_image(img, image)
    scan = load_scan(img)
    gts = scan.to_canonical(read_member(entry.npz, "gts").transpose(2, 1, 0))
    if gts.dtype.kind not in "biu" and not np.array_equal(gts, np.rint(gts)):
        raise VlsegError(f"{entry.npz}: 'gts' holds values that are not whole numbers")
    gts = gts.astype(np.int64)
    prompt = prompts[entry.key]
    found = set(np.unique(gts).tolist()) - {0}
    if int(prompt.get("instance_label", 0)) == 1:
        local = {name: sorted(found) for name in entry_labels(prompt)} if found else {}  # no instance: unsaid
    else:
        local = entry_labels(prompt)
        unprompted = sorted(found - {v for values in local.values() for v in values})
        if unprompted:
            gts[np.isin(gts, unprompted)] = 0
            report["unprompted_values"][entry.npz.name[: -len(".npz")]] = unprompted
    save_like(gts, scan, label, dtype=np.uint8 if gts.max() <= 255 else np.uint16)
    return scan, gts.astype(np.int32), local


def _save_image(img: nib.Nifti1Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.nii.gz")
    nib.save(img, tmp)
    os.replace(tmp, path)
