"""How two classes of a vocabulary relate beyond the hierarchy's edges: which side of the body a wording names, which
classes are abnormalities rather than anatomy, and the counterparts a reader (or a text encoder) confuses most:
the other side of a left/right pair, and a lesion and the organ it lies in."""

from __future__ import annotations

import re

import numpy as np

# A class naming an abnormality rather than anatomy (its name holds one of these words).
LESION_WORDS = frozenset({"tumor", "tumors", "tumour", "lesion", "lesions", "cancer", "cyst", "cysts", "neoplasm",
                          "mass", "metastasis", "metastases", "nodule", "nodules", "carcinoma", "edema", "necrosis",
                          "enhancing", "hemorrhage", "infarct", "stone", "stones", "calculi", "calculus", "effusion",
                          "fracture"})
_SIDES = {"left": "left", "right": "right", "l": "left", "r": "right", "lt": "left", "rt": "right",
          "sinister": "left", "sinistra": "left", "sinistral": "left", "dexter": "right", "dextra": "right",
          "dextral": "right"}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def side(text: str) -> str | None:
    """``"left"`` or ``"right"`` when the wording names one side only (as a whole word: left, right, l, r, lt, rt,
    sinister, sinistral, dexter, dextral), None when it names neither or both ("left and right lungs")."""
    found = {_SIDES[w] for w in _words(text) if w in _SIDES}
    return found.pop() if len(found) == 1 else None


def sideless(text: str) -> str:
    """The wording's words without those naming a side."""
    return " ".join(w for w in _words(text) if w not in _SIDES)


def is_lesion(name: str) -> bool:
    return bool(LESION_WORDS & set(_words(name)))


def ancestors(vocabulary, name: str) -> set[str]:
    """Every class that contains ``name``, however far up the hierarchy."""
    seen, todo = set(), list(vocabulary.parents(name))
    while todo:
        parent = todo.pop()
        if parent not in seen:
            seen.add(parent)
            todo += vocabulary.parents(parent)
    return seen


def counterpart(vocabulary, a: str, b: str) -> str | None:
    """``"left/right"`` when ``b`` is ``a`` on the other side, ``"organ/lesion"`` when one is an abnormality and the
    other the anatomy it lies in (by the hierarchy, or sharing the organ's words), else None."""
    if side(a) and side(b) and side(a) != side(b) and sideless(a) == sideless(b):
        return "left/right"
    if is_lesion(a) != is_lesion(b):
        related = b in ancestors(vocabulary, a) or a in ancestors(vocabulary, b)
        shared = (set(sideless(a).split()) & set(sideless(b).split())) - LESION_WORDS
        if related or shared:
            return "organ/lesion"
    return None


def relation_matrices(vocabulary) -> tuple[np.ndarray, np.ndarray]:
    """``(nested, counterparts)``: boolean class × class matrices of anatomy inside anatomy at any depth (a lung and
    its lobes), and of the pairs ``counterpart`` names."""
    names = list(vocabulary.names)
    index = {n: i for i, n in enumerate(names)}
    nested = np.zeros((len(names), len(names)), bool)
    counterparts = np.zeros_like(nested)
    for name in names:
        for parent in ancestors(vocabulary, name):
            if is_lesion(name) == is_lesion(parent):
                nested[index[name], index[parent]] = nested[index[parent], index[name]] = True
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            if not nested[i, j] and counterpart(vocabulary, a, names[j]) is not None:
                counterparts[i, j] = counterparts[j, i] = True
    return nested, counterparts
