"""The inference settings released models need: nnU-Net's window placement, logit blending, zero padding, the crop to
non-zero voxels, intensity schemes and the largest connected component."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlseg.infer.stitching import PromptStitcher, stitch, window_starts
from vlseg.transforms.intensity import normalize_intensity


@pytest.mark.parametrize("size, roi", [(192, 192), (250, 192), (400, 192), (517, 96), (97, 96), (1000, 128)])
def test_nnunet_placement_matches_nnunet(size, roi):
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    theirs = compute_steps_for_sliding_window((size, size, size), (roi, roi, roi), 0.5)[0]
    assert window_starts(size, roi, 0.5, "nnunet") == [int(v) for v in theirs]


def test_logit_blending_equals_a_float_blend_of_logits():
    """Two overlapping windows with logits of opposite sign: the blended logit's sign decides, as in VoxTell's own
    float accumulation, and a prompt far below the floor in one window still blends there at the floor value."""
    from monai.data.utils import compute_importance_map

    roi, grid = (8, 8, 8), (12, 8, 8)
    rng = np.random.default_rng(0)
    logits = [torch.from_numpy(rng.normal(0, 4, (2, *roi)).astype(np.float32)) for _ in range(2)]
    logits[1][1] = -40.0  # prompt 1: certainly absent in the second window (below the -20 floor)
    stitcher = PromptStitcher(grid, roi, 0.5, 2, blend="logit", placement="nnunet")
    assert stitcher.corners == [(0, 0, 0), (4, 0, 0)]
    for corner, window in zip(stitcher.corners, logits):
        stitcher.add(corner, window)
    w = compute_importance_map(roi, mode="gaussian", sigma_scale=0.125, device="cpu").float().clamp_min(1e-3)
    total, weight = torch.zeros(2, *grid), torch.zeros(grid)
    for (x, _, _), window in zip(stitcher.corners, [logits[0], torch.stack([logits[1][0], torch.full(roi, -20.0)])]):
        total[:, x:x + 8] += window * w
        weight[x:x + 8] += w
    expected = torch.sigmoid(total / weight).numpy()
    for k in range(2):
        assert np.abs(stitcher.probability(k) - expected[k]).max() < 2e-3
        assert np.array_equal(stitcher.probability(k) >= 0.5, expected[k] >= 0.5)


def test_constant_padding_pads_with_zeros():
    seen = []

    def encode(windows):
        seen.append(windows.clone())
        return windows

    def decode(features, start, stop):
        return torch.zeros(features.shape[0], stop - start, *features.shape[2:]), torch.zeros(features.shape[0], 1)

    image = torch.full((1, 1, 4, 8, 8), 5.0)
    stitch(image, (8, 8, 8), 0.5, 1, encode, decode, pad_mode="constant")
    assert seen[0][0, 0, :2].abs().max() == 0 and seen[0][0, 0, 2:6].min() == 5.0
    seen.clear()
    stitch(image, (8, 8, 8), 0.5, 1, encode, decode)  # default: edge replication
    assert seen[0].min() == 5.0


def test_intensity_schemes():
    ct = np.array([[[-1000.0, -175.0, 0.0, 250.0, 2000.0]]], np.float32)
    unit = normalize_intensity(ct, "CT", (-175, 250), "window_unit")
    assert np.allclose(unit, [[[0, 0, 175 / 425, 1, 1]]])
    clipped = np.clip(ct, -500, 1000)
    z = normalize_intensity(ct, "CT", (-500, 1000), "window_zscore")
    assert np.allclose(z, (clipped - clipped.mean()) / clipped.std(), atol=1e-5)
    mr = np.zeros((4, 5, 6), np.float32)
    mr[1:3, 1:4, 1:5] = np.arange(24, dtype=np.float32).reshape(2, 3, 4) + 100
    lo, hi = np.percentile(mr, [0.5, 99.5])  # SAT: over every voxel, the zeros around the body included
    expected = (np.clip(mr, lo, hi) - np.clip(mr, lo, hi).mean()) / np.clip(mr, lo, hi).std()
    assert np.allclose(normalize_intensity(mr, "MR", (-500, 1000), "window_zscore"), expected, atol=1e-5)
    whole = normalize_intensity(ct, "MR", (-500, 1000), "zscore")  # every modality, nothing clipped
    assert np.allclose(whole, (ct - ct.mean()) / ct.std(), atol=1e-5)
    assert np.allclose(normalize_intensity(ct, "CT", (-200, 300)), normalize_intensity(ct, "CT", (-200, 300), "vlseg"))


def test_largest_component_keeps_the_biggest_blob():
    from vlseg.infer.segmenter import largest_component

    mask = np.zeros((10, 10, 10), np.uint8)
    mask[0:2, 0:2, 0:2] = 1
    mask[5:9, 5:9, 5:9] = 1
    kept = largest_component(mask)
    assert kept.sum() == 64 and kept[6, 6, 6] == 1 and kept[0, 0, 0] == 0


def test_foreground_boxes():
    from vlseg.infer.segmenter import foreground_box

    data = np.zeros((6, 7, 8))
    data[1:3, 2:5, 3:4] = -1000
    data[2, 3, 3] = 40
    lo, hi = foreground_box(data, "nonzero")
    assert lo.tolist() == [1, 2, 3] and hi.tolist() == [3, 5, 4]
    lo, hi = foreground_box(data, "positive")
    assert lo.tolist() == [2, 3, 3] and hi.tolist() == [3, 4, 4]
    assert foreground_box(np.zeros((3, 3, 3)), "nonzero") is None and foreground_box(data, None) is None
    ct = np.full((6, 7, 8), -1000.0)  # air around a body
    ct[2:4, 1:6, 0:5] = -150.0
    lo, hi = foreground_box(ct, "window", (-175, 250))  # above the window's low end
    assert lo.tolist() == [2, 1, 0] and hi.tolist() == [4, 6, 5]
