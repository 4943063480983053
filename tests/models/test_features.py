"""The encoder/fusion contract: what every encoder hands over, typed fusion outputs, the pairing check, and a fusion
that runs its own prompt-conditioned decoder from the skips (VoxTell's shape, at toy size) carried end to end."""

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from vlseg.config import load_config
from vlseg.errors import VlsegError
from vlseg.models.features import Fusion, FusionOutput, ImageEncoder
from vlseg.models.network import build_network, prompt_inputs
from vlseg.registry import FUSIONS, IMAGE_ENCODERS, LOSSES
from vlseg.vocab.vocabulary import Vocabulary

TINY_UNET = ["image_encoder.widths=[4,8,16]", "image_encoder.strides=[1,2,[2,2,1]]", "text_encoder.name=onehot",
             "text_encoder.fixed=true"]


class PromptedSkipDecoder(Fusion):
    """A decoder of its own over the encoder's skips, run once per prompt, every stage's channels scaled by the
    prompt; a mask head per stage gives deep supervision."""

    needs_decoder = False

    def __init__(self, text_dim, feature_channels, embed_dim, strides, width_scale: float = 1.0):
        super().__init__()
        fc = list(feature_channels)
        self.embed_dim, self.width_scale = embed_dim, width_scale
        self.up = nn.ModuleList(nn.ConvTranspose3d(fc[i + 1], fc[i], strides[i + 1], stride=strides[i + 1])
                                for i in range(len(fc) - 1))
        self.merge = nn.ModuleList(nn.Conv3d(2 * c, c, 3, padding=1) for c in fc[:-1])
        self.condition = nn.ModuleList(nn.Linear(text_dim, c) for c in fc[:-1])
        self.heads = nn.ModuleList(nn.Conv3d(c, 1, 1) for c in fc[:-1])
        self.presence = nn.Linear(text_dim + fc[-1], 1)

    def forward(self, features, prompts, query_mask=None):
        b, q = prompts.shape[:2]
        skips = [s.repeat_interleave(q, 0) for s in features.skips]
        code = prompts.reshape(b * q, -1).to(skips[0].dtype)
        x, levels = skips[-1], []
        for i in reversed(range(len(skips) - 1)):  # coarse → fine
            x = torch.relu(self.merge[i](torch.cat([self.up[i](x), skips[i]], 1)))
            x = x * (1 + self.condition[i](code))[:, :, None, None, None]
            levels.append(self.heads[i](x)[:, 0].unflatten(0, (b, q)))
        pooled = features.skips[-1].mean((2, 3, 4))[:, None].expand(-1, q, -1)
        presence = self.presence(torch.cat([code.unflatten(0, (b, q)), pooled], -1)).squeeze(-1)
        coarser = tuple(reversed(levels[:-1])) if self.training else ()
        return FusionOutput(levels[-1], presence, coarser)


@pytest.fixture
def skip_decoder():
    FUSIONS.register("test_prompted_skip_decoder")(PromptedSkipDecoder)
    yield "test_prompted_skip_decoder"
    FUSIONS.unregister("test_prompted_skip_decoder")


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary.load("default").subset({"liver", "spleen", "liver tumor"}, source="test")


