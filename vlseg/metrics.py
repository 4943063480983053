"""Per-case scores for one binary mask pair, from MONAI's metrics, with empty masks handled explicitly.

MONAI returns NaN (or ignores the case) when the ground truth is empty, and measures distances in voxels unless given
the spacing; evaluation of text prompts needs absent classes scored, so the empty cases are decided here and only
non-empty pairs go to MONAI, always with the spacing in mm.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice


def score_case(pred: np.ndarray, gt: np.ndarray, spacing, nsd_tolerance_mm: float = 2.0) -> dict:
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    p_n, g_n = int(pred.sum()), int(gt.sum())
    voxel_ml = float(np.prod(spacing)) / 1000.0
    out = {"gt_voxels": g_n, "pred_voxels": p_n, "gt_present": g_n > 0, "pred_present": p_n > 0,
           "false_positive": g_n == 0 and p_n > 0, "false_negative": g_n > 0 and p_n == 0,
           "gt_volume_ml": g_n * voxel_ml, "pred_volume_ml": p_n * voxel_ml}
    if g_n == 0 or p_n == 0:
        agree = float(g_n == 0 and p_n == 0)  # both empty: the absent class was correctly left empty
        return {"dice": agree, "nsd": agree, "hd95": float("nan"), **out}
    yp = torch.from_numpy(pred)[None, None].float()
    yg = torch.from_numpy(gt)[None, None].float()
    sp = [float(s) for s in spacing]
    dice = float(compute_dice(yp, yg, include_background=True, ignore_empty=False)[0, 0])
    with warnings.catch_warnings():  # MONAI 1.5+ warns about its own internal use of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        hd95 = float(compute_hausdorff_distance(yp, yg, include_background=True, percentile=95, spacing=sp)[0, 0])
        nsd = float(compute_surface_dice(yp, yg, class_thresholds=[nsd_tolerance_mm], include_background=True,
                                         spacing=sp)[0, 0])
    return {"dice": dice, "nsd": nsd, "hd95": hd95, **out}


def _mean_std(values):
    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return float("nan"), float("nan")
    return float(np.mean(vals)), float(np.std(vals))


def summarise(rows: list[dict], by: tuple[str, ...]) -> list[dict]:
    """Group rows by the keys in ``by``: n, Dice/NSD mean±std, HD95 mean (NaN-free), false positives/negatives."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in by), []).append(row)
    out = []
    for key, members in sorted(groups.items()):
        dice_m, dice_s = _mean_std([r["dice"] for r in members])
        nsd_m, nsd_s = _mean_std([r["nsd"] for r in members])
        out.append({**dict(zip(by, key)), "n": len(members), "dice_mean": dice_m, "dice_std": dice_s,
                    "nsd_mean": nsd_m, "nsd_std": nsd_s, "hd95_mean": _mean_std([r["hd95"] for r in members])[0],
                    "false_positives": sum(bool(r["false_positive"]) for r in members),
                    "false_negatives": sum(bool(r["false_negative"]) for r in members)})
    return out
