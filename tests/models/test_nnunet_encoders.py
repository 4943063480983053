"""nnU-Net's encoders as vlseg image encoders: the library's own networks, run by vlseg, give the library's outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vlseg.config import load_config
from vlseg.models.network import count_parameters
from vlseg.registry import IMAGE_ENCODERS

OPS = {"conv_op": nn.Conv3d, "norm_op": nn.InstanceNorm3d, "norm_op_kwargs": {"eps": 1e-5, "affine": True},
       "nonlin": nn.LeakyReLU, "nonlin_kwargs": {"inplace": True}, "conv_bias": True}


def _library_unet(name: str, features, blocks):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

    n = len(features)
    common = dict(input_channels=1, n_stages=n, features_per_stage=features, kernel_sizes=3,
                  strides=[1] + [2] * (n - 1),
                  num_classes=2, n_conv_per_stage_decoder=1, deep_supervision=False, **OPS)
    if name == "nnunet_plain":
        return PlainConvUNet(n_conv_per_stage=blocks, **common)
    return ResidualEncoderUNet(n_blocks_per_stage=blocks, **common)


@pytest.mark.parametrize("name, blocks_key", [("nnunet_plain", "n_conv_per_stage"),
                                              ("nnunet_resenc", "n_blocks_per_stage")])
def test_decoder_features_are_the_librarys(name, blocks_key):
    """Weights copied from the library's U-Net by name (no renaming): the library's segmentation head applied to
    vlseg's voxel embedding gives the library's output, and no key is left over except the heads."""
    features, blocks = [8, 16, 16, 32], [1, 2, 2, 2]
    torch.manual_seed(0)
    library = _library_unet(name, features, blocks).eval()
    ours = IMAGE_ENCODERS.build({"name": name, "features_per_stage": features, "strides": [1, 2, 2, 2],
                                 blocks_key: blocks, "n_conv_per_stage_decoder": 1, "decoder": True}).eval()
    theirs = {k: v for k, v in library.state_dict().items() if "seg_layers" not in k and "decoder.encoder" not in k}
    assert set(theirs) == set(ours.state_dict())
    ours.load_state_dict(theirs)
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        features_out = ours(x)
        expected = library(x)
        got = library.decoder.seg_layers[-1](features_out.voxel_embedding)
    assert torch.allclose(got, expected, atol=1e-5)
    assert [t.shape[1] for t in features_out.decoder] == features and ours.embed_dim == 8


def test_three_channel_encoder_repeats_a_single_channel_scan():
    enc = IMAGE_ENCODERS.build({"name": "nnunet_plain", "in_channels": 3, "features_per_stage": [4, 8],
                                "strides": [1, 2], "decoder": False}).eval()
    x = torch.randn(1, 1, 8, 8, 8)
    with torch.no_grad():
        assert torch.equal(enc(x).skips[-1], enc(x.expand(-1, 3, -1, -1, -1)).skips[-1])
    assert not enc.has_decoder and enc.embed_dim is None


@pytest.mark.parametrize("preset", ["presets/nnunet_resenc_m", "presets/nnunet_resenc_l"])
def test_resenc_presets_have_nnunets_size(preset):
    """The presets build nnU-Net's ResEnc U-Net: the same parameter count as the library's network without its
    segmentation heads."""
    cfg = load_config(preset)
    counts = count_parameters(cfg, 384)
    with torch.device("meta"):
        library = _library_unet("nnunet_resenc", [32, 64, 128, 256, 320, 320], [1, 3, 4, 6, 6, 6])
    heads = sum(p.numel() for p in library.decoder.seg_layers.parameters())
    assert counts["image_encoder"] == sum(p.numel() for p in library.parameters()) - heads


@pytest.mark.parametrize("name, blocks_key", [("nnunet_plain", "n_conv_per_stage"),
                                              ("nnunet_resenc", "n_blocks_per_stage")])
def test_inference_path_equals_the_librarys_forward(name, blocks_key):
    """Without gradients the encoder normalises in place; the skips equal the library's own forward."""
    torch.manual_seed(0)
    enc = IMAGE_ENCODERS.build({"name": name, "features_per_stage": [8, 16, 16], "strides": [1, 2, 2],
                                blocks_key: [2, 2, 2], "decoder": False}).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(0.2 * torch.randn_like(p))
        x = torch.randn(2, 1, 16, 16, 12)
        lean = enc(x).skips
        library = enc.encoder(x)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(lean, library))


@pytest.mark.parametrize("depth", [5, 16, 33])
def test_slab_conv_in_place_equals_the_conv(depth):
    from vlseg.models.lean import slab_conv

    torch.manual_seed(0)
    conv = nn.Conv3d(6, 6, 3, 1, 1)
    x = torch.randn(2, 6, depth, 7, 9)
    with torch.no_grad():
        expected = conv(x)
        assert torch.allclose(slab_conv(conv, x, slab=4), expected, atol=1e-5)
        assert torch.allclose(slab_conv(conv, x.clone(), slab=4, inplace=True), expected, atol=1e-5)
