"""Sides, lesions and counterparts between classes, on the bundled vocabulary."""

from __future__ import annotations

import numpy as np
import pytest

from vlseg.vocab.relations import counterpart, is_lesion, relation_matrices, side, sideless
from vlseg.vocab.vocabulary import Vocabulary


@pytest.fixture(scope="module")
def vocabulary():
    return Vocabulary.load("default")


@pytest.mark.parametrize("text, expected", [("left kidney", "left"), ("Right lung, upper lobe", "right"),
                                            ("dextral kidney", "right"), ("rib L 3", "left"), ("kidney", None),
                                            ("left and right lungs", None), ("lumbar vertebra L3", None)])
def test_side(text, expected):
    # "L3" is one word: a vertebra's name never reads as a side
    assert side(text) == expected


def test_sideless_and_lesion():
    assert sideless("Left kidney") == "kidney"
    assert is_lesion("liver tumor") and is_lesion("kidney cyst") and not is_lesion("liver")


def test_counterparts(vocabulary):
    assert counterpart(vocabulary, "left kidney", "right kidney") == "left/right"
    assert counterpart(vocabulary, "liver", "liver tumor") == "organ/lesion"
    assert counterpart(vocabulary, "liver tumor", "liver") == "organ/lesion"
    assert counterpart(vocabulary, "left lung", "lung") is None
    assert counterpart(vocabulary, "liver", "spleen") is None


def test_relation_matrices(vocabulary):
    nested, counterparts = relation_matrices(vocabulary)
    i = {n: k for k, n in enumerate(vocabulary.names)}
    assert nested[i["lung"], i["left lung"]] and nested[i["left lung"], i["lung"]]
    assert not nested[i["liver"], i["liver tumor"]]  # a lesion inside its organ is contrasted, not left alone
    assert counterparts[i["liver"], i["liver tumor"]] and counterparts[i["left kidney"], i["right kidney"]]
    assert not counterparts[i["liver"], i["spleen"]]
    assert np.array_equal(nested, nested.T) and np.array_equal(counterparts, counterparts.T)
    assert not (nested & counterparts).any()
