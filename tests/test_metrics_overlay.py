"""Scores with exact expected values, and the overlay's orientation read back from its pixels."""

import math

import numpy as np
import pytest
from PIL import Image

from vlseg.metrics import score_case, summarise
from vlseg.overlay import COLOURS, save_overlay


def _cube(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


def test_dice_hd95_nsd_in_mm():
    gt = _cube((20, 20, 20), (5, 5, 5), (15, 15, 15))
    shifted = _cube((20, 20, 20), (7, 5, 5), (17, 15, 15))  # 2 voxels along x
    s = score_case(shifted, gt, spacing=(3.0, 1.0, 1.0), nsd_tolerance_mm=1.0)
    assert s["dice"] == pytest.approx(2 * 800 / 2000)
    assert s["hd95"] == pytest.approx(6.0)  # 2 voxels × 3 mm, not 2
    assert s["nsd"] < 1.0
    same = score_case(gt, gt, spacing=(1, 1, 1))
    assert same["dice"] == 1.0 and same["nsd"] == 1.0 and same["hd95"] == 0.0
    assert same["gt_volume_ml"] == pytest.approx(1.0)


def test_empty_cases_are_scored_explicitly():
    empty, full = np.zeros((8, 8, 8), bool), _cube((8, 8, 8), (2, 2, 2), (5, 5, 5))
    both = score_case(empty, empty, (1, 1, 1))
    assert both["dice"] == 1.0 and both["nsd"] == 1.0 and math.isnan(both["hd95"]) and not both["false_positive"]
    fp = score_case(full, empty, (1, 1, 1))
    assert fp["dice"] == 0.0 and fp["false_positive"] and not fp["false_negative"]
    fn = score_case(empty, full, (1, 1, 1))
    assert fn["dice"] == 0.0 and fn["false_negative"]
    with pytest.raises(ValueError):
        score_case(empty, np.zeros((8, 8, 7), bool), (1, 1, 1))


def test_summarise_groups_and_ignores_nan():
    rows = [{"class": "a", "dice": 1.0, "nsd": 1.0, "hd95": float("nan"), "false_positive": False,
             "false_negative": False},
            {"class": "a", "dice": 0.5, "nsd": 0.25, "hd95": 4.0, "false_positive": True, "false_negative": False},
            {"class": "b", "dice": 0.0, "nsd": 0.0, "hd95": float("nan"), "false_positive": False,
             "false_negative": True}]
    a, b = summarise(rows, ("class",))
    assert a["n"] == 2 and a["dice_mean"] == 0.75 and a["dice_std"] == 0.25 and a["hd95_mean"] == 4.0
    assert a["false_positives"] == 1 and b["false_negatives"] == 1 and math.isnan(b["hd95_mean"])
    assert summarise(rows, ())[0]["n"] == 3


def test_overlay_orientation(tmp_path):
    shape = (40, 30, 20)
    image = np.zeros(shape, np.float32)
    right = _cube(shape, (2, 10, 8), (8, 20, 18))  # patient's right: low x
    top = _cube(shape, (30, 10, 15), (36, 20, 19))  # patient's left and superior
    path = save_overlay(image, {"right": right, "top": top}, tmp_path / "o.png", spacing=(1, 1, 1), title="t")
    png = np.asarray(Image.open(path).convert("RGB"))
    assert png.shape[0] >= 256
    panel_w = round(40 * 256 / 30)  # axial panel: 40 mm wide, 30 mm tall, scaled to 256 px
    axial = png[:256, :panel_w]
    cols = np.argwhere(np.all(axial == COLOURS[0], axis=-1))[:, 1]
    assert len(cols) and cols.mean() < panel_w / 2  # patient right on the viewer's left
    coronal = png[:256, panel_w + 4: panel_w + 4 + round(40 * 256 / 20)]
    rows = np.argwhere(np.all(coronal == COLOURS[1], axis=-1))[:, 0]
    assert len(rows) and rows.mean() < 128  # superior at the top
    assert not list(tmp_path.glob(".tmp-*"))
