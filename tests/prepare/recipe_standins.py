"""Tiny synthetic stand-ins laid out like the public datasets the recipes describe: the files a recipe expects, at
the paths it expects, 10³ volumes with every published label value painted somewhere."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from tests.io.test_dicom import write_series

SHAPE = (10, 10, 10)
PLACEHOLDER = re.compile(r"\{(\w+)\}")


def label_volume(values: list[int]) -> np.ndarray:
    """A label map holding each value in its own voxel (background elsewhere)."""
    label = np.zeros(SHAPE, np.int16)
    for k, value in enumerate(values):
        label.flat[3 * k + 1] = value
    return label


def image_volume(channels: int | None = None) -> np.ndarray:
    data = np.random.default_rng(0).normal(0, 100, SHAPE).astype(np.float32)
    return data if channels is None else np.stack([data + 1000 * c for c in range(channels)], axis=-1)


def save(path: Path, data: np.ndarray) -> None:
    """NIfTI (identity geometry) or, for ``.nrrd``, NRRD written by SimpleITK on the same grid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".nrrd"):
        sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0))), str(path))
    else:
        nib.save(nib.Nifti1Image(data, np.eye(4)), path)


def fill(pattern: str, values: dict[str, str]) -> str:
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], pattern)


def placeholder_values(pattern: str, case: str) -> dict[str, str]:
    """Values for a pattern's placeholders: ``case`` for {case}, a word of its own for the others."""
    return {name: case if name == "case" else f"{name}{case}" for name in PLACEHOLDER.findall(pattern)}


def published_values(spec: dict) -> list[int]:
    return sorted(int(v) for v in spec["published_labels"])


def write_msd(spec: dict, root: Path, cases: list[str]) -> Path:
    labels = {"0": "background", **{str(v): str(n) for v, n in spec["published_labels"].items()}}
    channels = spec["channel"] + 2 if spec.get("channel") is not None else None
    training = []
    for case in cases:
        save(root / "imagesTr" / f"{case}.nii.gz", image_volume(channels))
        save(root / "labelsTr" / f"{case}.nii.gz", label_volume(published_values(spec)))
        training.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"name": spec["dataset"], "labels": labels, "training": training}))
    return root


def write_pattern(spec: dict, root: Path, cases: list[str]) -> Path:
    for case in cases:
        values = placeholder_values(spec["label"], case)
        label = label_volume(published_values(spec))
        image = fill(spec["image"], values)
        if image.endswith("/*"):  # a DICOM series folder, with the label on its grid
            folder = root / image.replace("*", "series")
            affine = write_series(folder, image_volume().astype(np.int16).transpose(2, 1, 0), oblique=False)
            (root / fill(spec["label"], values)).parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(label, affine), root / fill(spec["label"], values))
            continue
        save(root / image.replace("*", "part1"), image_volume())
        save(root / fill(spec["label"], values), label)
    return root


def write_mask_folders(spec: dict, root: Path, cases: list[str]) -> Path:
    stems = [str(n) for n in spec["published_labels"].values()]
    for case in cases:
        save(root / case / fill(spec.get("image", "ct.nii.gz"), {"case": case}), image_volume())
        for k, stem in enumerate(stems):
            mask = np.zeros(SHAPE, np.uint8)
            mask.flat[3 * k + 1] = 1
            masks = spec.get("masks", "segmentations/{name}.nii.gz")
            save(root / case / fill(masks, {"case": case, "name": stem}), mask)
    return root


WRITERS = {"msd": write_msd, "pattern": write_pattern, "mask_folders": write_mask_folders}


def write_standin(spec: dict, root: Path, cases: list[str]) -> Path:
    """The stand-in of a recipe's dataset under ``root`` → the folder to pass as --source."""
    return WRITERS[spec["layout"]](spec, root, cases)
