"""Segmentation losses with masked back-propagation for partially labelled corpora.

Each (sample, query) pair gets BCE + soft Dice on its mask and BCE on its presence logit.  Which pairs are supervised
is the whole point:

* ``masked`` — only queries whose class the sample's dataset annotates.  An annotated class absent from the crop is a
  negative (empty target, presence 0).  A class the dataset does not annotate contributes nothing: those entries are
  dropped before any arithmetic, so their gradient is exactly zero.
* ``naive`` — every real query is supervised and unannotated classes count as background: the baseline that teaches
  the model to miss organs whenever a dataset did not draw them.

Empty targets: the usual smoothed Dice gives ≈1 (loss ≈0) for an empty target and any small prediction, which hides
false positives.  Here the Dice term for an empty target is defined as ``Σp / (Σp + κ)``: 0 when nothing is
predicted, ½ when κ voxels' worth of probability is predicted, → 1 as the false positive grows.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from vlseg.errors import VlsegError
from vlseg.models.features import FusionOutput
from vlseg.registry import LOSSES


def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, empty_kappa: float = 100.0, eps: float = 1e-6):
    """Per-row Dice loss for ``[N, V]`` probabilities and binary targets (see module docstring for empty rows)."""
    inter = (prob * target).sum(-1)
    p_sum, t_sum = prob.sum(-1), target.sum(-1)
    dice = 1.0 - (2.0 * inter + eps) / (p_sum + t_sum + eps)
    empty = p_sum / (p_sum + empty_kappa)
    return torch.where(t_sum > 0, dice, empty)


class SegmentationLoss(nn.Module):
    def __init__(self, partial_labels: str = "masked", bce_weight: float = 1.0, dice_weight: float = 1.0,
                 presence_weight: float = 0.5, empty_kappa: float = 100.0, pixel: str = "bce",
                 focal_gamma: float = 2.0):
        super().__init__()
        if partial_labels not in ("masked", "naive"):
            raise ValueError(f"partial_labels must be 'masked' or 'naive', not {partial_labels!r}")
        if pixel not in ("bce", "focal"):
            raise VlsegError(f"loss.pixel={pixel!r}: use 'bce' (Dice + BCE) or 'focal' (Dice + focal)")
        # The per-voxel term: BCE, or focal (BCE scaled by (1 − p_t)^γ, which discounts the easy background voxels).
        self.pixel, self.focal_gamma = pixel, float(focal_gamma)
        self.partial_labels = partial_labels
        self.bce_weight, self.dice_weight, self.presence_weight = bce_weight, dice_weight, presence_weight
        self.empty_kappa = empty_kappa

    def _pixel(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-row mean of the per-voxel term: BCE, or focal."""
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if self.pixel == "focal":
            p_true = torch.exp(-bce)  # the probability given to the true label
            bce = (1.0 - p_true).pow(self.focal_gamma) * bce
        return bce.mean(-1)

    def supervised(self, annotated: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        real = query_mask.bool()
        return real & annotated.bool() if self.partial_labels == "masked" else real

    def forward(self, outputs: FusionOutput, target: torch.Tensor, annotated: torch.Tensor, query_mask: torch.Tensor,
                normalizer: float | None = None) -> dict:
        """``outputs``: the fusion's; ``target [B, Q, *spatial]`` binary (zeros where the class is not annotated),
        ``annotated`` and ``query_mask`` ``[B, Q]``.  Returns the total ``loss``, its parts (detached means) and, for
        logging by dataset, ``pairs``: ``[n, 4]`` per supervised pair (total, bce, dice, presence) with ``pair_sample``
        ``[n]``.

        ``loss`` is the mean over the batch's supervised pairs, or their sum divided by ``normalizer``: a run split over
        processes and micro-batches passes the step's global pair count, so the summed gradients are exactly those of
        the mean over the whole global batch."""
        logits, presence = outputs.mask_logits, outputs.presence_logits
        keep = self.supervised(annotated, query_mask)
        n = int(keep.sum())
        if n == 0:
            zero = logits.sum() * 0.0 + presence.sum() * 0.0
            return {"loss": zero, "bce": zero.detach(), "dice": zero.detach(), "presence": zero.detach(), "n": 0,
                    "pairs": torch.zeros((0, 4)), "pair_sample": torch.zeros(0, dtype=torch.long)}
        lg = logits[keep].flatten(1).float()  # [n, V] — unsupervised queries never enter the graph below
        tg = target[keep].flatten(1).float()
        bce = self._pixel(lg, tg)  # ("bce" below is the per-voxel term, whichever it is)
        dice = soft_dice_loss(torch.sigmoid(lg), tg, self.empty_kappa)
        present = (tg.amax(-1) > 0).float()
        pres = F.binary_cross_entropy_with_logits(presence[keep].float(), present, reduction="none")
        mask_term = self.bce_weight * bce + self.dice_weight * dice
        aux = outputs.deep_supervision
        if aux:
            # Deep supervision: the same mask terms on each coarser head against the target reduced by majority
            # (area average ≥ ½), weighted 1, ½, ¼ … and normalised to sum to 1 as nnU-Net does.
            weights = [0.5 ** i for i in range(len(aux) + 1)]
            total_w = sum(weights)
            mask_term = mask_term * (weights[0] / total_w)
            for w, level_logits in zip(weights[1:], aux):
                lg_l = level_logits[keep].float()
                tg_l = (F.interpolate(target[keep].float()[:, None], size=lg_l.shape[1:], mode="area")[:, 0] >= 0.5)
                lg_l, tg_l = lg_l.flatten(1), tg_l.flatten(1).float()
                bce_l = self._pixel(lg_l, tg_l)
                dice_l = soft_dice_loss(torch.sigmoid(lg_l), tg_l, self.empty_kappa)
                mask_term = mask_term + (w / total_w) * (self.bce_weight * bce_l + self.dice_weight * dice_l)
        per_pair = mask_term + self.presence_weight * pres
        total = per_pair.mean() if normalizer is None else per_pair.sum() / normalizer
        return {"loss": total, "bce": bce.mean().detach(), "dice": dice.mean().detach(),
                "presence": pres.mean().detach(), "n": n,
                "pairs": torch.stack([per_pair, bce, dice, pres], 1).detach().cpu(),
                "pair_sample": keep.nonzero()[:, 0].cpu()}


# Each policy is SegmentationLoss with ``partial_labels`` fixed; its settings and their defaults are the class's.
masked_loss = LOSSES.register("masked")(functools.partial(SegmentationLoss, "masked"))
naive_loss = LOSSES.register("naive")(functools.partial(SegmentationLoss, "naive"))
