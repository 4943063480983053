"""The class vocabulary: canonical names, the wordings that refer to them, held-out paraphrases, modality tags and
the hierarchy (``includes``: a child lies inside its parent; ``union_of``: a class is exactly its parts).

The canonical vocabulary is data (``vlseg/vocab/vocabulary.yaml``); a model knows the subset its training corpus
annotates, and its checkpoint carries that subset.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from vlseg.errors import VlsegError

_OPTIONAL = ("heldout", "modalities", "includes", "union_of")


def normalize_text(text: str) -> str:
    """Lower case, underscores read as spaces (dataset label names such as ``kidney_left``), whitespace collapsed."""
    return re.sub(r"[\s_]+", " ", text.lower()).strip()


@dataclass
class Vocabulary:
    names: list[str]
    synonyms: dict[str, list[str]] = field(default_factory=dict)
    heldout: dict[str, list[str]] = field(default_factory=dict)
    modalities: dict[str, list[str]] = field(default_factory=dict)
    includes: dict[str, list[str]] = field(default_factory=dict)
    union_of: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self):
        for name in self.names:
            self.synonyms.setdefault(name, [name])
            for attr in _OPTIONAL:
                getattr(self, attr).setdefault(name, [])
        self._lookup = {}
        for name in self.names:
            for text in [name, *self.synonyms[name], *self.heldout[name]]:
                self._lookup.setdefault(normalize_text(text), name)
        self._parents: dict[str, list[str]] = {name: [] for name in self.names}
        for name in self.names:
            for child in self.children(name):
                self._parents.setdefault(child, []).append(name)

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, source: str = "vocabulary") -> "Vocabulary":
        try:
            entries = data["classes"]
            names = [str(e["name"]) for e in entries]
            fields = {"synonyms": {n: [str(s) for s in e.get("synonyms") or [n]] for n, e in zip(names, entries)}}
            for attr in _OPTIONAL:
                fields[attr] = {n: [str(s) for s in e.get(attr) or []] for n, e in zip(names, entries)}
        except (KeyError, TypeError):
            raise VlsegError(f"{source}: expected 'classes: [{{name, synonyms, ...}}, ...]'") from None
        known = set(names)
        if len(known) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise VlsegError(f"{source}: class {dup!r} is listed twice")
        for attr in ("includes", "union_of"):
            for name, refs in fields[attr].items():
                unknown = [r for r in refs if r not in known]
                if unknown:
                    raise VlsegError(f"{source}: class {name!r} {attr} unknown class {unknown[0]!r}")
        owners: dict[str, str] = {}
        for name in names:
            for text in fields["synonyms"][name]:
                owners.setdefault(normalize_text(text), name)
        for name in names:
            for text in fields["heldout"][name]:
                if normalize_text(text) in owners:
                    raise VlsegError(f"{source}: held-out paraphrase {text!r} of {name!r} is also a training "
                                     f"wording of {owners[normalize_text(text)]!r}")
        return cls(names, **fields)

    @classmethod
    def load(cls, spec: str | Path = "default") -> "Vocabulary":
        from vlseg.config import load_yaml

        default = str(spec) == "default"
        path = Path(str(resources.files("vlseg.vocab").joinpath("vocabulary.yaml"))) if default else Path(spec)
        source = "vlseg/vocab/vocabulary.yaml" if default else str(spec)
        return cls.from_dict(load_yaml(path, "vocabulary file"), source)

    def subset(self, names, source: str = "the corpus") -> "Vocabulary":
        """The classes in ``names`` (canonical order kept); unknown names are an error naming ``source``."""
        wanted = set(names)
        unknown = sorted(wanted - set(self.names))
        if unknown:
            raise VlsegError(f"{source}: class {unknown[0]!r} is not in the vocabulary "
                             f"(see `vlseg classes`; {len(unknown)} unknown)")
        kept = [n for n in self.names if n in wanted]
        pick = lambda d: {n: [r for r in d[n] if r in wanted] for n in kept}  # noqa: E731
        return Vocabulary(kept, {n: list(self.synonyms[n]) for n in kept}, {n: list(self.heldout[n]) for n in kept},
                          {n: list(self.modalities[n]) for n in kept}, pick(self.includes), pick(self.union_of))

    def to_dict(self) -> dict:
        classes = []
        for n in self.names:
            entry = {"name": n, "synonyms": self.synonyms[n]}
            entry.update({attr: getattr(self, attr)[n] for attr in _OPTIONAL if getattr(self, attr)[n]})
            classes.append(entry)
        return {"version": 2, "classes": classes}

    # --- use ------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def resolve(self, text: str) -> str | None:
        """Canonical class a wording (training or held-out) refers to, or None for free text outside it."""
        return self._lookup.get(normalize_text(text))

    def all_texts(self) -> list[str]:
        """Every training wording (held-out paraphrases excluded: they are never trained on)."""
        return sorted({t for n in self.names for t in self.synonyms[n]})

    def sample_wording(self, name: str, rng: np.random.Generator, use_synonyms: bool = True) -> str:
        options = self.synonyms[name] if use_synonyms else [name]
        return options[int(rng.integers(len(options)))]

    def parents(self, name: str) -> list[str]:
        """Classes that contain ``name`` (``includes``) or are a union with it as a part (canonical order)."""
        return list(self._parents.get(name, ()))

    def children(self, name: str) -> list[str]:
        """Classes ``name`` includes or is the union of."""
        return list(dict.fromkeys(self.includes[name] + self.union_of[name]))

    def search(self, text: str) -> list[str]:
        """Classes (canonical order) whose name, a synonym or a held-out paraphrase contains ``text``, ignoring case
        and reading underscores as spaces; an empty query matches every class."""
        query = normalize_text(text)
        return [n for n in self.names
                if any(query in normalize_text(t) for t in (n, *self.synonyms[n], *self.heldout[n]))]
