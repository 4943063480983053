"""nnU-Net's convolutional encoders, built by its network library (dynamic-network-architectures), as vlseg image
encoders.

* ``nnunet_plain``: the plain conv encoder (conv–InstanceNorm–LeakyReLU, a strided first conv per stage) and the
  U-Net decoder's transposed convolutions and conv stacks, run here so that every decoder stage reaches the fusion
  (the library's own decoder returns only its segmentation heads).  SAT's image backbone is this network.
* ``nnunet_resenc``: the residual encoder (nnU-Net ResEnc presets; VoxTell's backbone), without a decoder, for fusions
  that run their own prompt-conditioned decoder from the skips.

The state-dict keys are the library's (``encoder.stages.1.0.convs.0.conv.weight``, ``decoder.transpconvs.0.weight``,
``decoder.stages.0.convs.0...``), so nnU-Net-style checkpoints map onto them by name.  The library registers each
conv and norm twice (as ``conv``/``norm`` and inside ``all_modules``); both names stay.
"""

from __future__ import annotations

import torch
from torch import nn

from vlseg.errors import VlsegError
from vlseg.models.features import ImageEncoder, ImageFeatures
from vlseg.models.lean import lean_encoder_forward
from vlseg.registry import IMAGE_ENCODERS


def _per_stage(value, n: int, what: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise VlsegError(f"image_encoder.{what}: {len(values)} entries for {n} stages")
    return values


def _triples(strides) -> list[tuple[int, int, int]]:
    return [tuple(int(v) for v in (s if isinstance(s, (list, tuple)) else (s, s, s))) for s in strides]


def _layers(conv_bias: bool, norm_eps: float) -> dict:
    """nnU-Net's default 3D operators: Conv3d, InstanceNorm3d (affine), LeakyReLU(0.01)."""
    return {"conv_op": nn.Conv3d, "conv_bias": bool(conv_bias), "norm_op": nn.InstanceNorm3d,
            "norm_op_kwargs": {"eps": float(norm_eps), "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": nn.LeakyReLU, "nonlin_kwargs": {"inplace": True}}


class _NNUNetEncoderBase(ImageEncoder):
    in_channels: int
    encoder: nn.Module

    def _setup(self, in_channels: int, features_per_stage, kernel_sizes, strides, conv_bias: bool,
               norm_eps: float) -> dict:
        """Record the encoder's channels and strides; the library encoders' common arguments (with
        ``n_stages``, for the per-stage settings)."""
        self.in_channels = int(in_channels)
        self.feature_channels = [int(f) for f in features_per_stage]
        n = len(self.feature_channels)
        self.strides = _triples(_per_stage(strides, n, "strides"))
        return {"input_channels": self.in_channels, "n_stages": n, "features_per_stage": self.feature_channels,
                "kernel_sizes": _triples(_per_stage(kernel_sizes, n, "kernel_sizes")), "strides": self.strides,
                "return_skips": True, **_layers(conv_bias, norm_eps)}

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """A single-channel scan repeated to the encoder's channels (SAT's backbone takes three copies)."""
        if x.shape[1] == 1 and self.in_channels > 1:
            return x.expand(-1, self.in_channels, -1, -1, -1)
        return x

    def _build_decoder(self, decoder: bool, n_conv_per_stage_decoder) -> None:
        """nnU-Net's U-Net decoder (``decoder=True``): only its up-sampling and merging convs; the library's
        segmentation heads have no use here, and its reference to the encoder would store every encoder weight
        twice."""
        from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder

        n = len(self.feature_channels)
        self.has_decoder = bool(decoder)
        self.embed_dim = self.feature_channels[0] if decoder else None
        if decoder:
            library = UNetDecoder(self.encoder, 1, _per_stage(n_conv_per_stage_decoder, n - 1,
                                                              "n_conv_per_stage_decoder"), deep_supervision=False)
            self.decoder = nn.Module()
            self.decoder.transpconvs, self.decoder.stages = library.transpconvs, library.stages

    def forward(self, x: torch.Tensor) -> ImageFeatures:
        x = self._input(x)
        skips = self.encoder(x) if torch.is_grad_enabled() else lean_encoder_forward(self.encoder, x)
        if not self.has_decoder:
            return ImageFeatures(skips)
        below, decoded = skips[-1], [skips[-1]]
        for k, (up, stage) in enumerate(zip(self.decoder.transpconvs, self.decoder.stages)):
            below = stage(torch.cat((up(below), skips[-(k + 2)]), dim=1))
            decoded.append(below)
        return ImageFeatures(skips, decoded[::-1], decoded[-1])


@IMAGE_ENCODERS.register("nnunet_plain")
class NNUNetPlain(_NNUNetEncoderBase):
    """nnU-Net's plain conv U-Net.  ``decoder=false`` leaves only the encoder (for a fusion with its own decoder)."""

    def __init__(self, in_channels: int = 1, features_per_stage=(32, 64, 128, 256, 320, 320),
                 strides=(1, 2, 2, 2, 2, 2), kernel_sizes=3, n_conv_per_stage=2, n_conv_per_stage_decoder=2,
                 conv_bias: bool = True, norm_eps: float = 1e-5, decoder: bool = True):
        super().__init__()
        from dynamic_network_architectures.building_blocks.plain_conv_encoder import PlainConvEncoder

        common = self._setup(in_channels, features_per_stage, kernel_sizes, strides, conv_bias, norm_eps)
        per_stage = _per_stage(n_conv_per_stage, common["n_stages"], "n_conv_per_stage")
        self.encoder = PlainConvEncoder(n_conv_per_stage=per_stage, **common)
        self._build_decoder(decoder, n_conv_per_stage_decoder)


@IMAGE_ENCODERS.register("nnunet_resenc")
class NNUNetResEnc(_NNUNetEncoderBase):
    """nnU-Net's residual encoder (``BasicBlockD`` blocks after a stem conv), by default without a decoder (for a
    fusion with its own, VoxTell's); ``decoder=true`` adds nnU-Net's U-Net decoder (the ResEnc U-Net presets)."""

    def __init__(self, in_channels: int = 1, features_per_stage=(32, 64, 128, 256, 320, 320),
                 strides=(1, 2, 2, 2, 2, 2), kernel_sizes=3, n_blocks_per_stage=(1, 3, 4, 6, 6, 6),
                 conv_bias: bool = True, norm_eps: float = 1e-5, stem_channels: int | None = None,
                 decoder: bool = False, n_conv_per_stage_decoder=1):
        super().__init__()
        from dynamic_network_architectures.building_blocks.residual import BasicBlockD
        from dynamic_network_architectures.building_blocks.residual_encoders import ResidualEncoder

        common = self._setup(in_channels, features_per_stage, kernel_sizes, strides, conv_bias, norm_eps)
        per_stage = _per_stage(n_blocks_per_stage, common["n_stages"], "n_blocks_per_stage")
        self.encoder = ResidualEncoder(n_blocks_per_stage=per_stage, block=BasicBlockD, stem_channels=stem_channels,
                                       **common)
        self._build_decoder(decoder, n_conv_per_stage_decoder)
