"""open_clip text towers (CLIP, BiomedCLIP-style configs) with weights from a local file."""

from __future__ import annotations

from pathlib import Path

import torch

from vlseg.errors import VlsegError
from vlseg.models.text.base import TextEncoder, add_lora, fingerprint_files
from vlseg.registry import TEXT_ENCODERS


@TEXT_ENCODERS.register("clip")
class ClipTextEncoder(TextEncoder):
    """``model_name`` is an open_clip architecture; ``config_dir`` adds custom architecture JSONs (a tiny test tower,
    a local BiomedCLIP config); ``weights`` is a local checkpoint file.  The vision tower is dropped after loading.
    Adaptation: ``freeze: true`` (default), ``freeze: false`` (the whole tower trains) or ``lora: {r, alpha, dropout,
    target_modules}`` (adapters on the text transformer's MLP layers ``c_fc``/``c_proj`` by default)."""

    def __init__(self, model_name: str = "ViT-B-32", weights: str | None = None, config_dir: str | None = None,
                 template: str = "{}", normalize: bool = True, freeze: bool = True, allow_random: bool = False,
                 lora: dict | None = None, vocabulary=None):
        super().__init__()
        import open_clip  # heavy import (torchvision, timm): only when this encoder is chosen

        if config_dir is not None:
            if not Path(config_dir).is_dir():
                raise VlsegError(f"{config_dir}: text_encoder.config_dir is not a folder")
            open_clip.add_model_config(str(config_dir))
        if model_name not in open_clip.list_models():
            raise VlsegError(f"text_encoder.model_name={model_name!r}: not an open_clip architecture")
        if weights is None and not allow_random:
            raise VlsegError("text_encoder.weights: give a local open_clip checkpoint file (or allow_random=true)")
        if weights is not None and not Path(weights).is_file():
            raise VlsegError(f"{weights}: CLIP weights file not found")
        try:
            model = open_clip.create_model(model_name, pretrained=str(weights) if weights else None, device="cpu")
        except (RuntimeError, OSError, KeyError) as exc:
            raise VlsegError(f"{weights}: cannot load as {model_name} ({str(exc).splitlines()[0]})") from None
        if hasattr(model, "visual"):
            model.visual = None  # only the text tower is used
        self.model = model
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.model_name, self.weights, self.config_dir = model_name, weights, config_dir
        self.template, self.normalize = template, normalize
        self.fingerprint = fingerprint_files([Path(weights)]) if weights else "random"
        with torch.no_grad():
            self.dim = int(self.model.encode_text(self.tokenizer(["x"])).shape[-1])
        self.frozen = False
        self.lora = dict(lora) if lora else None
        if self.lora:  # adapters on the text transformer's MLP layers (by default); the CLIP weights stay frozen
            self.model = add_lora(self.model, self.lora, ["c_fc", "c_proj"])
        elif freeze:
            self.freeze_()

    def identity(self) -> dict:
        return {"name": "clip", "model_name": self.model_name, "weights": self.weights, "config_dir": self.config_dir,
                "template": self.template, "normalize": self.normalize, "fingerprint": self.fingerprint,
                **({"lora": self.lora} if self.lora else {})}

    def export(self, folder: Path) -> dict:
        """Write the whole CLIP model, its text tower as adapted here (LoRA merged in) and its vision tower as loaded,
        as ``open_clip_model.safetensors`` (with the architecture JSON when it came from ``config_dir``); returns the
        ``text_encoder`` section that loads it."""
        import shutil

        import open_clip
        from safetensors.torch import save_file

        text = self.model.merge_and_unload() if self.lora else self.model
        full = open_clip.create_model(self.model_name, pretrained=str(self.weights) if self.weights else None,
                                      device="cpu")
        adapted = {k: v for k, v in text.state_dict().items() if not k.startswith("visual.")}
        missing = sorted(set(adapted) - set(full.state_dict()))
        if missing:
            raise VlsegError(f"cannot export the adapted CLIP tower: {missing[0]!r} is not a key of {self.model_name}")
        state = {**full.state_dict(), **adapted}
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}  # tied weights stored twice
        save_file(tensors, folder / "open_clip_model.safetensors")
        config_dir = None
        if self.config_dir is not None:
            config = Path(self.config_dir) / f"{self.model_name}.json"
            if config.is_file():
                shutil.copy(config, folder / config.name)
                config_dir = str(folder)
        return {"name": "clip", "model_name": self.model_name, "weights": str(folder / "open_clip_model.safetensors"),
                "config_dir": config_dir, "template": self.template, "normalize": self.normalize}

    def embed(self, texts: list[str]) -> torch.Tensor:
        device = self.model.token_embedding.weight.device if hasattr(self.model, "token_embedding") else "cpu"
        tokens = self.tokenizer([self.template.format(t) for t in texts]).to(device)
        out = self.model.encode_text(tokens)
        return torch.nn.functional.normalize(out, dim=-1) if self.normalize else out
