"""vlseg align-text: contrastive adaptation of a real (tiny) text tower on a vocabulary, written as a folder that
loads like any other encoder, with retrieval measured before and after."""

from __future__ import annotations

import json

import pytest
import torch

from vlseg.cli.align_text import main as align_main
from vlseg.evaluate.retrieval import paraphrase_retrieval
from vlseg.models.text import build_text_encoder, clear_embedding_cache
from vlseg.train.align_text import AlignSettings, align, contrastive_loss
from vlseg.vocab.vocabulary import Vocabulary

TINY = {"classes": [
    {"name": "liver", "synonyms": ["liver", "hepatic parenchyma", "liver organ"], "heldout": ["hepatic organ"],
     "includes": ["liver tumor"]},
    {"name": "liver tumor", "synonyms": ["liver tumor", "hepatic lesion", "liver mass"],
     "heldout": ["tumour of the liver"]},
    {"name": "spleen", "synonyms": ["spleen", "splenic organ"], "heldout": ["splenic parenchyma"]},
    {"name": "left kidney", "synonyms": ["left kidney", "left renal organ"], "heldout": ["left renal parenchyma"]},
    {"name": "right kidney", "synonyms": ["right kidney", "right renal organ"], "heldout": ["right renal parenchyma"]},
    {"name": "heart", "synonyms": ["heart", "the heart organ"], "heldout": ["heart parenchyma"]},
    {"name": "lung", "synonyms": ["lung", "lung parenchyma"], "heldout": ["lung organ"], "includes": ["brain"]},
    {"name": "brain", "synonyms": ["brain", "brain parenchyma"], "heldout": ["the brain organ"]},
]}


@pytest.fixture(scope="module")
def tiny_vocabulary(tmp_path_factory):
    import yaml

    path = tmp_path_factory.mktemp("vocab") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_loss_weighs_hard_negatives_and_ignores_nested_pairs():
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    none = torch.zeros(3, 3, dtype=torch.bool)
    hard = none.clone()
    hard[0, 1] = hard[1, 0] = True
    base = contrastive_loss(emb, labels, none, none, 0.1, 3.0)
    assert contrastive_loss(emb, labels, none, hard, 0.1, 3.0) > base  # counterparts weigh more
    assert torch.isclose(contrastive_loss(emb, labels, none, hard, 0.1, 1.0), base)
    nested = none.clone()
    nested[:2, 2] = nested[2, :2] = True  # class 2 lies inside both others: contrasted with neither
    alone = contrastive_loss(emb[:4], labels[:4], none[:2, :2], none[:2, :2], 0.1, 1.0)
    # classes 0 and 1 see only each other; class 2's texts, with nothing to contrast, lose nothing
    assert torch.isclose(contrastive_loss(emb, labels, nested, none, 0.1, 1.0) * 6, alone * 4)


def test_align_improves_retrieval_and_exports_a_loadable_folder(tiny_bert_dir, tiny_vocabulary, tmp_path, capsys):
    out = tmp_path / "aligned"
    code = align_main(["--out", str(out), "--vocabulary", str(tiny_vocabulary), "--steps", "60", "--lr", "0.001",
                       "--classes-per-batch", "8", "--no-progress", f"text_encoder.path={tiny_bert_dir}"])
    assert code == 0
    record = json.loads((out / "alignment.json").read_text())
    before, after = record["retrieval_before"], record["retrieval_after"]
    assert before["queries"] == after["queries"] == 8
    assert after["top1"] >= before["top1"]
    assert record["adapted_from"]["path"] == str(tiny_bert_dir)
    assert record["text_encoder"] == {"name": "hf", "path": str(out), "pooling": "mean", "normalize": True,
                                      "max_length": 32, "template": "{}"}
    printed = capsys.readouterr().out
    assert "before (class names)" in printed and f"text_encoder.path={out}" in printed
    # the folder is an encoder like any other: new fingerprint, and the retrieval it was written with
    vocabulary = Vocabulary.load(tiny_vocabulary)
    clear_embedding_cache()
    loaded = build_text_encoder(record["text_encoder"], vocabulary)
    original = build_text_encoder({"name": "hf", "path": str(tiny_bert_dir)}, vocabulary)
    assert loaded.identity()["fingerprint"] != original.identity()["fingerprint"]
    again = paraphrase_retrieval(loaded, vocabulary)
    assert again["top1"] == pytest.approx(after["top1"])
    # held-out paraphrases end nearer their own class than before, relative to the nearest other class
    assert _margin(loaded, vocabulary) > _margin(original, vocabulary) + 0.05
    assert align_main(["--out", str(out), "--vocabulary", str(tiny_vocabulary), "--steps", "1",
                       f"text_encoder.path={tiny_bert_dir}"]) == 2  # never over a folder without --overwrite


def _margin(encoder, vocabulary) -> float:
    """Mean over held-out paraphrases of cosine to their class's name less the highest cosine to another's."""
    names = vocabulary.names
    keys = torch.nn.functional.normalize(encoder.encode(names), dim=-1)
    queries = [(text, i) for i, n in enumerate(names) for text in vocabulary.heldout[n]]
    sims = torch.nn.functional.normalize(encoder.encode([q for q, _ in queries]), dim=-1) @ keys.T
    own = torch.tensor([sims[k, i] for k, (_, i) in enumerate(queries)])
    for k, (_, i) in enumerate(queries):
        sims[k, i] = -2
    return float((own - sims.max(1).values).mean())


def test_clip_tower_aligns_and_reloads(tiny_clip, tiny_vocabulary, tmp_path):
    vocabulary = Vocabulary.load(tiny_vocabulary)
    section = {"name": "clip", "model_name": tiny_clip["model_name"], "weights": tiny_clip["weights"],
               "config_dir": tiny_clip["config_dir"]}
    encoder = build_text_encoder(section, vocabulary)
    before = encoder.encode(["liver"]).clone()
    losses = align(encoder, vocabulary, AlignSettings(steps=3, classes_per_batch=4, lr=1e-3), progress=False)
    assert len(losses) == 3
    adapted = encoder.encode(["liver", "spleen"])
    assert not torch.allclose(adapted[0], before[0])
    exported = encoder.export(tmp_path / "clip")
    reloaded = build_text_encoder(exported, vocabulary)
    assert torch.allclose(reloaded.encode(["liver", "spleen"]), adapted, atol=1e-5)


def test_refuses_towers_it_cannot_adapt(tmp_path, capsys):
    assert align_main(["--out", str(tmp_path / "x"), "text_encoder.name=onehot"]) == 2
    assert "align-text adapts hf and clip towers" in capsys.readouterr().err
    assert align_main(["--out", str(tmp_path / "x"), "train.steps=3"]) == 2
