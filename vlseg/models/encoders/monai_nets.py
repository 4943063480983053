"""Transformer image encoders from MONAI (SwinUNETR, UNETR), exposing what the fusions need.

MONAI's networks return only segmentation logits; the fusions need every decoder stage and a per-voxel embedding.
These wrappers build MONAI's own network and replay its forward pass, keeping the encoder's skips and the intermediate
decoder outputs and dropping its output convolution (replaced by a 1×1×1 projection to ``embed_dim``).
"""

from __future__ import annotations

import torch
from torch import nn

from vlseg.models.features import ImageEncoder, ImageFeatures
from vlseg.registry import IMAGE_ENCODERS


@IMAGE_ENCODERS.register("swinunetr")
class SwinUNETREncoder(ImageEncoder):
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
        self.strides = [(1, 1, 1)] + [(2, 2, 2)] * 5
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
        return ImageFeatures(skips=[enc0, enc1, enc2, enc3, hidden[3], dec4],
                             decoder=[out, dec0, dec1, dec2, dec3, dec4], voxel_embedding=self.embed(out))


@IMAGE_ENCODERS.register("unetr")
class UNETREncoder(ImageEncoder):
    """UNETR (a 12-layer ViT on 16³ patches with a convolutional decoder). Its position embedding is learnt for one
    input size, ``img_size``, so training crops and inference windows must both be that size (the config's
    ``data.crop_size``, which inference uses as its window)."""

    def __init__(self, img_size, in_channels: int = 1, feature_size: int = 16, hidden_size: int = 768,
                 mlp_dim: int = 3072, num_heads: int = 12, embed_dim: int = 32, dropout: float = 0.0):
        super().__init__()
        from monai.networks.nets import UNETR

        self.img_size = tuple(int(v) for v in (img_size if isinstance(img_size, (list, tuple)) else [img_size] * 3))
        if any(v % 16 for v in self.img_size):
            raise ValueError(f"image_encoder.img_size={list(self.img_size)}: every side must be a multiple of 16")
        self.net = UNETR(in_channels=in_channels, out_channels=1, img_size=self.img_size, feature_size=feature_size,
                         hidden_size=hidden_size, mlp_dim=mlp_dim, num_heads=num_heads, dropout_rate=dropout)
        self.net.out = nn.Identity()
        fs = feature_size
        self.feature_channels = [fs, 2 * fs, 4 * fs, 8 * fs, hidden_size]
        self.embed_dim = embed_dim
        self.strides = [(1, 1, 1)] + [(2, 2, 2)] * 4
        self.embed = nn.Conv3d(fs, embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> ImageFeatures:
        if tuple(x.shape[2:]) != self.img_size:
            from vlseg.errors import VlsegError

            raise VlsegError(f"unetr was built for {list(self.img_size)} inputs and got {list(x.shape[2:])}: set "
                             f"image_encoder.img_size to data.crop_size")
        n = self.net
        tokens, hidden = n.vit(x)
        enc1 = n.encoder1(x)
        enc2 = n.encoder2(n.proj_feat(hidden[3]))
        enc3 = n.encoder3(n.proj_feat(hidden[6]))
        enc4 = n.encoder4(n.proj_feat(hidden[9]))
        dec4 = n.proj_feat(tokens)
        dec3 = n.decoder5(dec4, enc4)
        dec2 = n.decoder4(dec3, enc3)
        dec1 = n.decoder3(dec2, enc2)
        out = n.decoder2(dec1, enc1)
        return ImageFeatures(skips=[enc1, enc2, enc3, enc4, dec4], decoder=[out, dec1, dec2, dec3, dec4],
                             voxel_embedding=self.embed(out))
