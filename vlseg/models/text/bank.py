"""A bank of precomputed prompt embeddings (``.npz``: ``labels`` strings, ``embeddings`` N×D), optionally backed by
the text tower that made them.

VoxTell ships one so that known prompts skip its 4-billion-parameter Qwen3 tower; CLIP-Universal's 32 class
embeddings are a closed bank.  Prompts are matched to labels after stripping and (``lowercase``) lower-casing.  A prompt
outside the bank goes to ``backbone`` (a text-encoder section, e.g. ``hf`` with last-token pooling) when one is given,
and is otherwise refused with the bank's labels: the model was never asked anything else.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from vlseg.errors import VlsegError
from vlseg.models.text.base import TextEncoder
from vlseg.registry import TEXT_ENCODERS


def read_bank(path: Path) -> tuple[list[str], np.ndarray]:
    """``(labels, embeddings float32 [N, D])`` of a bank file; one-line errors for anything else."""
    try:
        with np.load(path, allow_pickle=False) as data:
            labels, embeddings = [str(v) for v in data["labels"]], np.asarray(data["embeddings"], np.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise VlsegError(f"{path}: not an embedding bank (.npz with 'labels' and 'embeddings': {exc})") from None
    if embeddings.ndim != 2 or embeddings.shape[0] != len(labels):
        raise VlsegError(f"{path}: {len(labels)} labels but embeddings of shape {embeddings.shape}")
    return labels, embeddings


def write_bank(path: Path, labels: list[str], embeddings) -> Path:
    np.savez(path, labels=np.asarray(labels, dtype=str), embeddings=np.asarray(embeddings))
    return path


@TEXT_ENCODERS.register("embedding_bank")
class EmbeddingBank(TextEncoder):
    def __init__(self, bank: str | None = None, backbone: dict | None = None, lowercase: bool = True,
                 vocabulary=None):
        super().__init__()
        if not bank:
            raise VlsegError("text_encoder.bank: give the .npz file of precomputed prompt embeddings")
        self.path = Path(bank).expanduser()
        if not self.path.is_file():
            raise VlsegError(f"{self.path}: embedding bank not found")
        self.lowercase = bool(lowercase)
        labels, embeddings = read_bank(self.path)
        self.labels = labels
        self.index = {self._key(label): i for i, label in enumerate(labels)}
        self.register_buffer("table", torch.from_numpy(embeddings), persistent=False)
        self.dim = int(embeddings.shape[1])
        self.backbone_section = dict(backbone) if backbone else None
        self.backbone = None  # built on the first prompt outside the bank (a 4B tower is not loaded for nothing)
        self.open_vocabulary = self.backbone_section is not None
        self.fingerprint = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]  # the content, whatever its name
        self.freeze_()

    def _key(self, text: str) -> str:
        text = " ".join(str(text).split())
        return text.lower() if self.lowercase else text

    def identity(self) -> dict:
        ident = {"name": "embedding_bank", "bank": self.path.name, "entries": len(self.labels),
                 "lowercase": self.lowercase, "fingerprint": self.fingerprint}
        if self.backbone_section:
            ident["backbone"] = {k: v for k, v in self.backbone_section.items() if k != "path"}
        return ident

    def _tower(self) -> TextEncoder:
        if self.backbone is None:
            self.backbone = TEXT_ENCODERS.build(self.backbone_section, vocabulary=None)
            if self.backbone.dim != self.dim:
                raise VlsegError(f"text_encoder.backbone gives {self.backbone.dim}-d embeddings, the bank "
                                 f"{self.path.name} holds {self.dim}-d ones")
        return self.backbone

    def embed(self, texts: list[str]) -> torch.Tensor:
        keys = [self._key(t) for t in texts]
        unknown = [t for t, k in zip(texts, keys) if k not in self.index]
        if unknown and self.backbone_section is None:
            shown = ", ".join(self.labels[:40]) + (f" … ({len(self.labels)} in all)" if len(self.labels) > 40 else "")
            raise VlsegError(f"prompt {unknown[0]!r} is not in this model's embedding bank ({self.path.name}) and the "
                             f"model has no text tower for other prompts; known prompts: {shown}")
        out = torch.empty(len(texts), self.dim, dtype=self.table.dtype, device=self.table.device)
        known = [i for i, k in enumerate(keys) if k in self.index]
        if known:
            out[known] = self.table[[self.index[keys[i]] for i in known]]
        missing = [i for i, k in enumerate(keys) if k not in self.index]
        if missing:
            out[missing] = self._tower().embed([keys[i] for i in missing]).to(out)
        return out
