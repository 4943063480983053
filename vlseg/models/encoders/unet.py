"""nnU-Net-style 3D U-Net (conv–InstanceNorm–LeakyReLU) returning multi-scale features and a per-voxel embedding.

MONAI's ``DynUNet`` has this block structure but returns only logits (and deep-supervision heads); the fusion modules
need every decoder stage's feature map and an embedding per voxel, so the stages are assembled here from MONAI's
``Convolution`` block.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlseg.models.features import ImageEncoder, ImageFeatures
from vlseg.registry import IMAGE_ENCODERS

_NORM = ("instance", {"affine": True})
_ACT = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})


def _stage(in_ch: int, out_ch: int, n_convs: int, stride) -> nn.Sequential:
    from monai.networks.blocks import Convolution  # imported here: MONAI takes seconds, and resolving a config not

    # No convolution bias: the InstanceNorm after it subtracts any constant, so a bias would get a zero gradient and
    # drift on rounding noise alone (Adam scales even a 1e-9 gradient to a full step).
    layers = [Convolution(3, in_ch, out_ch, strides=stride, kernel_size=3, norm=_NORM, act=_ACT, bias=False)]
    layers += [Convolution(3, out_ch, out_ch, kernel_size=3, norm=_NORM, act=_ACT, bias=False)
               for _ in range(n_convs - 1)]
    return nn.Sequential(*layers)


@IMAGE_ENCODERS.register("unet3d")
class UNet3D(ImageEncoder):
    """``widths`` and ``strides`` per stage, fine → coarse (a stride is an int or a per-axis triple: anisotropic scans
    are not down-sampled along the thick-slice axis).  ``decoder=False`` builds the encoder alone: its features are the
    skips only, for a fusion that runs its own decoder (``embed_dim`` is then unused)."""

    def __init__(self, in_channels: int = 1, widths=(16, 32, 64, 128), strides=(1, 2, 2, 2), convs_per_stage: int = 2,
                 embed_dim: int = 32, decoder: bool = True):
        super().__init__()
        if len(widths) != len(strides):
            raise ValueError("image_encoder.widths and image_encoder.strides must have the same length")
        self.in_channels = in_channels
        self.widths = list(widths)
        self.strides = [tuple(int(v) for v in s) if isinstance(s, (list, tuple)) else (int(s),) * 3 for s in strides]
        self.has_decoder = bool(decoder)
        self.embed_dim = embed_dim if self.has_decoder else None
        self.encoder = nn.ModuleList()
        prev = in_channels
        for width, stride in zip(self.widths, self.strides):
            self.encoder.append(_stage(prev, width, convs_per_stage, stride))
            prev = width
        if self.has_decoder:
            self._build_decoder(convs_per_stage, embed_dim)
        # Recompute each stage's activations in backward instead of keeping them (train.activation_checkpointing)
        self.activation_checkpointing = False

    def _build_decoder(self, convs_per_stage: int, embed_dim: int) -> None:
        self.up = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in range(len(self.widths) - 1, 0, -1):
            stride = self.strides[level]
            self.up.append(nn.ConvTranspose3d(self.widths[level], self.widths[level - 1], stride, stride=stride))
            self.decoder.append(_stage(2 * self.widths[level - 1], self.widths[level - 1], convs_per_stage, 1))
        self.embed = nn.Conv3d(self.widths[0], embed_dim, kernel_size=1)

    def _run(self, stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(stage, x, use_reentrant=False)
        return stage(x)

    @property
    def feature_channels(self) -> list[int]:
        """Channels of ``ImageFeatures.skips`` and ``.decoder``, fine → coarse."""
        return list(self.widths)

    def forward(self, x: torch.Tensor) -> ImageFeatures:
        skips = []
        for stage in self.encoder:
            x = self._run(stage, x)
            skips.append(x)
        if not self.has_decoder:
            return ImageFeatures(skips=skips)
        decoded = [x]
        for up, stage, skip in zip(self.up, self.decoder, reversed(skips[:-1])):
            x = self._run(stage, torch.cat([up(x), skip], dim=1))
            decoded.append(x)
        return ImageFeatures(skips=skips, decoder=decoded[::-1], voxel_embedding=self.embed(x))
