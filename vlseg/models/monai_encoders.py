"""Transformer image encoders from MONAI (SwinUNETR, UNETR), exposing what the fusions need.

MONAI's networks return only segmentation logits; the fusions need every decoder stage and a per-voxel embedding.
These wrappers build MONAI's own network and replay its forward pass, keeping the intermediate decoder outputs and
dropping its output convolution (replaced by a 1×1×1 projection to ``embed_dim``).
"""

from __future__ import annotations

import torch
from torch import nn

from vlseg.models.unet import ImageFeatures
from vlseg.registry import IMAGE_ENCODERS


@IMAGE_ENCODERS.register("swinunetr")
class SwinUNETREncoder(nn.Module):
    """SwinUNETR (the CLIP-Driven Universal Model's backbone at ``feature_size=48``); input sides divisible by 32."""

    def __init__(self, in_channels: int = 1, feature_size: int = 48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24),
                 embed_dim: int = 32, use_v2: bool = False):
        super().__init__()
        from monai.networks.nets import SwinUNETR

        self.net = SwinUNETR(in_channels=in_channels, out_channels=1, feature_size=feature_size, depths=tuple(depths),
                             num_heads=tuple(num_heads), use_v2=use_v2)
        self.net.out = nn.Identity()  # logits are the fusion's job
        fs = feature_size
        self.feature_channels = [fs, fs, 2 * fs, 4 * fs, 8 * fs, 16 * fs]
        self.embed_dim = embed_dim
        self.total_stride = (32, 32, 32)
        self.embed = nn.Conv3d(fs, embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> ImageFeatures:
        n = self.net
        hidden = n.swinViT(x, n.normalize)
        enc0, enc1, enc2, enc3 = n.encoder1(x), n.encoder2(hidden[0]), n.encoder3(hidden[1]), n.encoder4(hidden[2])
        dec4 = n.encoder10(hidden[4])
        dec3 = n.decoder5(dec4, hidden[3])
        dec2 = n.decoder4(dec3, enc3)
        dec1 = n.decoder3(dec2, enc2)
        dec0 = n.decoder2(dec1, enc1)
        out = n.decoder1(dec0, enc0)
        return ImageFeatures(multiscale=[out, dec0, dec1, dec2, dec3, dec4], voxel_embedding=self.embed(out))
