"""U-Net features and the query decoder: shapes, padding, self-attention option, positional encodings."""

import pytest
import torch

from vlseg.config import load_config
from vlseg.models.encoders.unet import UNet3D
from vlseg.models.fusions.query_decoder import QueryDecoder, sinusoidal_positions_3d
from vlseg.models.network import VLSegNet, build_network, prompt_inputs
from vlseg.vocab.vocabulary import Vocabulary


def test_unet_multiscale_features_and_voxel_embedding():
    net = UNet3D(widths=(4, 8, 16, 32), strides=(1, 2, 2, 2), embed_dim=6, convs_per_stage=3)
    feats = net(torch.randn(2, 1, 32, 32, 16))
    assert [tuple(f.shape) for f in feats.decoder] == [(2, 4, 32, 32, 16), (2, 8, 16, 16, 8), (2, 16, 8, 8, 4),
                                                         (2, 32, 4, 4, 2)]
    assert feats.voxel_embedding.shape == (2, 6, 32, 32, 16)
    assert net.feature_channels == [4, 8, 16, 32] and net.total_stride == (8, 8, 8)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    acts = [m for m in net.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert norms and len(norms) == len(acts)  # conv–InstanceNorm–LeakyReLU throughout


def test_unet_anisotropic_strides():
    net = UNet3D(widths=(4, 8, 16), strides=(1, 2, (2, 2, 1)), embed_dim=4)
    feats = net(torch.randn(1, 1, 16, 16, 8))
    assert feats.decoder[-1].shape[2:] == (4, 4, 4)
    assert feats.voxel_embedding.shape[2:] == (16, 16, 8)


def test_positions_distinguish_voxels_and_scale_free():
    pos = sinusoidal_positions_3d((4, 4, 2), 36)
    assert pos.shape == (32, 36)
    assert torch.cdist(pos, pos).fill_diagonal_(1).min() > 1e-3
    # Coordinates are normalised, so the same place gets the same code on any grid: the single cell of a 1³ grid
    # and the centre cell (1, 1, 1) of a 3³ grid both sit at (0.5, 0.5, 0.5).
    coarse, fine = sinusoidal_positions_3d((1, 1, 1), 36), sinusoidal_positions_3d((3, 3, 3), 36)
    assert torch.allclose(coarse[0], fine[1 * 9 + 1 * 3 + 1], atol=1e-6)
    assert not torch.allclose(coarse[0], fine[0])


def _decoder(self_attention=True):
    torch.manual_seed(0)
    return QueryDecoder(text_dim=12, feature_channels=[4, 8, 16], embed_dim=6, dim=24, layers=2, heads=2,
                        self_attention=self_attention, key_scales=[-1, -2]).eval()


def _features(batch=2):
    torch.manual_seed(1)
    return UNet3D(widths=(4, 8, 16), strides=(1, 2, 2), embed_dim=6).eval()(torch.randn(batch, 1, 16, 16, 8))


@pytest.mark.parametrize("self_attention", [True, False])
def test_padded_queries_do_not_change_real_ones(self_attention):
    dec, feats = _decoder(self_attention), _features()
    prompts = torch.randn(2, 3, 12)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = dec(feats, prompts, mask)
    assert out.mask_logits.shape == (2, 3, 16, 16, 8) and out.presence_logits.shape == (2, 3)
    garbage = prompts.clone()
    garbage[0, 2] = 100.0
    garbage[1, 1:] = -100.0
    out2 = dec(feats, garbage, mask)
    assert torch.allclose(out.mask_logits[0, :2], out2.mask_logits[0, :2], atol=1e-5)
    assert torch.allclose(out.presence_logits[1, 0], out2.presence_logits[1, 0], atol=1e-5)
    assert torch.isfinite(dec(feats, prompts, torch.zeros(2, 3, dtype=torch.bool)).mask_logits).all()


def test_self_attention_lets_queries_see_each_other():
    feats, prompts = _features(1), torch.randn(1, 2, 12)
    other = prompts.clone()
    other[0, 1] = torch.randn(12)
    for self_attention, should_change in [(True, True), (False, False)]:
        dec = _decoder(self_attention)
        a = dec(feats, prompts[:, :2]).mask_logits[0, 0]
        b = dec(feats, other).mask_logits[0, 0]
        assert (not torch.allclose(a, b, atol=1e-6)) == should_change


def test_trainable_text_encoder_lives_inside_the_network(tiny_bert_dir):
    vocab = Vocabulary.load()
    base = [f"text_encoder.path={tiny_bert_dir}", "image_encoder.widths=[4, 8]", "image_encoder.strides=[1, 2]",
            "image_encoder.embed_dim=4", "fusion.dim=16", "fusion.heads=2", "fusion.layers=1"]
    frozen_net, frozen_enc = build_network(load_config(None, base), vocab)
    assert frozen_net.text_encoder is None and frozen_enc.frozen
    assert not any(k.startswith("text_encoder") for k in frozen_net.state_dict())
    net, enc = build_network(load_config(None, base + ["text_encoder.freeze=false"]), vocab)
    assert net.text_encoder is enc and any(k.startswith("text_encoder") for k in net.state_dict())
    prompts = prompt_inputs([["liver", "spleen"], ["liver"]], enc, "cpu")
    assert prompts[0] == ["liver", "spleen"] and prompts[1].tolist() == [[0, 1], [0, 0]]
    out = net(torch.randn(2, 1, 8, 8, 8), prompts, torch.tensor([[True, True], [True, False]]))
    out.mask_logits[:, 0].mean().backward()
    assert enc.model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    cached = prompt_inputs([["liver", "spleen"], ["liver"]], frozen_enc, "cpu")
    assert cached.shape == (2, 2, 32) and torch.equal(cached[0, 0], cached[1, 0])
    assert isinstance(frozen_net, VLSegNet)


@pytest.mark.parametrize("fusion,encoder", [("dynamic_head", ["text_encoder.name=onehot"]),
                                            ("dodnet", ["text_encoder.name=onehot", "text_encoder.fixed=true"])])
def test_dynamic_heads(fusion, encoder):
    vocab = Vocabulary.load("default").subset({"liver", "spleen", "liver tumor"}, source="test")
    cfg = load_config(None, [f"fusion.name={fusion}", *encoder, "image_encoder.widths=[8,16,32]",
                             "image_encoder.strides=[1,2,2]", "image_encoder.embed_dim=16"])
    torch.manual_seed(0)
    net, text = build_network(cfg, vocab)
    assert net.fusion.n_params == 153  # CLIP-Universal's 8-channel, 3-layer head: 8·8+8 + 8·8+8 + 8+1
    if fusion == "dodnet":  # the task code is the class's one-hot vector, never trained
        assert text.frozen and torch.equal(text.encode(["liver", "spleen"]), torch.eye(3)[[vocab.index("liver"),
                                                                                          vocab.index("spleen")]])
    image = torch.randn(2, 1, 32, 32, 24)
    both = text.encode(["liver", "spleen"])[None].expand(2, -1, -1).contiguous()
    out = net(image, both)
    assert out.mask_logits.shape == (2, 2, 32, 32, 24) and out.presence_logits.shape == (2, 2)
    # Each query has its own head: asking for spleen alone gives the same spleen mask.
    alone = net(image, both[:, 1:])
    assert torch.allclose(alone.mask_logits[:, 0], out.mask_logits[:, 1], atol=1e-5)
    out.mask_logits.square().mean().backward()
    assert net.fusion.controller.weight.grad.abs().sum() > 0


def test_clip_universal_reference_shape():
    # The reference config rebuilt with a randomly initialised CLIP (no weights offline): backbone size, head size and
    # a forward pass at a small input.
    cfg = load_config("configs/reference/clip_universal.yaml", ["text_encoder.allow_random=true",
                                                                 "text_encoder.weights=null"])
    vocab = Vocabulary.load("default").subset({"liver", "liver tumor"}, source="test")
    net, text = build_network(cfg, vocab)
    backbone = sum(p.numel() for n, p in net.image_encoder.named_parameters() if n.startswith("net."))
    assert abs(backbone - 62.2e6) / 62.2e6 < 0.05  # published: 62.2 M
    assert text.dim == 512 and net.fusion.n_params == 153 and net.fusion.code_proj.out_features == 256
    assert cfg["train"]["lr"] == 1e-4  # the original's rate: at the default 2e-3 the dynamic head collapses
    with torch.no_grad():  # 64³: at 32³ the bottleneck is one voxel, which InstanceNorm cannot normalise
        out = net(torch.randn(1, 1, 64, 64, 64), text.encode(["liver", "liver tumor"])[None])
    assert out.mask_logits.shape == (1, 2, 64, 64, 64)


def _tiny_unet():
    torch.manual_seed(0)
    return UNet3D(widths=(8, 16, 32), strides=(1, 2, 2), embed_dim=16)


def test_sat_style_fused_keys_from_the_encoder():
    unet = _tiny_unet()
    features = unet(torch.randn(2, 1, 32, 32, 16))
    assert [f.shape[1] for f in features.skips] == [8, 16, 32]
    # The encoder's and the decoder's maps differ, so where the keys come from changes the masks.
    assert not torch.allclose(features.skips[0], features.decoder[0])
    torch.manual_seed(1)
    enc_keys = QueryDecoder(40, unet.feature_channels, 16, dim=32, heads=4, key_fusion="concat",
                            key_source="encoder", key_scales=[0, 1, 2], ffn_dim=48, mask_hidden=24)
    torch.manual_seed(1)
    dec_keys = QueryDecoder(40, unet.feature_channels, 16, dim=32, heads=4, key_fusion="concat",
                            key_source="decoder", key_scales=[0, 1, 2], ffn_dim=48, mask_hidden=24)
    # One token set: all three scales pooled to the coarsest grid (8 × 8 × 4) and concatenated (8 + 16 + 32 channels).
    assert enc_keys.key_proj[0].in_features == 56 and enc_keys.layers[0].ffn[0].out_features == 48
    keys, _ = enc_keys._tokens(features)
    assert keys.shape == (2, 8 * 8 * 4, 32)
    prompts = torch.randn(2, 3, 40)
    a, b = enc_keys(features, prompts).mask_logits, dec_keys(features, prompts).mask_logits
    assert a.shape == (2, 3, 32, 32, 16) and not torch.allclose(a, b)


def test_deep_supervision_heads_train_only():
    unet = _tiny_unet()
    decoder = QueryDecoder(40, unet.feature_channels, 16, dim=32, heads=4, deep_supervision=2)
    features = unet(torch.randn(1, 1, 32, 32, 16))
    out = decoder(features, torch.randn(1, 2, 40))
    assert [a.shape for a in out.deep_supervision] == [(1, 2, 16, 16, 8), (1, 2, 8, 8, 4)]
    sum(a.square().mean() for a in out.deep_supervision).backward()
    assert all(h[2].weight.grad.abs().sum() > 0 for h in decoder.aux_heads)
    decoder.eval()
    assert decoder(features, torch.randn(1, 2, 40)).deep_supervision == ()  # inference pays nothing for it
    with pytest.raises(ValueError, match="deep_supervision"):
        QueryDecoder(40, unet.feature_channels, 16, deep_supervision=3)


def test_unetr_encoder_features_and_size_check():
    from vlseg.errors import VlsegError
    from vlseg.models.encoders.monai_nets import UNETREncoder

    cfg = load_config(None, ["image_encoder.name=unetr", "image_encoder.img_size=[32,32,32]",
                             "image_encoder.feature_size=8", "image_encoder.hidden_size=48",
                             "image_encoder.mlp_dim=96", "image_encoder.num_heads=4", "image_encoder.embed_dim=16",
                             "fusion.dim=32", "fusion.heads=4"])
    vocab = Vocabulary.load("default").subset({"liver", "spleen"}, source="test")
    net, text = build_network(cfg, vocab)
    assert isinstance(net.image_encoder, UNETREncoder)
    features = net.encode_image(torch.randn(1, 1, 32, 32, 32))
    assert [tuple(f.shape[1:]) for f in features.decoder] == [(8, 32, 32, 32), (16, 16, 16, 16), (32, 8, 8, 8),
                                                                 (64, 4, 4, 4), (48, 2, 2, 2)]
    out = net(torch.randn(1, 1, 32, 32, 32), text.encode(["liver", "spleen"])[None])
    assert out.mask_logits.shape == (1, 2, 32, 32, 32)
    with pytest.raises(VlsegError, match="img_size"):
        net.encode_image(torch.randn(1, 1, 32, 32, 16))
    # The published UNETR (96³, feature size 16, ViT-B): ~92.6 M parameters.
    from vlseg.models.network import count_parameters

    n = count_parameters(load_config(None, ["image_encoder.name=unetr", "image_encoder.img_size=96"]), 384)
    assert abs(n["image_encoder"] - 92.6e6) / 92.6e6 < 0.05
