"""Masked back-propagation: unannotated queries contribute exactly nothing."""

import pytest
import torch

from vlseg.models.features import FusionOutput
from vlseg.train.losses import LOSSES, SegmentationLoss, soft_dice_loss


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 3, 6, 6, 4, generator=g, requires_grad=True)
    presence = torch.randn(2, 3, generator=g, requires_grad=True)
    target = torch.zeros(2, 3, 6, 6, 4)
    target[0, 0, 1:4, 1:4, 1:3] = 1  # annotated, present
    target[1, 1, 2:5, 2:5, :] = 1  # annotated, present
    # [0, 1] annotated but absent (a negative); [0, 2] and [1, 2] not annotated; [1, 0] is padding
    annotated = torch.tensor([[True, True, False], [False, True, False]])
    query_mask = torch.tensor([[True, True, True], [False, True, True]])
    return FusionOutput(logits, presence), target, annotated, query_mask


def test_gradient_is_exactly_zero_through_unannotated_and_padded_queries():
    out, target, annotated, query_mask = _batch()
    parts = LOSSES.build({"name": "masked"})(out, target, annotated, query_mask)
    assert parts["n"] == 3
    parts["loss"].backward()
    g, gp = out.mask_logits.grad, out.presence_logits.grad
    for b, q in [(0, 2), (1, 2), (1, 0)]:  # unannotated, unannotated, padding
        assert torch.count_nonzero(g[b, q]) == 0 and gp[b, q] == 0
    for b, q in [(0, 0), (0, 1), (1, 1)]:  # supervised, including the in-set negative
        assert torch.count_nonzero(g[b, q]) > 0 and gp[b, q] != 0


def test_naive_variant_supervises_unannotated_as_background_and_differs():
    out, target, annotated, query_mask = _batch()
    masked = LOSSES.build({"name": "masked"})(out, target, annotated, query_mask)
    naive = LOSSES.build({"name": "naive"})(out, target, annotated, query_mask)
    assert naive["n"] == 5 and not torch.isclose(masked["loss"], naive["loss"])
    naive["loss"].backward()
    assert torch.count_nonzero(out.mask_logits.grad[0, 2]) > 0  # pushed towards background
    assert torch.count_nonzero(out.mask_logits.grad[1, 0]) == 0  # padding is never supervised


def test_masked_loss_ignores_what_unannotated_queries_predict():
    out, target, annotated, query_mask = _batch()
    loss_fn = SegmentationLoss("masked")
    base = loss_fn(out, target, annotated, query_mask)["loss"]
    changed = FusionOutput(out.mask_logits.detach().clone(), out.presence_logits.detach().clone())
    changed.mask_logits[0, 2] = 50.0  # wild predictions where nothing is annotated
    changed.presence_logits[1, 2] = -50.0
    assert torch.equal(loss_fn(changed, target, annotated, query_mask)["loss"], base.detach())


def test_empty_target_dice_is_defined_explicitly():
    target = torch.zeros(1, 1000)
    assert soft_dice_loss(torch.zeros(1, 1000), target).item() == 0.0  # nothing predicted: perfect
    everything = soft_dice_loss(torch.ones(1, 1000), target).item()
    assert everything > 0.9  # the whole crop predicted: near-maximal loss, not ≈0 as smoothed Dice would say
    small = soft_dice_loss(torch.full((1, 1000), 0.1), target, empty_kappa=100.0).item()
    assert abs(small - 0.5) < 1e-6  # Σp = κ gives ½
    # Non-empty target: the ordinary Dice.
    t = torch.zeros(1, 10)
    t[0, :5] = 1
    p = torch.zeros(1, 10)
    p[0, :5] = 1
    assert soft_dice_loss(p, t).item() < 1e-6
    assert abs(soft_dice_loss(1 - p, t).item() - 1.0) < 1e-6


def test_no_supervised_query_gives_zero_loss_with_a_graph():
    out, target, _, query_mask = _batch()
    parts = SegmentationLoss("masked")(out, target, torch.zeros(2, 3, dtype=torch.bool), query_mask)
    assert parts["n"] == 0 and parts["loss"].item() == 0.0
    parts["loss"].backward()
    assert torch.count_nonzero(out.mask_logits.grad) == 0


def test_focal_pixel_term_discounts_easy_voxels():
    torch.manual_seed(0)
    logits = torch.randn(1, 2, 8, 8, 4) * 3
    target = (torch.rand(1, 2, 8, 8, 4) > 0.8).float()
    ones = torch.ones(1, 2, dtype=torch.bool)
    outputs = FusionOutput(logits, torch.zeros(1, 2))
    bce = SegmentationLoss(pixel="bce")(outputs, target, ones, ones)
    focal = SegmentationLoss(pixel="focal", focal_gamma=2.0)(outputs, target, ones, ones)
    assert 0 < float(focal["bce"]) < float(bce["bce"])  # every voxel's term shrinks by (1 - p_t)^2
    assert float(SegmentationLoss(pixel="focal", focal_gamma=0.0)(outputs, target, ones, ones)["bce"]) == \
        pytest.approx(float(bce["bce"]))  # γ = 0 is BCE
    assert focal["dice"] == pytest.approx(float(bce["dice"]))


def test_deep_supervision_weights_coarser_heads_and_sums_to_one():
    loss = LOSSES.build({"name": "masked"})
    target = torch.ones(1, 1, 8, 8, 4)
    annotated = query_mask = torch.ones(1, 1, dtype=torch.bool)
    flat = FusionOutput(torch.full((1, 1, 8, 8, 4), 0.3), torch.zeros(1, 1))
    # A full target and constant logits give the same BCE and Dice at every resolution, so weights summing to one
    # leave the loss unchanged ...
    same = flat._replace(deep_supervision=(torch.full((1, 1, 4, 4, 2), 0.3), torch.full((1, 1, 2, 2, 1), 0.3)))
    torch.testing.assert_close(loss(same, target, annotated, query_mask)["loss"],
                               loss(flat, target, annotated, query_mask)["loss"])
    # ... while a wrong coarse head raises it, and its gradient reaches that head.
    aux = torch.full((1, 1, 4, 4, 2), -3.0, requires_grad=True)
    worse = loss(flat._replace(deep_supervision=(aux,)), target, annotated, query_mask)["loss"]
    assert worse > loss(flat, target, annotated, query_mask)["loss"]
    worse.backward()
    assert aux.grad.abs().sum() > 0


def test_deep_supervision_targets_are_reduced_by_majority():
    loss = LOSSES.build({"name": "masked"})
    target = torch.zeros(1, 1, 4, 4, 4)
    target[0, 0, :2, :2, :2] = 1  # one full 2×2×2 block: foreground at 1/2 resolution
    target[0, 0, 2, 2, 2] = 1  # one voxel of eight: background there
    annotated = query_mask = torch.ones(1, 1, dtype=torch.bool)
    good = torch.full((1, 1, 2, 2, 2), -20.0)
    good[0, 0, 0, 0, 0] = 20.0
    bad = good.clone()
    bad[0, 0, 1, 1, 1] = 20.0
    base = FusionOutput(torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1))
    l_good = loss(base._replace(deep_supervision=(good,)), target, annotated, query_mask)["loss"]
    l_bad = loss(base._replace(deep_supervision=(bad,)), target, annotated, query_mask)["loss"]
    assert l_good < l_bad
