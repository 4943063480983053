"""nnU-Net-style 3D U-Net (conv–InstanceNorm–LeakyReLU) returning multi-scale features and a per-voxel embedding.

MONAI's ``DynUNet`` has this block structure but returns only logits (and deep-supervision heads); the fusion modules
need every decoder stage's feature map and an embedding per voxel, so the stages are assembled here from MONAI's
``Convolution`` block.
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlseg.models.features import ImageFeatures
from vlseg.registry import IMAGE_ENCODERS

_NORM = ("instance", {"affine": True})
_ACT = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})


def _stage(in_ch: int, out_ch: int, n_convs: int, stride) -> nn.Sequential:
    # No convolution bias: the InstanceNorm after it subtracts any constant, so a bias would get a zero gradient and
    # drift on rounding noise alone (Adam scales even a 1e-9 gradient to a full step).
    layers = [Convolution(3, in_ch, out_ch, strides=stride, kernel_size=3, norm=_NORM, act=_ACT, bias=False)]
    layers += [Convolution(3, out_ch, out_ch, kernel_size=3, norm=_NORM, act=_ACT, bias=False)
               for _ in range(n_convs - 1)]
    return nn.Sequential(*layers)


@IMAGE_ENCODERS.register("unet3d")
class UNet3D(nn.Module):
    def __init__(self, in_channels: int = 1, widths=(16, 32, 64, 128), strides=(1, 2, 2, 2), convs_per_stage: int = 2,
                 embed_dim: int = 32):
        super().__init__()
        if len(widths) != len(strides):
            raise ValueError("image_encoder.widths and image_encoder.strides must have the same length")
        self.in_channels = in_channels
        # A stride is an int or a per-axis triple (anisotropic scans: no down-sampling along the thick-slice axis).
        self.widths = list(widths)
        self.strides = [tuple(int(v) for v in s) if isinstance(s, (list, tuple)) else (int(s),) * 3 for s in strides]
        self.embed_dim = embed_dim
        self.encoder = nn.ModuleList()
        prev = in_channels
        for width, stride in zip(self.widths, self.strides):
            self.encoder.append(_stage(prev, width, convs_per_stage, stride))
            prev = width
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in range(len(self.widths) - 1, 0, -1):
            stride = self.strides[level]
            self.up.append(nn.ConvTranspose3d(self.widths[level], self.widths[level - 1], stride, stride=stride))
            self.decoder.append(_stage(2 * self.widths[level - 1], self.widths[level - 1], convs_per_stage, 1))
        self.embed = nn.Conv3d(self.widths[0], embed_dim, kernel_size=1)
        # Recompute each stage's activations in the backward pass instead of keeping them (train.activation_checkpointing)
        self.activation_checkpointing = False

    def _run(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(stage, x, use_reentrant=False)
        return stage(x)

    @property
    def feature_channels(self) -> list[int]:
        """Channels of ``ImageFeatures.multiscale``, fine → coarse."""
        return list(self.widths)

    @property
    def total_stride(self) -> tuple[int, int, int]:
        """Down-sampling factor of the bottleneck per axis: crop sizes should be multiples of it."""
        out = [1, 1, 1]
        for s in self.strides:
            out = [a * b for a, b in zip(out, s)]
        return tuple(out)

    def forward(self, x: torch.Tensor) -> ImageFeatures:
        skips = []
        for stage in self.encoder:
            x = self._run(stage, x)
            skips.append(x)
        decoded = [x]
        for up, stage, skip in zip(self.up, self.decoder, reversed(skips[:-1])):
            x = self._run(stage, torch.cat([up(x), skip], dim=1))
            decoded.append(x)
        return ImageFeatures(multiscale=decoded[::-1], voxel_embedding=self.embed(x), encoder=skips)
