"""Presence calibration: choose the presence threshold on targets the model is not scored on and store it with the
checkpoint.

    vlseg calibrate RUN_OR_CHECKPOINT [--manifest M] [--split val]
    vlseg calibrate RUN_OR_CHECKPOINT --from-training-crops [--crops-per-case N] [--seed S]

With a split, every case of it is asked for each class of the model that its dataset annotates (by name); the class is
present when the label has it, absent otherwise.  The threshold kept is the one that best separates the two by
balanced accuracy (the mean of the share of present targets kept and of absent targets vetoed), so a split with few
absent targets does not push it to zero.  Choose it on a split the model was not trained on and that is not the test
split.

A corpus without a validation split can manufacture its targets from the annotated training scans: crops (random
boxes of 40-70% of each axis, and slabs placed beside a chosen class so that it lies entirely outside) in which a class
with no voxel inside is an absent target, one with at least min(5 ml, half its volume) inside is a present target, and
one with a sliver inside is left out.  From them: a temperature (Platt scaling of the head's logit) whose 0.5 point is
the global threshold, a threshold per class that has at least 3 targets of each kind, and the statistics of the
statistical presence test (``vlseg.infer.presence``).  The model has seen these scans, so its presence head is more
confident on them than on new ones: prefer a real validation split when there is one.

The result is written to ``calibration.json`` in the checkpoint directory, and ``Segmenter.from_pretrained`` uses it
from then on (``inference.presence_threshold`` in the config otherwise; a class's own threshold where it has one).
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from vlseg.errors import VlsegError
from vlseg.infer import presence
from vlseg.infer.presence import best_threshold

__all__ = ["CALIBRATION", "best_threshold", "calibrate", "calibrate_from_crops", "read_calibration"]

CALIBRATION = "calibration.json"
MIN_PRESENT_ML = 5.0  # a class with at least min(this, MIN_PRESENT_FRACTION of its volume) inside a crop is present
MIN_PRESENT_FRACTION = 0.5
CROP_FRACTION = (0.4, 0.7)  # random crops: this share of each axis
MIN_SLAB_FRACTION = 0.25  # a slab beside a class must be at least this share of its axis


def _asked(segmenter, case) -> list[str]:
    names = set(segmenter.vocabulary.names)
    return [c for c in case.classes if c in names]


def scan_targets(segmenter, case) -> list[presence.Target]:
    """A whole scan's targets: each class of the model its dataset annotates, present when its label has it."""
    from vlseg.io.scan import load_label, load_scan

    asked = _asked(segmenter, case)
    if not asked:
        return []
    scan = load_scan(case.image)
    label = load_label(case.label, like=scan)
    truth = {name: bool(case.class_mask(label, name).any()) for name in asked}
    result = segmenter.segment(scan, asked, modality=case.modality, interpret=False, presence_threshold=0.0)
    return presence.targets_from_result(result, truth, case.case_id, case.modality, "scan")


