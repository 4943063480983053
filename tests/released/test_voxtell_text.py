"""VoxTell's text side in vlseg: the ``hf`` encoder with last-token pooling, left padding, lower-casing and VoxTell's
instruction reproduces VoxTell's own embedding code on a (tiny, random) Qwen3 embedding model; the embedding bank falls
back to that tower for prompts it does not hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("voxtell")

WORDS = ["instruct", ":", "given", "an", "anatomical", "term", "query", ",", "retrieve", "the", "precise", "entity",
         "and", "location", "it", "represents", "liver", "left", "kidney", "cyst", "in", "segment"]


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    import vlseg  # noqa: F401, I001  (its torchvision shim must run before transformers is imported)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

    folder = tmp_path_factory.mktemp("qwen3")
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<eos>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(folder)
    torch.manual_seed(0)
    Qwen3Model(Qwen3Config(vocab_size=len(vocab), hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                           max_position_embeddings=128)).save_pretrained(folder)
    return folder


def _voxtells_embeddings(folder, prompts):
    from transformers import AutoModel, AutoTokenizer
    from voxtell.inference.predictor import VoxTellPredictor

    predictor = VoxTellPredictor.__new__(VoxTellPredictor)
    predictor.device, predictor.embedding_bank, predictor.max_text_length = torch.device("cpu"), None, 8192
    predictor.tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    predictor.text_backbone = AutoModel.from_pretrained(folder).eval()
    return predictor.embed_text_prompts(prompts)[0]


def test_last_token_embeddings_equal_voxtells(tiny_qwen, tmp_path):
    from vlseg.models.text.bank import EmbeddingBank, write_bank
    from vlseg.registry import TEXT_ENCODERS
    from vlseg.released.voxtell import INSTRUCTION

    prompts = ["Liver", "cyst in the left kidney", "segment the liver"]  # different lengths: padding matters
    theirs = _voxtells_embeddings(tiny_qwen, prompts)
    section = {"name": "hf", "path": str(tiny_qwen), "pooling": "last", "normalize": False, "max_length": 512,
               "template": INSTRUCTION, "padding_side": "left", "lowercase": True}
    mine = TEXT_ENCODERS.build(section, vocabulary=None).encode(prompts)
    assert torch.allclose(mine, theirs, atol=1e-5)

    # The bank answers what it holds and asks the tower for the rest.
    write_bank(tmp_path / "bank.npz", ["liver"], np.full((1, 48), 7.0, np.float16))
    bank = EmbeddingBank(bank=str(tmp_path / "bank.npz"), backbone=section)
    both = bank.encode(["LIVER ", "cyst in the left kidney"])
    assert torch.all(both[0] == 7.0) and torch.allclose(both[1], theirs[1], atol=1e-5)
    assert bank.open_vocabulary


def test_fine_tune_an_imported_voxtell(tiny_qwen, phantom_corpus, tmp_path):
    """An imported VoxTell (bank + its text tower) trains on a partially labelled corpus with vlseg's masked loss
    (train.init_from), in small crops (the positions of other grids follow the same formula), and the result loads."""
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from vlseg.cli import main
    from vlseg.config import load_config
    from vlseg.infer.segmenter import Segmenter
    from vlseg.train.loop import train

    sys.path.insert(0, str(Path(__file__).parent))
    import voxtell_reference as ref

    model, kwargs = ref.build(seed=3)
    ref.save_folder(model, kwargs, tmp_path / "voxtell_model")
    ref.save_bank(tmp_path / "bank.npz", ["liver"], dim=48)
    out = tmp_path / "imported"
    assert main(["import", "voxtell", "--model-dir", str(tmp_path / "voxtell_model"), "--bank",
                 str(tmp_path / "bank.npz"), "--text-model", str(tiny_qwen), "-o", str(out)]) == 0
    cfg = load_config(str(out / "config.yaml"), [
        f"output_root={tmp_path}", "run_name=tuned", f"data.manifest={phantom_corpus}", "data.crop_size=[64, 64, 64]",
        "data.max_queries=2", "train.steps=2", "train.batch_size=1", "train.warmup_steps=1", "train.log_every=1",
        "train.checkpoint_every=2", f"train.init_from={out}", "train.lr=0.01"])
    run = train(cfg, progress=False)
    before, after = load_file(str(out / "model.safetensors")), load_file(str(run / "checkpoint-0000002" /
                                                                             "model.safetensors"))
    assert before.keys() == after.keys()
    assert not torch.equal(before["fusion.text_proj.0.weight"], after["fusion.text_proj.0.weight"])
    segmenter = Segmenter.from_pretrained(run, device="cpu")
    assert segmenter.text_encoder.encode(["liver"]).shape == (1, 48)
