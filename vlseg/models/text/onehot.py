"""The text-free baseline: one learned vector per vocabulary class (any synonym of the class maps to it)."""

from __future__ import annotations

import torch
from torch import nn

from vlseg.errors import VlsegError
from vlseg.models.text.base import TextEncoder
from vlseg.registry import TEXT_ENCODERS


@TEXT_ENCODERS.register("onehot")
class OneHotTextEncoder(TextEncoder):
    open_vocabulary = False
    def __init__(self, vocabulary, dim: int = 64, freeze: bool = False, fixed: bool = False):
        super().__init__()
        self.vocabulary = vocabulary
        self.fixed = bool(fixed)
        # fixed: DoDNet's task code, the class's one-hot vector itself (as long as the vocabulary, never trained)
        self.dim = len(vocabulary) if self.fixed else dim
        self.table = nn.Embedding(len(vocabulary), self.dim)
        if self.fixed:
            nn.init.eye_(self.table.weight)
        else:
            nn.init.normal_(self.table.weight, std=1.0)
        self.frozen = False
        if freeze or self.fixed:
            self.freeze_()

    def identity(self) -> dict:
        ident = {"name": "onehot", "dim": self.dim, "classes": len(self.vocabulary)}
        return ident | {"fixed": True} if self.fixed else ident

    def cache_key(self) -> str:
        # A frozen random table must not share cached rows with another model's (a fixed one-hot table could, but
        # its vocabulary order is the model's own).
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