def calibrate(segmenter, manifest, split: str = "val", progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    from vlseg.prepare.manifest import read_manifest

    cases = read_manifest(manifest, split=split)
    if not cases:
        raise VlsegError(f"{manifest}: no cases in split {split!r} to calibrate on")
    targets = [t for case in tqdm(cases, desc=f"calibrating on {split}", disable=not progress)
               for t in scan_targets(segmenter, case)]
    if not targets:
        raise VlsegError(f"{manifest}: no case of split {split!r} annotates a class this model knows")
    p, y = np.array([t.presence_probability for t in targets]), np.array([t.present for t in targets])
    threshold, score = best_threshold(p, y)
    before = float(segmenter.config["inference"]["presence_threshold"])
    return {"presence_threshold": threshold, "balanced_accuracy": score,
            "balanced_accuracy_before": presence.balanced_accuracy(p >= before, y),
            "threshold_before": before, "present": int(y.sum()), "absent": int((~y).sum()), "split": split,
            "manifest": str(manifest)}


# ------------------------------------------------------------------------------------------ targets from training crops


def random_box(shape, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A box of CROP_FRACTION of each axis, placed uniformly."""
    shape = np.asarray(shape)
    size = np.maximum(1, np.round(shape * rng.uniform(*CROP_FRACTION, 3))).astype(int)
    lo = np.array([rng.integers(0, n - s + 1) for n, s in zip(shape, size)])
    return lo, lo + size


def excluding_box(shape, box, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray] | None:
    """A slab of the grid on one side of ``box`` along one axis (chosen at random among those at least
    MIN_SLAB_FRACTION thick), cut to 70-100% of the other axes: a crop the box's class lies entirely outside.  None
    when the class leaves no such room."""
    shape, (b_lo, b_hi) = np.asarray(shape), box
    sides = [(axis, side) for axis in range(3) for side in (0, 1)
             if (b_lo[axis] if side == 0 else shape[axis] - b_hi[axis]) >= max(1, MIN_SLAB_FRACTION * shape[axis])]
    if not sides:
        return None
    axis, side = sides[rng.integers(len(sides))]
    size = np.maximum(1, np.round(shape * rng.uniform(0.7, 1.0, 3))).astype(int)
    lo = np.array([rng.integers(0, n - s + 1) for n, s in zip(shape, size)])
    hi = lo + size
    lo[axis], hi[axis] = (0, b_lo[axis]) if side == 0 else (b_hi[axis], shape[axis])
    return lo, hi


def crop_boxes(masks: dict[str, np.ndarray], shape, n: int, rng: np.random.Generator) -> list:
    """``n`` crop boxes: random ones, every other one a slab beside one of the present classes in turn."""
    from vlseg.transforms.boxes import mask_box

    present = [name for name in masks if masks[name].any()]
    order = [present[i] for i in rng.permutation(len(present))]
    boxes = []
    for i in range(n):
        box = excluding_box(shape, mask_box(masks[order[(i // 2) % len(order)]]), rng) if i % 2 and order else None
        boxes.append(box if box is not None else random_box(shape, rng))
    return boxes


def crop_truth(masks: dict[str, np.ndarray], lo, hi, voxel_ml: float) -> dict[str, bool]:
    """Per class: absent (no voxel inside the box), present (at least min(MIN_PRESENT_ML, MIN_PRESENT_FRACTION of its
    volume) inside), or left out (a sliver inside)."""
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    truth = {}
    for name, mask in masks.items():
        inside = int(np.count_nonzero(mask[box]))
        if inside == 0:
            truth[name] = False
        elif inside * voxel_ml >= min(MIN_PRESENT_ML, MIN_PRESENT_FRACTION * np.count_nonzero(mask) * voxel_ml):
            truth[name] = True
    return truth


def crop_targets(segmenter, case, crops: int, seed: int = 0) -> list[presence.Target]:
    """The targets of ``crops`` crops of one annotated scan (see the module docstring), the same for the same seed."""
    from vlseg.io.scan import crop_scan, load_label, load_scan

    asked = _asked(segmenter, case)
    if not asked or crops <= 0:
        return []
    scan = load_scan(case.image)
    label = load_label(case.label, like=scan)
    masks = {name: case.class_mask(label, name) for name in asked}
    rng = np.random.default_rng([seed, zlib.crc32(case.case_id.encode())])
    voxel_ml = float(np.prod(scan.spacing)) / 1000.0
    targets = []
    for lo, hi in crop_boxes(masks, scan.data.shape, crops, rng):
        truth = crop_truth(masks, lo, hi, voxel_ml)
        if truth:
            result = segmenter.segment(crop_scan(scan, lo, hi), list(truth), modality=case.modality, interpret=False,
                                       presence_threshold=0.0)
            targets += presence.targets_from_result(result, truth, case.case_id, case.modality, "crop")
    return targets


def training_crop_targets(segmenter, cases, crops_per_case: int = 8, seed: int = 0,
                          progress: bool = True) -> list[presence.Target]:
    from tqdm.auto import tqdm

    return [t for case in tqdm(cases, desc="segmenting training crops", disable=not progress)
            for t in crop_targets(segmenter, case, crops_per_case, seed)]


def fit_calibration(targets: list[presence.Target], threshold_before: float) -> dict:
    """What ``calibration.json`` holds, fitted on manufactured targets."""
    calibrated = presence.CalibratedPresence.fit(targets)
    y = np.array([t.present for t in targets])
    p = np.array([t.presence_probability for t in targets])
    return {**calibrated.to_json(),
            "balanced_accuracy": presence.balanced_accuracy([calibrated.present(t) for t in targets], y),
            "balanced_accuracy_before": presence.balanced_accuracy(p >= threshold_before, y),
            "threshold_before": threshold_before, "present": int(y.sum()), "absent": int((~y).sum()),
            "statistical_test": _statistical_test(targets),
            "volume_rule": presence.VolumeRule.fit(targets).to_json()}


def _statistical_test(targets) -> dict | None:
    """The statistical test's fit, or None (a model that draws no mask on any present target gives it nothing)."""
    try:
        return presence.StatisticalTest.fit(targets).to_json()
    except VlsegError:
        return None


def calibrate_from_crops(segmenter, manifest, crops_per_case: int = 8, seed: int = 0, progress: bool = True) -> dict:
    from vlseg.prepare.manifest import read_manifest

    cases = [c for c in read_manifest(manifest, split="train") if _asked(segmenter, c)]
    if not cases:
        raise VlsegError(f"{manifest}: no training case annotates a class this model knows")
    targets = training_crop_targets(segmenter, cases, crops_per_case, seed, progress)
    result = fit_calibration(targets, float(segmenter.config["inference"]["presence_threshold"]))
    return {**result, "split": "train", "source": "training crops", "crops_per_case": crops_per_case, "seed": seed,
            "cases": len(cases), "manifest": str(manifest)}


def read_calibration(checkpoint: Path) -> dict | None:
    path = Path(checkpoint) / CALIBRATION
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        float(data["presence_threshold"])
        {str(k): float(v) for k, v in data.get("class_thresholds", {}).items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise VlsegError(f"{path}: not a calibration file vlseg wrote (delete it, or run vlseg calibrate again)")
    return data