@pytest.mark.parametrize("section,shape", [
    ({"name": "unet3d", "widths": [4, 8, 16], "strides": [1, 2, [2, 2, 1]], "embed_dim": 6}, (16, 16, 8)),
    ({"name": "unetr", "img_size": [32, 32, 32], "feature_size": 4, "hidden_size": 24, "mlp_dim": 48,
      "num_heads": 2, "embed_dim": 6}, (32, 32, 32)),
    ({"name": "swinunetr", "feature_size": 12, "depths": [1, 1, 1, 1], "embed_dim": 6}, (64, 64, 64)),
])
def test_every_encoder_keeps_the_contract(section, shape):
    torch.manual_seed(0)
    enc = IMAGE_ENCODERS.build(section)
    assert isinstance(enc, ImageEncoder) and enc.has_decoder
    feats = enc.eval()(torch.randn(1, 1, *shape))
    size = list(shape)
    for i, (channels, stride) in enumerate(zip(enc.feature_channels, enc.strides)):
        size = [n // s for n, s in zip(size, stride)]
        assert tuple(feats.skips[i].shape[1:]) == (channels, *size), i
        assert tuple(feats.decoder[i].shape[1:]) == (channels, *size), i
    assert tuple(size) == tuple(n // s for n, s in zip(shape, enc.total_stride))
    assert feats.voxel_embedding.shape[1:] == (6, *shape) and feats.batch_size == 1


def test_unet_without_decoder_is_the_encoder_alone():
    torch.manual_seed(0)
    full = IMAGE_ENCODERS.build({"name": "unet3d", "widths": [4, 8, 16], "strides": [1, 2, 2]})
    torch.manual_seed(0)
    alone = IMAGE_ENCODERS.build({"name": "unet3d", "widths": [4, 8, 16], "strides": [1, 2, 2], "decoder": False})
    assert not alone.has_decoder and alone.embed_dim is None and full.embed_dim == 32
    kept = {k: v for k, v in full.state_dict().items() if k.startswith("encoder.")}
    assert alone.state_dict().keys() == kept.keys() and len(kept) < len(full.state_dict())
    # The encoder is built first, so it draws the same initial weights with or without the decoder after it.
    assert all(torch.equal(alone.state_dict()[k], v) for k, v in kept.items())
    x = torch.randn(1, 1, 16, 16, 8)
    feats, reference = alone.eval()(x), full.eval()(x)
    assert feats.decoder == [] and feats.voxel_embedding is None
    assert all(torch.equal(a, b) for a, b in zip(feats.skips, reference.skips))


def test_fusions_return_typed_output(vocab):
    for fusion in ("query_decoder", "dynamic_head"):
        cfg = load_config(None, [*TINY_UNET, "image_encoder.embed_dim=8", f"fusion.name={fusion}"])
        net, text = build_network(cfg, vocab)
        assert isinstance(net.fusion, Fusion) and net.fusion.needs_decoder
        out = net.eval()(torch.randn(2, 1, 16, 16, 8), prompt_inputs([["liver", "spleen"]] * 2, text, "cpu"))
        assert isinstance(out, FusionOutput) and out.deep_supervision == ()
        assert out.mask_logits.shape == (2, 2, 16, 16, 8) and out.presence_logits.shape == (2, 2)


def test_a_pairing_that_cannot_work_is_one_line(vocab, skip_decoder):
    with pytest.raises(VlsegError, match="reads the image encoder's decoder.*image_encoder.decoder=true"):
        build_network(load_config(None, [*TINY_UNET, "image_encoder.decoder=false"]), vocab)
    with pytest.raises(VlsegError, match="runs its own decoder.*image_encoder.decoder=false"):
        build_network(load_config(None, [*TINY_UNET, f"fusion.name={skip_decoder}"]), vocab)
    # A network put together by hand is checked too.
    from vlseg.models.encoders.unet import UNet3D
    from vlseg.models.network import VLSegNet

    with pytest.raises(VlsegError, match="runs its own decoder"):
        VLSegNet(UNet3D(widths=(4, 8), strides=(1, 2)), PromptedSkipDecoder(3, [4, 8], 32, [(1, 1, 1), (2, 2, 2)]), 3)


def _batch(text):
    torch.manual_seed(1)
    image = torch.randn(2, 1, 16, 16, 8)
    target = torch.zeros(2, 2, 16, 16, 8)
    target[:, 0, 4:12, 4:12, 2:6] = 1
    target[0, 1, 2:6, 8:14, 1:4] = 1
    annotated = torch.tensor([[True, True], [True, False]])
    query_mask = torch.ones(2, 2, dtype=torch.bool)
    return image, prompt_inputs([["liver", "spleen"]] * 2, text, "cpu"), target, annotated, query_mask


def test_a_fusion_with_its_own_decoder_trains_through_the_loss(vocab, skip_decoder):
    cfg = load_config(None, [*TINY_UNET, "image_encoder.decoder=false", f"fusion.name={skip_decoder}"])
    assert cfg["fusion"] == {"name": skip_decoder, "width_scale": 1.0}  # what the code supplies is no setting
    torch.manual_seed(0)
    net, text = build_network(cfg, vocab)
    assert net.fusion.embed_dim is None and net.fusion.up[1].stride == (2, 2, 1)  # the encoder's strides reached it
    image, prompts, target, annotated, query_mask = _batch(text)
    loss_fn = LOSSES.build(cfg["loss"])
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    losses = []
    for step in range(4):
        out = net(image, prompts, query_mask)
        assert out.mask_logits.shape == (2, 2, 16, 16, 8) and out.presence_logits.shape == (2, 2)
        assert [tuple(a.shape) for a in out.deep_supervision] == [(2, 2, 8, 8, 4)]  # the 1/2 stage
        parts = loss_fn(out, target, annotated, query_mask)
        optimizer.zero_grad()
        parts["loss"].backward()
        if step == 0:  # the loss reaches the encoder, the prompt conditioning and the deep-supervision head
            silent = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert not silent, silent
        optimizer.step()
        losses.append(float(parts["loss"].detach()))
    assert losses[-1] < losses[0]
    net.eval()
    with torch.no_grad():
        assert net(image, prompts, query_mask).deep_supervision == ()


def test_inference_carries_a_fusion_with_its_own_decoder(vocab, skip_decoder):
    from vlseg import Segmenter

    cfg = load_config(None, [*TINY_UNET, "image_encoder.decoder=false", f"fusion.name={skip_decoder}",
                             "data.crop_size=[16,16,8]"])
    torch.manual_seed(0)
    net, text = build_network(cfg, vocab)
    scan = nib.Nifti1Image(np.random.default_rng(0).normal(size=(24, 20, 10)).astype(np.float32), np.eye(4))
    result = Segmenter(net, text, vocab, cfg, device="cpu").segment(scan, ["liver", "spleen"])
    assert [r.prompt for r in result.results] == ["liver", "spleen"]
    assert result.mask("liver").shape == (24, 20, 10)
