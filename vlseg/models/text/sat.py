"""SAT's text tower: a BERT-family encoder (BioLORD-2023-C, an MPNet), mean-pooled, a two-layer projection, plus a
learned embedding of the scan's modality.

SAT trained its segmenter on these embeddings with the tower frozen, so an imported SAT model needs them exactly, and
three details of SAT's code change them:

* tokenisation: the literal strings ``[CLS]`` and ``[SEP]`` are put around the word pieces and looked up as ordinary
  vocabulary entries (MPNet's own start and end tokens are ``<s>`` and ``</s>``), so a standard tokenizer call gives
  other ids; sequences are padded with id 0 and every id above 0 counts as a real token; at most 256 tokens, the last
  one ``[SEP]`` again after truncation;
* pooling: the mean of the real tokens' last hidden states;
* modality: ``modality_embed`` row 0 ct, 1 mri, 2 us, 3 pet (SAT's table) added after the projection.  MR sequence
  names (t1, t2, flair, dwi, adc...) count as mri, as SAT's loaders do.

Files: ``path``, a transformers folder (config, tokenizer files and the tower's weights as SAT fine-tuned them);
``weights``, a safetensors file with ``projection_layer.{0,2}.{weight,bias}`` and ``modality_embed.weight``
(``vlseg import sat-nano`` writes both from SAT's text checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vlseg.errors import VlsegError
from vlseg.models.text.base import TextEncoder, fingerprint_files
from vlseg.models.text.hf import load_transformers
from vlseg.registry import TEXT_ENCODERS

MODALITY_CODES = {"ct": 0, "mri": 1, "us": 2, "pet": 3}
MR_NAMES = ("mr", "mri", "t1", "t1w", "t1c", "t1ce", "t1gd", "t2", "t2w", "flair", "dwi", "adc", "pd")
HEAD_KEYS = ("projection_layer.0.weight", "projection_layer.0.bias", "projection_layer.2.weight",
             "projection_layer.2.bias", "modality_embed.weight")


def modality_code(name: str) -> int:
    """SAT's row of ``modality_embed`` for a modality name (``ct``, ``mri`` or an MR sequence, ``us``, ``pet``)."""
    key = str(name).strip().lower().replace("mri ", "").replace("-", "")
    key = "mri" if key in MR_NAMES else key
    if key not in MODALITY_CODES:
        raise VlsegError(f"text_encoder.modality={name!r}: use one of ct, mri (or an MR sequence: t1, t2, flair, "
                         f"dwi, adc), us, pet")
    return MODALITY_CODES[key]


def read_head(path: Path) -> dict[str, torch.Tensor]:
    """The projection and modality embedding of a SAT text tower, checked for completeness and consistent shapes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise VlsegError(f"{path}: SAT text head (projection and modality embedding) not found")
    try:
        head = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise VlsegError(f"{path}: not a safetensors file ({str(exc).splitlines()[0]})") from None
    missing = [k for k in HEAD_KEYS if k not in head]
    extra = sorted(set(head) - set(HEAD_KEYS))
    if missing or extra:
        raise VlsegError(f"{path}: {'missing ' + repr(missing[0]) if missing else 'unexpected ' + repr(extra[0])} "
                         f"(a SAT text head holds {', '.join(HEAD_KEYS)})")
    return head


class SatTokenizer:
    """SAT's tokenisation over a transformers tokenizer: ``[CLS]`` pieces ``[SEP]``, zero padding, mask = id > 0."""

    def __init__(self, tokenizer, max_length: int = 256):
        self.tokenizer, self.max_length = tokenizer, int(max_length)
        self.cls_id, self.sep_id = tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]"])

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        rows = [[self.cls_id, *self.tokenizer.convert_tokens_to_ids(self.tokenizer.tokenize(t)), self.sep_id]
                for t in texts]
        width = min(max(len(r) for r in rows), self.max_length)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            if len(row) > width:
                row = row[:width - 1] + [self.sep_id]
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": (ids > 0).long()}


@TEXT_ENCODERS.register("sat")
class SatTextEncoder(TextEncoder):
    """``encode(texts)`` → SAT's query embeddings for scans of one ``modality``."""

    def __init__(self, path: str | None = None, weights: str | None = None, modality: str = "ct",
                 max_length: int = 256, freeze: bool = True, vocabulary=None):
        super().__init__()
        if not path or not weights:
            raise VlsegError("text_encoder: the sat encoder needs path (the tower's transformers folder) and weights "
                             "(its projection and modality embedding); vlseg import sat-nano writes both")
        self.spec = path
        folder, tokenizer, self.model, towers = load_transformers(path)
        self.tokenize = SatTokenizer(tokenizer, max_length)
        self.max_length = int(max_length)
        self.head_path = Path(weights).expanduser()
        self._build_head(read_head(self.head_path))
        self.modality = str(modality)
        self.code = modality_code(modality)
        if self.code >= self.modality_embed.num_embeddings:
            raise VlsegError(f"{self.head_path}: no modality embedding for {modality!r} (row {self.code}; the file "
                             f"has {self.modality_embed.num_embeddings})")
        self.fingerprint = fingerprint_files(towers + [folder / "config.json", self.head_path])
        self.frozen = False
        if freeze:
            self.freeze_()

    def _build_head(self, head: dict[str, torch.Tensor]) -> None:
        hidden = int(self.model.config.hidden_size)
        w0, w2 = head["projection_layer.0.weight"], head["projection_layer.2.weight"]
        table = head["modality_embed.weight"]
        if w0.shape[1] != hidden or w2.shape[1] != w0.shape[0] or table.shape[1] != w2.shape[0]:
            raise VlsegError(f"{self.head_path}: projection {tuple(w0.shape)} → {tuple(w2.shape)} and modality "
                             f"embedding {tuple(table.shape)} do not fit a {hidden}-wide tower")
        self.projection = nn.Sequential(nn.Linear(hidden, w0.shape[0]), nn.GELU(), nn.Linear(w0.shape[0], w2.shape[0]))
        self.modality_embed = nn.Embedding(table.shape[0], table.shape[1])
        self.projection.load_state_dict({k.removeprefix("projection_layer."): v for k, v in head.items()
                                         if k.startswith("projection_layer.")})
        self.modality_embed.load_state_dict({"weight": table})
        self.dim = int(table.shape[1])

    def use_modality(self, name: str) -> None:
        """Embed the next prompts for scans of modality ``name`` (``vlseg predict --modality``: CT, MR, ...)."""
        code = modality_code(str(name).lower())
        if code >= self.modality_embed.num_embeddings:
            raise VlsegError(f"{self.head_path}: no modality embedding for {name!r}")
        self.modality, self.code = str(name).lower(), code

    def identity(self) -> dict:
        return {"name": "sat", "path": self.spec, "modality": self.modality, "max_length": self.max_length,
                "fingerprint": self.fingerprint}

    def embed(self, texts: list[str]) -> torch.Tensor:
        device = self.modality_embed.weight.device
        tokens = {k: v.to(device) for k, v in self.tokenize(list(texts)).items()}
        hidden = self.model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return self.projection(pooled) + self.modality_embed.weight[self.code]
