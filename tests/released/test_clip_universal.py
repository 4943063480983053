"""The CLIP-Driven Universal Model imported into vlseg gives the original's logits.

The fixtures (benchmarks/parity/make_clip_universal_fixtures.py) hold what the original ``Universal_model`` computed
for both backbones at full size with seeded random weights; its weights are not stored but drawn again here, key by
key, from the same seeds (checked against the recorded digest), saved in the released checkpoint format and imported
with the family's ``convert``, as ``vlseg import`` does.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vlseg.errors import VlsegError
from vlseg.models.network import build_vision_network, network_from_checkpoint
from vlseg.released.base import RELEASED, map_state
from vlseg.released.clip_universal import CLASSES, prepare

FIXTURES = Path(__file__).parent / "fixtures" / "clip_universal"
# The fixtures store no weights: they are drawn again here by the very function that drew them (checked by digest).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "parity"))
from make_clip_universal_fixtures import fixture_weights, weights_digest  # noqa: E402

FAMILIES = {"unet": "clip-universal-unet", "swinunetr": "clip-universal-swin"}
TOLERANCE = 1e-4


def released_net(backbone: str) -> dict[str, torch.Tensor]:
    """A fixture's ``ckpt['net']``, in the released checkpoint's naming."""
    meta = json.loads((FIXTURES / f"{backbone}.json").read_text())
    ref = np.load(FIXTURES / f"{backbone}.npz")
    weights = fixture_weights(meta["keys"], meta["seed"])
    assert weights_digest(weights) == meta["weights_digest"], "torch's CPU generator changed: rerun the fixture script"
    net = dict(weights)
    for key, entry in meta["keys"].items():
        if key not in net:
            stored = ref[f"int:{key}"] if f"int:{key}" in ref.files else np.zeros(entry["shape"], np.int64)
            net[key] = torch.from_numpy(np.array(stored))
    return net


def convert(backbone: str, net: dict, tmp: Path, txt: Path | None = None) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    ckpt = tmp / f"{backbone}.pth"
    torch.save({"net": net, "epoch": 1}, ckpt)
    family = RELEASED.get(FAMILIES[backbone])()
    return family.convert(argparse.Namespace(checkpoint=str(ckpt), txt_encoding=txt), tmp / f"model_{backbone}")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    made = {}

    def get(backbone: str):
        if backbone not in made:
            made[backbone] = convert(backbone, released_net(backbone), tmp_path_factory.mktemp(backbone))
        return made[backbone]

    return get


@pytest.mark.parametrize("backbone", ["unet", "swinunetr"])
def test_logits_match_the_original(imported, backbone):
    ref = np.load(FIXTURES / f"{backbone}.npz")
    net, text_encoder, _, _, meta = network_from_checkpoint(imported(backbone))
    assert meta["provenance"]["family"] == FAMILIES[backbone] and "CC BY-NC-ND" in meta["provenance"]["licence"]
    caught = {}
    net.fusion.global_proj.register_forward_hook(lambda m, i, o: caught.__setitem__("gap", o.flatten(1)))
    net.fusion.controller.register_forward_hook(lambda m, i, o: caught.__setitem__("theta", o[0]))
    prompts = text_encoder.encode([name for name, _ in CLASSES])[None]
    with torch.no_grad():
        out = net.eval()(torch.from_numpy(ref["input"]).float(), prompts)
    logits = out.mask_logits[0]
    errors = {"gap": (caught["gap"] - torch.from_numpy(ref["gap"])).abs().max(),
              "theta": (caught["theta"] - torch.from_numpy(ref["theta"])).abs().max(),
              "full": (logits[list(ref["full_classes"])] - torch.from_numpy(ref["logits_full"])).abs().max(),
              "sampled": (logits.flatten(1)[:, ref["sample_index"]] - torch.from_numpy(ref["logits_sampled"]))
              .abs().max()}
    print(backbone, {k: f"{float(e):.2e}" for k, e in errors.items()})
    assert all(float(e) <= TOLERANCE for e in errors.values()), {k: float(e) for k, e in errors.items()}
    assert torch.equal(out.presence_logits[0], logits.flatten(1).amax(1))  # no presence head: the largest logit


@pytest.mark.parametrize("backbone", ["unet", "swinunetr"])
def test_full_size_keys_map_one_to_one(backbone):
    """Every key of the released network has exactly one place in vlseg's, with its shape (built on the meta device
    where it can be; MONAI's SwinUNETR computes an index at construction, so it is built on the CPU)."""
    from vlseg.config import load_config

    spec = json.loads((FIXTURES / f"{backbone}.json").read_text())["keys"]
    family = RELEASED.get(FAMILIES[backbone])()
    cfg = load_config(family.recipe)
    with torch.device("meta" if backbone == "unet" else "cpu"):
        net = build_vision_network(cfg, 512)
    target = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.startswith("prompt_")}
    source = {k: torch.empty(e["shape"], device="meta") for k, e in spec.items()}
    mapped = [family.rename(k) for k in source]
    assert sorted(m for m in mapped if m is not None) == sorted(target)  # one to one: no target reached twice
    assert [k for k, m in zip(source, mapped) if m is None] == ["module.organ_embedding"]
    map_state(prepare(source), target, family.rename, backbone)  # shapes equal


