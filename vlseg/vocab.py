"""The class vocabulary: canonical names, the wordings that refer to them, and lookup from free text."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from vlseg.errors import VlsegError


def normalize_text(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


@dataclass
class Vocabulary:
    names: list[str]
    synonyms: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self):
        for name in self.names:
            self.synonyms.setdefault(name, [name])
        self._lookup = {}
        for name in self.names:
            for text in [name, *self.synonyms[name]]:
                self._lookup.setdefault(normalize_text(text), name)

    # --- construction -------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, source: str = "vocabulary") -> "Vocabulary":
        try:
            entries = data["classes"]
            names = [str(e["name"]) for e in entries]
            synonyms = {str(e["name"]): [str(s) for s in e.get("synonyms") or [e["name"]]] for e in entries}
        except (KeyError, TypeError):
            raise VlsegError(f"{source}: expected 'classes: [{{name, synonyms}}, ...]'") from None
        if len(set(names)) != len(names):
            raise VlsegError(f"{source}: duplicate class names")
        return cls(names, synonyms)

    @classmethod
    def load(cls, spec: str | Path = "default") -> "Vocabulary":
        if str(spec) == "default":
            text = resources.files("vlseg.resources").joinpath("vocabulary.yaml").read_text()
            return cls.from_dict(yaml.safe_load(text), "vlseg/resources/vocabulary.yaml")
        path = Path(spec)
        if not path.is_file():
            raise VlsegError(f"{path}: vocabulary file not found")
        return cls.from_dict(yaml.safe_load(path.read_text()) or {}, str(path))

    def to_dict(self) -> dict:
        return {"version": 1, "classes": [{"name": n, "synonyms": self.synonyms[n]} for n in self.names]}

    # --- use ------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        return self.names.index(name)

    def resolve(self, text: str) -> str | None:
        """Canonical class a wording refers to, or None for free text outside the vocabulary."""
        return self._lookup.get(normalize_text(text))

    def all_texts(self) -> list[str]:
        return sorted({t for n in self.names for t in self.synonyms[n]})

    def sample_wording(self, name: str, rng: np.random.Generator, use_synonyms: bool = True) -> str:
        options = self.synonyms[name] if use_synonyms else [name]
        return options[int(rng.integers(len(options)))]
