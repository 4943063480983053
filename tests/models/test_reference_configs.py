"""Reference configs reproduce the published architectures' sizes, and each runs a forward pass on the CPU.

Parameter counts are of the image encoder plus fusion: SAT's published sizes leave its text tower (a 768-d
PubMedBERT) out, and CLIP-Universal's 62.2 M is its SwinUNETR backbone alone.
"""

from __future__ import annotations

import pytest
import torch

from vlseg.config import load_config
from vlseg.models.network import count_parameters
from vlseg.registry import FUSIONS, IMAGE_ENCODERS

# What the released SAT code builds for its "UNET-L" backbone (SAT-Pro), measured by instantiating that code:
# 435.4 M U-Net + 40.1 M projection, decoder and mask head.  The paper states ~447 M; see sat_pro.yaml.
SAT_PRO_RELEASED = 475.6e6


@pytest.mark.parametrize("name,published,within", [
    ("sat_nano", 110e6, 0.05),
    ("sat_pro", SAT_PRO_RELEASED, 0.05),
])
def test_sat_reference_sizes(name, published, within):
    counts = count_parameters(load_config(f"configs/reference/{name}.yaml"), text_dim=768)
    assert abs(counts["total"] - published) / published < within, counts
    assert counts["total"] == counts["image_encoder"] + counts["fusion"]


def test_sat_pro_against_the_paper_figure():
    # Stated, not hidden: following the released code puts SAT-Pro 6.7% above the paper's ~447 M.
    total = count_parameters(load_config("configs/reference/sat_pro.yaml"), text_dim=768)["total"]
    assert 0.05 < (total - 447e6) / 447e6 < 0.08


def test_sat_shapes_follow_the_release():
    nano = load_config("configs/reference/sat_nano.yaml")
    with torch.device("meta"):
        enc = IMAGE_ENCODERS.build(nano["image_encoder"])
        fusion = FUSIONS.build(nano["fusion"], text_dim=768, feature_channels=enc.feature_channels,
                               embed_dim=enc.embed_dim)
    assert enc.total_stride == (32, 32, 32)
    assert fusion.key_proj[0].in_features == 1792 and fusion.key_proj[2].out_features == 768  # 64+64+…+768
    assert len(fusion.layers) == 6 and fusion.layers[0].self_attn is None
    assert fusion.layers[0].ffn[0].out_features == 2048 and fusion.layers[0].cross_attn.num_heads == 8
    assert fusion.mask_head[0].out_features == 256 and fusion.mask_head[2].out_features == 64
    pro = load_config("configs/reference/sat_pro.yaml")
    with torch.device("meta"):
        enc = IMAGE_ENCODERS.build(pro["image_encoder"])
        fusion = FUSIONS.build(pro["fusion"], text_dim=768, feature_channels=enc.feature_channels,
                               embed_dim=enc.embed_dim)
    assert fusion.key_proj[0].in_features == 3584 and fusion.key_proj[0].out_features == 1536
    assert len(enc.encoder[0]) == 3 and fusion.mask_head[2].out_features == 128


@pytest.mark.parametrize("name", ["sat_nano", "sat_pro"])
def test_sat_reference_forward_on_cpu(name):
    # The smallest input the 5 halvings allow with more than one bottleneck voxel (InstanceNorm needs two).
    cfg = load_config(f"configs/reference/{name}.yaml")
    torch.manual_seed(0)
    enc = IMAGE_ENCODERS.build(cfg["image_encoder"])
    fusion = FUSIONS.build(cfg["fusion"], text_dim=768, feature_channels=enc.feature_channels, embed_dim=enc.embed_dim)
    prompts = torch.randn(1, 3, 768)
    with torch.no_grad():
        features = enc(torch.randn(1, 1, 64, 32, 32))
        out = fusion(features, prompts)
        alone = fusion(features, prompts[:, :1])
    assert out.mask_logits.shape == (1, 3, 64, 32, 32) and out.presence_logits.shape == (1, 3)
    assert torch.isfinite(out.mask_logits).all()
    assert not torch.allclose(out.mask_logits[0, 0], out.mask_logits[0, 1])
    # Without self-attention each prompt is decoded on its own: asking it alone gives the same mask.
    torch.testing.assert_close(alone.mask_logits[0, 0], out.mask_logits[0, 0], rtol=1e-4, atol=1e-4)


def test_reference_configs_need_a_local_text_tower():
    from vlseg.errors import VlsegError
    from vlseg.models.text import build_text_encoder

    with pytest.raises(VlsegError, match="text_encoder.path"):
        build_text_encoder(load_config("configs/reference/sat_nano.yaml")["text_encoder"], None)


def test_params_command(capsys):
    from vlseg.cli import main

    assert main(["params", "configs/reference/sat_nano.yaml"]) == 0
    out = capsys.readouterr().out
    total = float(next(line for line in out.splitlines() if line.startswith("total")).split()[1])
    assert 104.5 < total < 115.5 and "not counted" in out
