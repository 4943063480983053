"""Shared fixtures: real tiny components written to disk and loaded back through the code users run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

WORDS = ["liver", "tumor", "tumour", "hepatic", "lesion", "mass", "spleen", "splenic", "kidney", "left", "right",
         "renal", "parenchyma", "the", "organ", "of", "a", "heart", "lung", "brain"]


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT with a word-level vocabulary, saved as a transformers folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    import vlseg  # noqa: F401  (torchvision shim before transformers)

    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, max_position_embeddings=64))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> dict:
    """A tiny open_clip architecture (JSON config) and its weights file."""
    import open_clip

    import vlseg  # noqa: F401

    folder = tmp_path_factory.mktemp("tiny_clip")
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (folder / "vlseg-tiny-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(folder))
    torch.manual_seed(0)
    model = open_clip.create_model("vlseg-tiny-clip", pretrained=None)
    weights = folder / "tiny_clip.pt"
    torch.save(model.state_dict(), weights)
    return {"model_name": "vlseg-tiny-clip", "config_dir": str(folder), "weights": str(weights)}


@pytest.fixture(scope="session")
def phantom_corpus(tmp_path_factory) -> Path:
    from vlseg.prepare.phantoms import generate_corpus

    return generate_corpus(tmp_path_factory.mktemp("phantoms"), n_train=3, n_test=2, shape=(40, 40, 32),
                           spacing=(4.0, 4.0, 4.0), seed=1, progress=False)


def tiny_overrides(tmp: Path, manifest: Path, text_encoder_dir: Path, **extra) -> list[str]:
    """A model and schedule small enough to train a few steps in seconds."""
    out = {
        "output_root": str(tmp), "run_name": "tiny", "data.manifest": str(manifest),
        "data.crop_size": "[32, 32, 24]", "data.max_queries": 4,
        "text_encoder.path": str(text_encoder_dir),
        "image_encoder.widths": "[8, 16, 32]", "image_encoder.strides": "[1, 2, 2]", "image_encoder.embed_dim": 8,
        "fusion.dim": 32, "fusion.layers": 1, "fusion.heads": 2,
        "train.steps": 4, "train.warmup_steps": 1, "train.checkpoint_every": 2, "train.log_every": 1,
        "train.keep_checkpoints": 5,
    }
    out.update(extra)
    return [f"{k}={v}" for k, v in out.items() if v is not None]  # None drops a key


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, phantom_corpus, tiny_bert_dir) -> Path:
    """A tiny model trained for a few steps on the phantoms: the checkpoint inference/evaluation tests use."""
    from vlseg.config import load_config
    from vlseg.train.loop import train

    tmp = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, tiny_overrides(tmp, phantom_corpus, tiny_bert_dir))
    return train(cfg, progress=False)
