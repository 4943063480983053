"""The 3D U-Net of the CLIP-Driven Universal Model (Liu et al., ICCV 2023), the "Models Genesis" layout it inherits.

Four levels.  Level ``d`` (0 = full resolution) runs two 3×3×3 convolutions, each followed by batch normalisation
and a ReLU; the first gives ``w·2^d`` channels, the second doubles them, so the levels hand ``2w, 4w, 8w, 16w``
channels on (64…512 at the released ``w = 32``; 19.1 M parameters).  A 2×2×2 max pool separates the levels; the
deepest level is the bottleneck.  Going up, a 2×2×2 transposed convolution (channels kept) doubles the resolution,
its output is concatenated *before* the level's skip and two convolutions bring the channels back to the level's
``2w·2^d``.

What the fusions get (``ImageFeatures``, fine → coarse): the levels' outputs as ``skips``, the up-path outputs and the
bottleneck as ``decoder``, and the full-resolution up-path output (``2w`` channels, no projection) as the voxel
embedding, which is what CLIP-Universal's head normalises and projects to its 8 channels.

Batch normalisation at inference.  The original normalises with the statistics of the batch at hand even in eval mode
(its running averages are tracked and never used).  vlseg's default is ordinary batch normalisation (running averages
in eval): a prediction then depends on neither the window's content statistics nor how windows are batched.  With
``batch_stats_in_eval: true`` (set by the imported CLIP-Universal configs, to reproduce the released weights' outputs)
eval mode normalises each sample with its own statistics: identical to the original, whose inference runs one window
per batch, and independent of how vlseg batches windows.  Training mode is ordinary batch normalisation either way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vlseg.models.features import ImageEncoder, ImageFeatures
from vlseg.registry import IMAGE_ENCODERS


class BatchNorm3dEvalStats(nn.BatchNorm3d):
    """``BatchNorm3d`` that can keep normalising with the input's own statistics in eval mode (per sample, running
    averages untouched): see the module's docstring."""

    def __init__(self, channels: int, batch_stats_in_eval: bool = False):
        super().__init__(channels)
        self.batch_stats_in_eval = batch_stats_in_eval

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or not self.batch_stats_in_eval:
            return super().forward(x)
        return F.instance_norm(x, weight=self.weight, bias=self.bias, use_input_stats=True, eps=self.eps)


class ConvNormReLU(nn.Module):
    def __init__(self, cin: int, cout: int, batch_stats_in_eval: bool):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, kernel_size=3, padding=1)
        self.norm = BatchNorm3dEvalStats(cout, batch_stats_in_eval)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))


class Level(nn.Module):
    """Two convolutions; with ``up`` first a transposed convolution of the coarser input and the concatenation
    ``[upsampled, skip]``."""

    def __init__(self, cin: int, mid: int, cout: int, batch_stats_in_eval: bool, up: int | None = None):
        super().__init__()
        self.up = nn.ConvTranspose3d(up, up, kernel_size=2, stride=2) if up else None
        self.convs = nn.Sequential(ConvNormReLU(cin, mid, batch_stats_in_eval),
                                   ConvNormReLU(mid, cout, batch_stats_in_eval))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.up is not None:
            x = torch.cat([self.up(x), skip], dim=1)
        return self.convs(x)


@IMAGE_ENCODERS.register("clip_universal_unet")
class ClipUniversalUNet(ImageEncoder):
    """CLIP-Universal's 3D U-Net; input sides divisible by 8.  ``width``: channels of the first convolution (32 in
    the released model)."""

    def __init__(self, in_channels: int = 1, width: int = 32, batch_stats_in_eval: bool = False):
        super().__init__()
        outs = [2 * width * 2 ** d for d in range(4)]  # 64, 128, 256, 512
        ins = [in_channels] + outs[:-1]
        self.down = nn.ModuleList(Level(ins[d], width * 2 ** d, outs[d], batch_stats_in_eval) for d in range(4))
        self.up = nn.ModuleList(Level(outs[d + 1] + outs[d], outs[d], outs[d], batch_stats_in_eval, up=outs[d + 1])
                                for d in range(3))
        self.feature_channels = outs
        self.strides = [(1, 1, 1)] + [(2, 2, 2)] * 3
        self.embed_dim = outs[0]

    def forward(self, x: torch.Tensor) -> ImageFeatures:
        skips = []
        for d, level in enumerate(self.down):
            x = level(F.max_pool3d(x, 2) if d else x)
            skips.append(x)
        decoder = [skips[-1]]
        for d in reversed(range(3)):
            decoder.insert(0, self.up[d](decoder[0], skips[d]))
        return ImageFeatures(skips=skips, decoder=decoder, voxel_embedding=decoder[0])
