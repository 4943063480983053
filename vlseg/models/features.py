"""The contract between image encoders and fusions."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageFeatures:
    """What every image encoder hands to a fusion module.

    ``multiscale[i]`` are feature maps ordered fine → coarse (index 0 at full resolution, -1 the bottleneck);
    ``voxel_embedding`` is ``[B, embed_dim, D, H, W]`` at the input resolution.
    """

    multiscale: list[torch.Tensor]
    voxel_embedding: torch.Tensor
    # The encoder's own outputs, fine → coarse, where the encoder has them (SAT builds its queries' keys from these).
    encoder: list[torch.Tensor] | None = None
