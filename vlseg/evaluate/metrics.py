"""Per-case scores for one binary mask pair (Dice, NSD, HD95, volumes), computed with MONAI's metrics.

MONAI is used for every score, but wrapped, because its defaults do not fit text-prompted evaluation:

* Empty masks.  ``compute_dice`` ignores (NaN) an empty ground truth unless ``ignore_empty=False``, and the distance
  metrics return NaN/inf and warn when either mask is empty.  Absent-class prompts are a normal case here, so empty
  masks are scored before MONAI is called (both empty: Dice = NSD = 1, HD95 = NaN; one empty: Dice = NSD = 0,
  HD95 = NaN) and only non-empty pairs reach MONAI.
* Units.  The distance metrics measure in voxels unless ``spacing`` is passed, so the spacing is always passed
  (as a list of floats: MONAI rejects a sequence mixing ints and floats), making HD95 and the NSD tolerance mm.
* Speed.  MONAI makes several full-volume passes, so both masks are first cropped to the bounding box of their
  union plus one voxel; this changes no score (the voxels dropped are background in both masks, and a mask touching
  the border of the crop is treated exactly as one touching the border of the volume, since erosion counts outside
  voxels as background either way).  The MONAI calls also run with one torch thread: they are many small reductions
  for which waking a thread pool costs more than it saves, badly so on a busy machine (10x measured on 2 cores).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

METRIC_KEYS = ("dice", "nsd", "hd95", "gt_voxels", "pred_voxels", "gt_present", "pred_present", "false_positive",
               "false_negative", "gt_volume_ml", "pred_volume_ml")


def _as_mask(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        return a
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected a boolean or 0/1 array, got dtype {a.dtype}")
    mask = a != 0
    if not np.array_equal(mask, a == 1):  # something other than 0 and 1, e.g. probabilities or a label map
        raise ValueError(f"{name}: expected a binary mask (0/1), found other values")
    return mask


def _spacing(spacing) -> list[float]:
    try:
        sp = [float(s) for s in spacing]
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be three positive numbers, got {spacing!r}") from None
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be three positive numbers, got {spacing!r}")
    return sp


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _crop_to_union(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of ``pred | gt`` grown by one voxel (clipped to the array)."""
    union = pred | gt
    box = []
    for axis in range(union.ndim):
        others = tuple(a for a in range(union.ndim) if a != axis)
        idx = np.flatnonzero(union.any(axis=others))
        box.append(slice(max(int(idx[0]) - 1, 0), int(idx[-1]) + 2))
    box = tuple(box)
    return pred[box], gt[box]


