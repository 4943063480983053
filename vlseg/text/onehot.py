"""The text-free baseline: one learned vector per vocabulary class (any synonym of the class maps to it)."""

from __future__ import annotations

import torch
from torch import nn

from vlseg.errors import VlsegError
from vlseg.registry import TEXT_ENCODERS
from vlseg.text.base import TextEncoder


@TEXT_ENCODERS.register("onehot")
class OneHotTextEncoder(TextEncoder):
    def __init__(self, vocabulary, dim: int = 64, freeze: bool = False):
        super().__init__()
        self.vocabulary = vocabulary
        self.dim = dim
        self.table = nn.Embedding(len(vocabulary), dim)
        nn.init.normal_(self.table.weight, std=1.0)
        self.frozen = False
        if freeze:
            self.freeze_()

    def identity(self) -> dict:
        return {"name": "onehot", "dim": self.dim, "classes": len(self.vocabulary)}

    def cache_key(self) -> str:
        # A frozen one-hot table is random: its rows must not be shared with another model's cache.
        return f"onehot@{id(self)}"

    def embed(self, texts: list[str]) -> torch.Tensor:
        idx = []
        for text in texts:
            name = self.vocabulary.resolve(text)
            if name is None:
                raise VlsegError(f"prompt {text!r}: the onehot text encoder only knows the vocabulary's classes "
                                 f"({', '.join(self.vocabulary.names)})")
            idx.append(self.vocabulary.index(name))
        return self.table(torch.tensor(idx, device=self.table.weight.device))