@pytest.mark.parametrize("key", ["module.swinViT.layers1.0.downsample.norm.weight",
                                 "module.backbone.swinViT.layers1.0.downsample.norm.weight",
                                 "backbone.swinViT.layers1.0.downsample.norm.weight",
                                 "swinViT.layers1.0.downsample.norm.weight"])
def test_swin_keys_are_read_with_or_without_the_ddp_and_backbone_prefixes(key):
    """The released Swin's keys lack ``backbone.`` (the original's loader re-adds it); a checkpoint saved from the
    model itself, with or without DDP, has it: all four forms are the same weight."""
    rename = RELEASED.get("clip-universal-swin")().rename
    assert rename(key) == "image_encoder.net.swinViT.layers1.0.downsample.norm.weight"
    assert RELEASED.get("clip-universal-unet")().rename("module.GAP.3.bias") == "fusion.global_proj.3.bias"


def test_prompts_outside_the_32_classes_are_refused(imported):
    from vlseg.vocab.prompts import interpret_prompts

    _, text_encoder, vocabulary, _, _ = network_from_checkpoint(imported("unet"))
    assert text_encoder.encode(["Liver Tumor", " celiac truck "]).shape == (2, 512)
    with pytest.raises(VlsegError, match=r"'brain' is not in this model's embedding bank.*spleen, right kidney"):
        text_encoder.encode(["brain"])
    [match] = interpret_prompts(["celiac trunk"], vocabulary, text_encoder)
    assert match.query == "celiac truck"  # the original's spelling, which its embedding was made from
    with pytest.raises(VlsegError, match="'heart'"):
        interpret_prompts(["heart"], vocabulary, text_encoder)


def test_txt_encoding_from_cuda_is_read_and_checked(tmp_path):
    """The original's txt_encoding.pth is float16 saved from cuda:0: read on the CPU, it must agree with the
    checkpoint's organ_embedding; one that does not is refused."""
    net = released_net("unet")
    assert convert("unet", net, tmp_path, FIXTURES / "txt_encoding.pth").is_dir()
    other = tmp_path / "other.pth"
    torch.save(torch.zeros(32, 512, dtype=torch.float16), other)
    with pytest.raises(VlsegError, match="other.pth: differs from the checkpoint's organ_embedding"):
        convert("unet", net, tmp_path / "again", other)


@pytest.mark.parametrize("change,message", [
    ("extra", r"key 'module.backbone.down_tr64.ops.2.conv1.weight' .* has no place"),
    ("shape", r"key 'module.text_to_vision.weight' has shape \(256, 511\)"),
    ("missing", r"no weights for the vlseg network's 'fusion.controller.bias'"),
    ("swin", r"holds the other backbone's keys"),
])
def test_checkpoints_that_do_not_fit_are_refused_naming_the_key(tmp_path, change, message):
    net = released_net("unet")
    if change == "extra":
        net["module.backbone.down_tr64.ops.2.conv1.weight"] = torch.zeros(3)
    elif change == "shape":
        net["module.text_to_vision.weight"] = torch.zeros(256, 511)
    elif change == "missing":
        del net["module.controller.bias"]
    else:
        net["module.swinViT.patch_embed.proj.weight"] = torch.zeros(1)
    with pytest.raises(VlsegError, match=message):
        convert("unet", net, tmp_path)


def test_unet_trains_and_keeps_per_window_statistics_in_eval():
    """The U-Net at a small width: it trains with ordinary batch normalisation; in eval, ``batch_stats_in_eval``
    normalises each sample with its own statistics (a window's answer does not depend on its batch), otherwise the
    running averages are used."""
    from vlseg.models.encoders.clip_unet import ClipUniversalUNet

    torch.manual_seed(0)
    encoder = ClipUniversalUNet(width=8, batch_stats_in_eval=True)
    x = torch.rand(2, 1, 16, 16, 8)
    features = encoder(x)
    assert [t.shape[1] for t in features.decoder] == encoder.feature_channels == [16, 32, 64, 128]
    features.voxel_embedding.mean().backward()
    assert all(p.grad is not None for p in encoder.parameters())
    encoder.eval()
    with torch.no_grad():
        both = encoder(x).voxel_embedding
        assert torch.allclose(both[1:], encoder(x[1:]).voxel_embedding, atol=1e-5)
        for module in encoder.modules():
            module.batch_stats_in_eval = False
        assert not torch.allclose(both[1:], encoder(x[1:]).voxel_embedding, atol=1e-3)
