"""The contract between image encoders and fusions: what an encoder hands over (``ImageFeatures``), what a fusion gives
back (``FusionOutput``), and the base class of each kind (``ImageEncoder``, ``Fusion``).

Two ways to pair them:

* the encoder runs its own decoder (unet3d by default, swinunetr, unetr) and the fusion reads the decoder's stages and
  voxel embedding (query_decoder, dynamic_head, dodnet);
* the encoder runs without a decoder (``unet3d`` with ``decoder: false``) and the fusion runs its own decoder from the
  encoder's skips, the prompt conditioning every stage (as VoxTell does).

A fusion declares which it is (``Fusion.needs_decoder``), an encoder whether it has one (``ImageEncoder.has_decoder``);
``check_pairing`` refuses the combinations that cannot work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn

from vlseg.errors import VlsegError


@dataclass
class ImageFeatures:
    """What an image encoder hands to a fusion.  Every list runs fine → coarse; entry ``i`` has the encoder's
    ``feature_channels[i]`` channels and sits at its scale ``i``.

    ``skips``: the encoder's own outputs (a U-Net's skip connections), the last one the bottleneck.
    ``decoder``: the decoder's stages, ``decoder[0]`` at the input resolution and ``decoder[-1]`` the bottleneck;
    empty for an encoder without a decoder.
    ``voxel_embedding``: ``[B, embed_dim, D, H, W]`` at the input resolution, from the last decoder stage; None for an
    encoder without a decoder.
    """

    skips: list[torch.Tensor]
    decoder: list[torch.Tensor] = field(default_factory=list)
    voxel_embedding: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.skips[0].shape[0])


class FusionOutput(NamedTuple):
    """What a fusion gives back for ``Q`` prompts.  A named tuple, so that DDP, accelerate's output conversion and
    torch's pytree utilities find the tensors inside.

    ``mask_logits``: ``[B, Q, D, H, W]`` at the input resolution (sigmoid per query: targets may overlap).
    ``presence_logits``: ``[B, Q]``, whether each target is in the input at all.
    ``deep_supervision``: mask logits ``[B, Q, d, h, w]`` at lower resolutions, finest first; empty when the fusion
    has no such heads, and at inference.
    """

    mask_logits: torch.Tensor
    presence_logits: torch.Tensor
    deep_supervision: tuple[torch.Tensor, ...] = ()


PRESENCE_READOUTS = ("head", "max_logit")


def max_logit_presence(mask_logits: torch.Tensor) -> torch.Tensor:
    """The presence logit of a fusion without a presence head: each query's largest mask logit in the window, so
    "present" means "some voxel is positive" (``[B, Q, *grid]`` → ``[B, Q]``)."""
    return mask_logits.flatten(2).amax(2)


def check_presence(presence: str) -> None:
    if presence not in PRESENCE_READOUTS:
        raise ValueError(f"fusion.presence={presence!r}: use 'head' or 'max_logit'")


class ImageEncoder(nn.Module):
    """Base of the image encoders: ``forward(image [B, C, D, H, W]) → ImageFeatures``.

    A subclass sets in its constructor ``feature_channels`` (per scale, fine → coarse, the same for ``skips`` and
    ``decoder``), ``strides`` (per scale, its down-sampling per axis from the scale before; the first from the input)
    and ``embed_dim`` (channels of the voxel embedding; None without a decoder), and ``has_decoder`` where it can run
    without one.
    """

    feature_channels: list[int]
    strides: list[tuple[int, int, int]]
    embed_dim: int | None
    has_decoder: bool = True

    @property
    def total_stride(self) -> tuple[int, int, int]:
        """Down-sampling factor of the bottleneck per axis: crop sizes should be multiples of it."""
        out = [1, 1, 1]
        for s in self.strides:
            out = [a * b for a, b in zip(out, s)]
        return tuple(out)

    def forward(self, image: torch.Tensor) -> ImageFeatures:
        raise NotImplementedError


class Fusion(nn.Module):
    """Base of the fusions: ``forward(features, prompts [B, Q, text_dim], query_mask [B, Q] or None) → FusionOutput``;
    ``query_mask`` is True for real queries, False for padding.

    Built with ``text_dim`` (the prompt embeddings' width) and the image encoder's ``feature_channels`` and
    ``embed_dim``; a fusion that names ``strides`` among its constructor's arguments (to build a decoder of its own)
    gets the encoder's too.  ``needs_decoder``: True when it reads the encoder's decoder stages and voxel embedding,
    False when it runs its own decoder from the skips.
    """

    needs_decoder: bool = True

    def forward(self, features: ImageFeatures, prompts: torch.Tensor,
                query_mask: torch.Tensor | None = None) -> FusionOutput:
        raise NotImplementedError


def check_pairing(encoder: nn.Module, fusion, encoder_name: str, fusion_name: str) -> None:
    """A one-line error when ``fusion`` (a fusion or its class) and ``encoder`` cannot work together: the fusion reads a
    decoder the encoder does not run, or runs its own while the encoder's decoder would go untrained."""
    has, needs = bool(getattr(encoder, "has_decoder", True)), bool(getattr(fusion, "needs_decoder", True))
    if needs and not has:
        raise VlsegError(f"fusion {fusion_name!r} reads the image encoder's decoder, but image encoder "
                         f"{encoder_name!r} runs without one (set image_encoder.decoder=true)")
    if has and not needs:
        raise VlsegError(f"fusion {fusion_name!r} runs its own decoder from the encoder's skips, but image encoder "
                         f"{encoder_name!r} runs a decoder of its own that nothing would read (unet3d: set "
                         f"image_encoder.decoder=false)")