def score_case(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float],
               nsd_tolerance_mm: float = 2.0) -> dict:
    """Scores of one binary 3D prediction against its ground truth on the same voxel grid.

    ``spacing`` is the voxel size in mm along the three array axes.  Returns a dict with ``dice``, ``nsd``
    (normalised surface Dice at ``nsd_tolerance_mm``), ``hd95`` (mm; NaN when either mask is empty),
    ``gt_voxels``/``pred_voxels``, ``gt_present``/``pred_present``, ``false_positive`` (nothing there but a mask
    was drawn), ``false_negative`` (something there but nothing drawn) and ``gt_volume_ml``/``pred_volume_ml``.
    Raises ``ValueError`` for masks of different shapes, non-3D or non-binary masks, or a bad spacing/tolerance.
    """
    pred, gt = _as_mask(pred, "prediction"), _as_mask(gt, "ground truth")
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    if pred.ndim != 3:
        raise ValueError(f"expected 3D masks, got shape {pred.shape}")
    sp = _spacing(spacing)
    tol = float(nsd_tolerance_mm)
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"nsd_tolerance_mm must be a non-negative number, got {nsd_tolerance_mm!r}")

    n_pred, n_gt = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
    ml_per_voxel = sp[0] * sp[1] * sp[2] / 1000.0
    out = {
        "gt_voxels": n_gt,
        "pred_voxels": n_pred,
        "gt_present": n_gt > 0,
        "pred_present": n_pred > 0,
        "false_positive": n_gt == 0 and n_pred > 0,
        "false_negative": n_gt > 0 and n_pred == 0,
        "gt_volume_ml": n_gt * ml_per_voxel,
        "pred_volume_ml": n_pred * ml_per_voxel,
    }
    if n_gt == 0 or n_pred == 0:
        # Decided here, not by MONAI (see the module docstring): both empty is a correct "absent" answer.
        agree = 1.0 if n_gt == n_pred else 0.0
        return {"dice": agree, "nsd": agree, "hd95": float("nan"), **out}

    pred_c, gt_c = _crop_to_union(pred, gt)
    y_pred = torch.from_numpy(np.ascontiguousarray(pred_c))[None, None]  # MONAI wants (batch, channel, x, y, z)
    y = torch.from_numpy(np.ascontiguousarray(gt_c))[None, None]
    with _one_torch_thread(), warnings.catch_warnings():
        # include_background=True: the single channel IS the foreground (MONAI would otherwise drop channel 0).
        # ignore_empty=False is belt and braces: empty masks never get here.
        dice = compute_dice(y_pred.float(), y.float(), include_background=True, ignore_empty=False)
        # MONAI 1.5/1.6 warns (FutureWarning) about a deprecated argument it passes to itself in get_mask_edges.
        warnings.simplefilter("ignore", FutureWarning)
        hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=sp)
        nsd = compute_surface_dice(y_pred, y, class_thresholds=[tol], include_background=True, spacing=sp)
    return {"dice": float(dice[0, 0]), "nsd": float(nsd[0, 0]), "hd95": float(hd95[0, 0]), **out}


def _finite(values) -> list[float]:
    out = []
    for v in values:
        if v is None:
            continue
        v = float(v)
        if not math.isnan(v):
            out.append(v)
    return out


def _mean(values) -> float:
    vals = _finite(values)
    return float(np.mean(vals)) if vals else float("nan")


def _std(values) -> float:
    vals = _finite(values)
    return float(np.std(vals)) if vals else float("nan")  # population std (ddof=0): 0.0 for a single row


def _sort_key(key: tuple) -> tuple:
    # Group keys may mix types (e.g. None next to strings); order by type name first so sorting never fails.
    return tuple((type(k).__name__, k) if k is not None else ("", "") for k in key)


def summarise(rows: list[dict], by: tuple[str, ...]) -> list[dict]:
    """One dict per group of ``rows`` (grouped on the keys in ``by``; ``()`` gives a single overall group).

    Each holds the group keys, ``n``, ``dice_mean``/``dice_std``, ``nsd_mean``/``nsd_std`` (population std),
    ``hd95_mean`` (NaN rows ignored; NaN if none is finite), ``false_positives`` and ``false_negatives`` (counts).
    Groups come out sorted by their keys.  No rows gives an empty list.
    """
    by = tuple(by)
    groups: dict[tuple, list[dict]] = {}
    for i, row in enumerate(rows):
        missing = [k for k in by if k not in row]
        if missing:
            raise ValueError(f"row {i} lacks grouping key(s) {missing}")
        groups.setdefault(tuple(row[k] for k in by), []).append(row)
    out = []
    for key in sorted(groups, key=_sort_key):
        members = groups[key]
        dice = [r["dice"] for r in members]
        nsd = [r["nsd"] for r in members]
        out.append({
            **dict(zip(by, key)),
            "n": len(members),
            "dice_mean": _mean(dice),
            "dice_std": _std(dice),
            "nsd_mean": _mean(nsd),
            "nsd_std": _std(nsd),
            "hd95_mean": _mean(r.get("hd95") for r in members),
            "false_positives": sum(bool(r.get("false_positive", False)) for r in members),
            "false_negatives": sum(bool(r.get("false_negative", False)) for r in members),
        })
    return out
