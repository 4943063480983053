"""Transformer image encoders from MONAI (SwinUNETR, UNETR), exposing what the fusions need.

MONAI's networks return only segmentation logits; the fusions need every decoder stage and a per-voxel embedding.
These wrappers build MONAI's own network and replay its forward pass, keeping the encoder's skips and the intermediate
decoder outputs and dropping its output convolution (replaced by a 1×1×1 projection to ``embed_dim``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlseg.models.features import ImageEncoder, ImageFeatures
from vlseg.registry import IMAGE_ENCODERS


class PatchMergingMonai09(nn.Module):
    """MONAI 0.9's patch merging (3D), which CLIP-Universal's copy of SwinUNETR carries: of the eight voxels of each
    2×2×2 block it concatenates (0,0,0), (1,0,0), (0,1,0), (0,0,1), (1,0,1), then (0,1,0) and (0,0,1) a second time
    and (1,1,1), so (1,1,0) and (0,1,1) never reach the next stage; then LayerNorm and a linear map to ``2·dim``.
    MONAI 1.0 corrected the order (``"merging"``); weights trained with the old one need it.  Built by MONAI's
    SwinTransformer as ``downsample(dim=..., norm_layer=..., spatial_dims=...)``, with MONAI's parameter names."""

    OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 0), (0, 0, 1), (1, 1, 1))

    def __init__(self, dim: int, norm_layer=nn.LayerNorm, spatial_dims: int = 3):
        super().__init__()
        if spatial_dims != 3:
            raise ValueError("merging_monai09 is implemented for 3D inputs only")
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(8 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, D, H, W, C]`` → ``[B, D/2, H/2, W/2, 2C]`` (odd sides padded by one)."""
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        x = torch.cat([x[:, i::2, j::2, k::2, :] for i, j, k in self.OFFSETS], -1)
        return self.reduction(self.norm(x))


DOWNSAMPLE = ("merging", "mergingv2", "merging_monai09")


@IMAGE_ENCODERS.register("swinunetr")
class SwinUNETREncoder(ImageEncoder):
    """SwinUNETR (the CLIP-Driven Universal Model's backbone at ``feature_size=48``); input sides divisible by 32.

    ``downsample``: the patch merging between the Swin stages: MONAI's ``"merging"`` (default) or ``"mergingv2"``
    (the same weights, the eight voxels of each 2×2×2 block concatenated in another order: not interchangeable for
    trained weights), or ``"merging_monai09"``, MONAI 0.9's order, which drops two of the eight voxels and repeats
    two others; CLIP-Universal's released Swin was trained with it (its repository carries a copy of that SwinUNETR).
    ``embed_dim``: width of the 1×1×1 projection that makes the voxel embedding from the decoder's ``feature_size``
    output channels; None hands those channels on as they are (CLIP-Universal's head reads them directly).
    """

    def __init__(self, in_channels: int = 1, feature_size: int = 48, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24),
                 embed_dim: int | None = 32, use_v2: bool = False, downsample: str = "merging"):
        super().__init__()
        from monai.networks.nets import SwinUNETR

        if downsample not in DOWNSAMPLE:
            raise ValueError(f"image_encoder.downsample={downsample!r}: choose one of {', '.join(DOWNSAMPLE)}")
        merging = PatchMergingMonai09 if downsample == "merging_monai09" else downsample
        self.net = SwinUNETR(in_channels=in_channels, out_channels=1, feature_size=feature_size, depths=tuple(depths),
                             num_heads=tuple(num_heads), use_v2=use_v2, downsample=merging)
        self.net.out = nn.Identity()  # logits are the fusion's job
        fs = feature_size
        self.feature_channels = [fs, fs, 2 * fs, 4 * fs, 8 * fs, 16 * fs]
        self.embed_dim = embed_dim or fs
        self.strides = [(1, 1, 1)] + [(2, 2, 2)] * 5
        self.embed = nn.Conv3d(fs, embed_dim, kernel_size=1) if embed_dim else nn.Identity()

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
