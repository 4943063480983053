"""Presence calibration: choose the presence threshold on held-out data and store it with the checkpoint.

    vlseg calibrate RUN_OR_CHECKPOINT [--manifest M] [--split val]

Every case of the split is asked for each class of the model that its dataset annotates (by name); the class is
present when the label has it, absent otherwise.  The threshold kept is the one that best separates the two by
balanced accuracy (the mean of the share of present targets kept and of absent targets vetoed), so a split with few
absent targets does not push it to zero.  It is written to ``calibration.json`` in the checkpoint directory, and
``Segmenter.from_pretrained`` uses it from then on (``inference.presence_threshold`` in the config otherwise).  Choose
it on a split the model was not trained on and that is not the test split.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlseg.errors import VlsegError

CALIBRATION = "calibration.json"


def best_threshold(probabilities, present) -> tuple[float, float]:
    """``(threshold, balanced accuracy)``: the threshold midway between the two neighbouring probabilities where
    balanced accuracy peaks (the lowest such threshold on ties)."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(present, dtype=bool)
    if y.all() or not y.any():
        raise VlsegError("calibration needs both present and absent targets in the split "
                         f"({int(y.sum())} present, {int((~y).sum())} absent)")
    values = np.unique(p)
    candidates = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]])
    best = (0.5, -1.0)
    for t in candidates:
        kept = p >= t
        score = 0.5 * (kept[y].mean() + (~kept[~y]).mean())
        if score > best[1] + 1e-12:
            best = (float(np.clip(t, 0.0, 1.0)), float(score))
    return best


def calibrate(segmenter, manifest, split: str = "val", progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    from vlseg.io.scan import load_label, load_scan
    from vlseg.prepare.manifest import read_manifest

    cases = read_manifest(manifest, split=split)
    if not cases:
        raise VlsegError(f"{manifest}: no cases in split {split!r} to calibrate on")
    names = set(segmenter.vocabulary.names)
    probabilities, present = [], []
    for case in tqdm(cases, desc=f"calibrating on {split}", disable=not progress):
        asked = [c for c in case.classes if c in names]
        if not asked:
            continue
        scan = load_scan(case.image)
        label = load_label(case.label, like=scan)
        result = segmenter.segment(scan, asked, modality=case.modality, interpret=False, presence_threshold=0.0)
        for name, r in zip(asked, result.results):
            probabilities.append(r.presence_probability)
            present.append(bool(case.class_mask(label, name).any()))
    if not probabilities:
        raise VlsegError(f"{manifest}: no case of split {split!r} annotates a class this model knows")
    threshold, score = best_threshold(probabilities, present)
    y, p = np.asarray(present), np.asarray(probabilities)
    before = float(segmenter.config["inference"]["presence_threshold"])
    return {"presence_threshold": threshold, "balanced_accuracy": score,
            "balanced_accuracy_before": float(0.5 * ((p[y] >= before).mean() + (p[~y] < before).mean())),
            "threshold_before": before, "present": int(y.sum()), "absent": int((~y).sum()), "split": split,
            "manifest": str(manifest)}


def read_calibration(checkpoint: Path) -> dict | None:
    path = Path(checkpoint) / CALIBRATION
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        float(data["presence_threshold"])
    except (ValueError, KeyError, TypeError):
        raise VlsegError(f"{path}: not a calibration file vlseg wrote (delete it, or run vlseg calibrate again)")
    return data
