"""score_case and summarise: hand-computed values on simple geometries, every empty/non-empty case, units in mm."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial import cKDTree

from vlseg.evaluate.metrics import score_case, summarise

SHAPE = (24, 24, 24)


def box(lo, hi, shape=SHAPE) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    return m


def cube(offset=(0, 0, 0), side=10, start=5, shape=SHAPE) -> np.ndarray:
    lo = [start + o for o in offset]
    return box(lo, [v + side for v in lo], shape)


def reference_surface_distances(a: np.ndarray, b: np.ndarray, spacing) -> np.ndarray:
    """Brute-force a → b distances (mm) between edge voxels (mask minus its 6-connected erosion), for checking."""
    edge = lambda m: np.argwhere(m & ~ndimage.binary_erosion(m)) * np.asarray(spacing, float)  # noqa: E731
    return cKDTree(edge(b)).query(edge(a))[0]


# --- Dice ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 1, 2, 3, 5, 10])
def test_dice_of_cubes_offset_by_k_voxels(k):
    # Two 10^3 cubes offset by k voxels along one axis overlap in (10 - k) * 10 * 10 voxels.
    s = score_case(cube((0, 0, k)), cube(), spacing=(1.0, 1.0, 1.0))
    assert s["dice"] == pytest.approx(2 * max(10 - k, 0) * 100 / 2000)


def test_dice_does_not_depend_on_spacing_and_mixes_sizes():
    small, big = cube(side=4, start=8), cube(side=8, start=6)  # small lies inside big: overlap 64, sizes 64 and 512
    for spacing in [(1, 1, 1), (0.5, 2.0, 7.0)]:
        assert score_case(small, big, spacing)["dice"] == pytest.approx(2 * 64 / (64 + 512))


# --- HD95 in mm -----------------------------------------------------------------------------------------------------

def test_hd95_of_parallel_planes_is_their_gap_in_mm():
    # Two one-voxel-thick planes 3 voxels apart along axis 0: every surface distance is exactly 3 voxels.
    a, b = box((5, 0, 0), (6, 24, 24)), box((8, 0, 0), (9, 24, 24))
    assert score_case(a, b, (1.0, 1.0, 1.0))["hd95"] == pytest.approx(3.0)
    assert score_case(a, b, (2.0, 1.0, 1.0))["hd95"] == pytest.approx(6.0)  # mm, not voxels
    assert score_case(a, b, (1.0, 5.0, 5.0))["hd95"] == pytest.approx(3.0)  # spacing on other axes is irrelevant
    assert score_case(a, b, (0.5, 1.0, 1.0))["hd95"] == pytest.approx(1.5)


@pytest.mark.parametrize("spacing, expected", [((1.0, 1.0, 1.0), 2.0), ((3.0, 1.0, 1.0), 6.0),
                                               ((1.0, 3.0, 3.0), 2.0), ((2.5, 0.7, 0.7), 5.0)])
def test_hd95_of_cube_shifted_two_voxels_along_x(spacing, expected):
    # The shifted cube's far face (100 of its 488 edge voxels, > 5 %) lies exactly 2 voxels along x from the other
    # cube's face, and no edge voxel is farther, so the 95th percentile is 2 * spacing[0] in both directions.
    s = score_case(cube((2, 0, 0)), cube(), spacing)
    assert s["hd95"] == pytest.approx(expected)


def test_hd95_and_nsd_match_brute_force_reference_with_anisotropic_spacing():
    z, y, x = np.mgrid[:24, :24, :24]
    gt = ((z - 12) / 8.0) ** 2 + ((y - 11) / 6.0) ** 2 + ((x - 12) / 7.0) ** 2 <= 1
    pred = ((z - 13) / 7.0) ** 2 + ((y - 12) / 6.5) ** 2 + ((x - 11) / 7.5) ** 2 <= 1
    spacing, tol = (0.8, 1.7, 2.9), 1.5
    s = score_case(pred, gt, spacing, nsd_tolerance_mm=tol)
    d_pg = reference_surface_distances(pred, gt, spacing)
    d_gp = reference_surface_distances(gt, pred, spacing)
    assert s["hd95"] == pytest.approx(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)), rel=1e-5)
    assert s["nsd"] == pytest.approx(((d_pg <= tol).sum() + (d_gp <= tol).sum()) / (d_pg.size + d_gp.size), rel=1e-5)
    assert 0.0 < s["nsd"] < 1.0


def test_masks_touching_the_volume_border_score_as_monai_does_on_the_full_arrays():
    # score_case crops to the masks' bounding box before calling MONAI; the scores must be unchanged.
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    gt = box((0, 3, 0), (9, 15, 24))
    pred = box((2, 0, 1), (12, 14, 24))
    spacing = [1.5, 0.9, 2.0]
    s = score_case(pred, gt, spacing, nsd_tolerance_mm=2.0)
    yp, yg = torch.from_numpy(pred)[None, None].float(), torch.from_numpy(gt)[None, None].float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        hd = float(compute_hausdorff_distance(yp, yg, percentile=95, spacing=spacing)[0, 0])
        nsd = float(compute_surface_dice(yp, yg, class_thresholds=[2.0], spacing=spacing)[0, 0])
    assert s["hd95"] == pytest.approx(hd) and s["nsd"] == pytest.approx(nsd)


# --- NSD ------------------------------------------------------------------------------------------------------------

def test_nsd_is_one_for_identical_masks_and_drops_beyond_tolerance():
    same = score_case(cube(), cube(), (1.0, 1.0, 1.0))
    assert same["dice"] == 1.0 and same["nsd"] == pytest.approx(1.0) and same["hd95"] == 0.0
    # A 2-voxel shift is within a 2 mm tolerance at 1 mm spacing ...
    assert score_case(cube((2, 0, 0)), cube(), (1.0, 1.0, 1.0), nsd_tolerance_mm=2.0)["nsd"] == pytest.approx(1.0)
    # ... but not at 3 mm voxels, where the shifted faces are 6 mm apart.
    shifted = score_case(cube((2, 0, 0)), cube(), (3.0, 1.0, 1.0), nsd_tolerance_mm=2.0)
    assert shifted["nsd"] < 1.0


def test_nsd_of_parallel_planes_switches_at_the_tolerance():
    a, b = box((5, 0, 0), (6, 24, 24)), box((8, 0, 0), (9, 24, 24))  # 6 mm apart at 2 mm spacing
    assert score_case(a, b, (2.0, 1.0, 1.0), nsd_tolerance_mm=5.9)["nsd"] == pytest.approx(0.0)
    assert score_case(a, b, (2.0, 1.0, 1.0), nsd_tolerance_mm=6.0)["nsd"] == pytest.approx(1.0)
    assert score_case(a, b, (2.0, 1.0, 1.0))["nsd"] == pytest.approx(0.0)  # default tolerance 2 mm


# --- empty masks, presence flags and volumes ------------------------------------------------------------------------

@pytest.mark.parametrize("pred_empty, gt_empty, dice, nsd, fp, fn", [
    (True, True, 1.0, 1.0, False, False),     # absent class correctly left empty
    (False, True, 0.0, 0.0, True, False),     # absent class answered with a mask
    (True, False, 0.0, 0.0, False, True),     # present class missed
])
def test_empty_mask_cases(pred_empty, gt_empty, dice, nsd, fp, fn):
    empty, full = np.zeros(SHAPE, bool), cube()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no MONAI "all 0" or NaN warnings leak out
        s = score_case(empty if pred_empty else full, empty if gt_empty else full, (1.0, 2.0, 3.0))
    assert s["dice"] == dice and s["nsd"] == nsd and math.isnan(s["hd95"])
    assert s["false_positive"] is fp and s["false_negative"] is fn
    assert s["gt_present"] is (not gt_empty) and s["pred_present"] is (not pred_empty)
    assert s["gt_voxels"] == (0 if gt_empty else 1000) and s["pred_voxels"] == (0 if pred_empty else 1000)
    assert isinstance(s["dice"], float) and isinstance(s["hd95"], float) and isinstance(s["gt_voxels"], int)


def test_both_present_flags_and_types():
    s = score_case(cube((1, 0, 0)), cube(), (1.0, 1.0, 1.0))
    assert s["gt_present"] and s["pred_present"] and not s["false_positive"] and not s["false_negative"]
    assert all(isinstance(s[k], float) for k in ("dice", "nsd", "hd95", "gt_volume_ml", "pred_volume_ml"))
    assert all(type(s[k]) is int for k in ("gt_voxels", "pred_voxels"))
    assert all(type(s[k]) is bool for k in ("gt_present", "pred_present", "false_positive", "false_negative"))


def test_volumes_in_millilitres():
    s = score_case(cube(side=4), cube(side=10), spacing=(0.5, 2.0, 3.0))  # 3 mm^3 per voxel
    assert s["gt_voxels"] == 1000 and s["pred_voxels"] == 64
    assert s["gt_volume_ml"] == pytest.approx(3.0) and s["pred_volume_ml"] == pytest.approx(0.192)
    empty = score_case(np.zeros(SHAPE, bool), np.zeros(SHAPE, bool), (1, 1, 1))
    assert empty["gt_volume_ml"] == 0.0 and empty["pred_volume_ml"] == 0.0


# --- input handling -------------------------------------------------------------------------------------------------

def test_zero_one_arrays_score_like_bool_and_int_spacing_is_accepted():
    pred, gt = cube((1, 2, 0)), cube()
    a = score_case(pred, gt, (1.0, 2.0, 1.5))
    b = score_case(pred.astype(np.uint8), gt.astype(np.float32), (1, 2, 1.5))  # mixed int/float spacing too
    assert a == pytest.approx(b, nan_ok=True)


@pytest.mark.parametrize("pred, gt, spacing, tol", [
    (np.zeros((8, 8, 8), bool), np.zeros((8, 8, 7), bool), (1, 1, 1), 2.0),       # shape mismatch
    (np.zeros((8, 8), bool), np.zeros((8, 8), bool), (1, 1, 1), 2.0),             # not 3D
    (np.full((8, 8, 8), 0.5), np.zeros((8, 8, 8), bool), (1, 1, 1), 2.0),        # probabilities, not a mask
    (np.full((8, 8, 8), 2, np.uint8), np.zeros((8, 8, 8), bool), (1, 1, 1), 2.0),  # a label map
    (np.zeros((8, 8, 8), bool), np.zeros((8, 8, 8), bool), (1, 1), 2.0),          # spacing of 2 values
    (np.zeros((8, 8, 8), bool), np.zeros((8, 8, 8), bool), (1, 0, 1), 2.0),       # zero spacing
    (np.zeros((8, 8, 8), bool), np.zeros((8, 8, 8), bool), (1, 1, 1), -1.0),      # negative tolerance
])
def test_bad_input_raises_value_error(pred, gt, spacing, tol):
    with pytest.raises(ValueError):
        score_case(pred, gt, spacing, nsd_tolerance_mm=tol)


# --- summarise ------------------------------------------------------------------------------------------------------

def _row(dataset, cls, dice, nsd, hd95, fp=False, fn=False):
    return {"dataset": dataset, "class": cls, "dice": dice, "nsd": nsd, "hd95": hd95,
            "false_positive": fp, "false_negative": fn}


ROWS = [
    _row("a", "liver", 1.0, 1.0, float("nan")),            # both empty
    _row("a", "liver", 0.5, 0.25, 4.0),
    _row("a", "liver", 0.0, 0.0, float("nan"), fp=True),
    _row("a", "spleen", 0.0, 0.0, float("nan"), fn=True),
    _row("b", "liver", 0.8, 0.6, 2.0),
    _row("b", "liver", 0.6, 0.4, 6.0),
]


def test_summarise_by_class():
    liver, spleen = summarise(ROWS, ("class",))
    assert liver["class"] == "liver" and liver["n"] == 5
    assert liver["dice_mean"] == pytest.approx(np.mean([1.0, 0.5, 0.0, 0.8, 0.6]))
    assert liver["dice_std"] == pytest.approx(np.std([1.0, 0.5, 0.0, 0.8, 0.6]))
    assert liver["nsd_mean"] == pytest.approx(np.mean([1.0, 0.25, 0.0, 0.6, 0.4]))
    assert liver["nsd_std"] == pytest.approx(np.std([1.0, 0.25, 0.0, 0.6, 0.4]))
    assert liver["hd95_mean"] == pytest.approx(4.0)  # mean of 4, 2, 6; NaN rows ignored
    assert liver["false_positives"] == 1 and liver["false_negatives"] == 0
    assert spleen["n"] == 1 and spleen["dice_std"] == 0.0 and math.isnan(spleen["hd95_mean"])
    assert spleen["false_positives"] == 0 and spleen["false_negatives"] == 1


def test_summarise_by_two_keys_and_overall():
    groups = summarise(ROWS, ("dataset", "class"))
    assert [(g["dataset"], g["class"], g["n"]) for g in groups] == [("a", "liver", 3), ("a", "spleen", 1),
                                                                    ("b", "liver", 2)]
    b_liver = groups[2]
    assert b_liver["dice_mean"] == pytest.approx(0.7) and b_liver["dice_std"] == pytest.approx(0.1)
    assert b_liver["hd95_mean"] == pytest.approx(4.0)
    a_liver = groups[0]
    assert a_liver["hd95_mean"] == pytest.approx(4.0) and a_liver["false_positives"] == 1
    (overall,) = summarise(ROWS, ())
    assert overall["n"] == 6 and overall["false_positives"] == 1 and overall["false_negatives"] == 1
    assert overall["dice_mean"] == pytest.approx(2.9 / 6)
    assert set(overall) == {"n", "dice_mean", "dice_std", "nsd_mean", "nsd_std", "hd95_mean", "false_positives",
                            "false_negatives"}


def test_summarise_edge_cases():
    assert summarise([], ("class",)) == []
    with pytest.raises(ValueError):
        summarise([{"dice": 1.0, "nsd": 1.0, "hd95": 0.0}], ("class",))
    # Rows straight from score_case work, extra keys are ignored.
    rows = [{"class": "x", **score_case(cube(), cube(), (1, 1, 1))},
            {"class": "x", **score_case(np.zeros(SHAPE, bool), cube(), (1, 1, 1))}]
    (g,) = summarise(rows, ("class",))
    assert g["dice_mean"] == pytest.approx(0.5) and g["hd95_mean"] == 0.0 and g["false_negatives"] == 1
