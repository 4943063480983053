"""The text-encoder interface and the embedding cache that makes a frozen encoder free per step."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

# (encoder identity key, text) → embedding on the CPU.  Module-level so that every model built in the process with
# the same frozen encoder shares it (a training run, its evaluation and a Segmenter in the same notebook).
_EMBEDDING_CACHE: dict[tuple[str, str], torch.Tensor] = {}


def clear_embedding_cache() -> None:
    _EMBEDDING_CACHE.clear()


def fingerprint_files(paths: list[Path]) -> str:
    """Content hash of weight files: a checkpoint records it so a different encoder behind the same path is noticed."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def add_lora(model: nn.Module, settings: dict, default_targets: list[str]) -> nn.Module:
    """Wrap ``model`` with LoRA adapters (peft): its own weights stay frozen, the adapters train.  ``settings``: ``r``,
    ``alpha``, ``dropout``, ``target_modules`` (names of the linear layers to adapt)."""
    from peft import LoraConfig, get_peft_model

    from vlseg.errors import VlsegError

    known = {"r", "alpha", "dropout", "target_modules"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise VlsegError(f"text_encoder.lora: unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
    config = LoraConfig(r=int(settings.get("r", 8)), lora_alpha=float(settings.get("alpha", 16)),
                        lora_dropout=float(settings.get("dropout", 0.0)),
                        target_modules=list(settings.get("target_modules", default_targets)))
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise VlsegError(f"text_encoder.lora: {str(exc).splitlines()[0]}") from None


class TextEncoder(nn.Module):
    """``encode(list of str) → tensor [N, dim]``.

    Subclasses implement ``embed`` (differentiable, no cache) and ``identity`` (what a checkpoint needs to rebuild the
    same encoder).  A frozen encoder's embeddings are cached by (identity, text).
    """

    dim: int
    frozen: bool = True
    open_vocabulary: bool = True  # whether any phrase can be encoded (not only the vocabulary's own wordings)

    def __init__(self):
        super().__init__()
        self.forward_calls = 0  # texts actually run through the network (the cache's effect is observable)

    def embed(self, texts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def identity(self) -> dict:
        raise NotImplementedError

    def cache_key(self) -> str:
        ident = self.identity()
        return "|".join(f"{k}={ident[k]}" for k in sorted(ident))

    def forward(self, texts: list[str]) -> torch.Tensor:
        self.forward_calls += len(texts)
        return self.embed(list(texts))

    def freeze_(self) -> "TextEncoder":
        self.frozen = True
        self.requires_grad_(False)
        self.eval()
        return self

    def train(self, mode: bool = True):
        # A frozen encoder stays in eval mode (no dropout) whatever the surrounding model does.
        return super().train(mode and not self.frozen)

    def fill_cache(self, texts: list[str], embeddings: torch.Tensor) -> None:
        """Store embeddings computed elsewhere (another process of the same run) as this frozen encoder's."""
        key = self.cache_key()
        for text, vec in zip(texts, embeddings):
            _EMBEDDING_CACHE[(key, text)] = vec.float().cpu()

    def encode(self, texts: list[str]) -> torch.Tensor:
        if not self.frozen:
            return self(texts)
        key = self.cache_key()
        missing = [t for t in dict.fromkeys(texts) if (key, t) not in _EMBEDDING_CACHE]
        if missing:
            with torch.no_grad():
                out = self(missing).float().cpu()
            for text, vec in zip(missing, out):
                _EMBEDDING_CACHE[(key, text)] = vec
        return torch.stack([_EMBEDDING_CACHE[(key, t)] for t in texts])
