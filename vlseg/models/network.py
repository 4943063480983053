"""The segmentation network: image encoder + fusion, with the text encoder inside only when it is trained."""

from __future__ import annotations

import copy
import inspect
from pathlib import Path

import torch
from torch import nn

from vlseg.errors import VlsegError
from vlseg.models.features import Fusion, FusionOutput, ImageEncoder, ImageFeatures, check_pairing
from vlseg.models.text import TextEncoder, build_text_encoder
from vlseg.registry import FUSIONS, IMAGE_ENCODERS


class VLSegNet(nn.Module):
    """``forward(image, prompts, query_mask)`` → ``FusionOutput`` (``vlseg.models.features``).

    ``prompts`` is either a ``[B, Q, D]`` tensor of text embeddings (frozen encoder, embeddings cached outside) or,
    when the text encoder is trained, a tuple ``(texts, index)``: the batch's distinct strings and a ``[B, Q]`` index
    into them, so each string is encoded once per step and gradients reach the encoder inside this module.
    A frozen encoder is deliberately not a submodule: it stays out of the optimiser, of checkpoints (which record its
    identity instead) and, later, of ZeRO partitioning.
    """

    def __init__(self, image_encoder: ImageEncoder, fusion: Fusion, text_dim: int,
                 text_encoder: TextEncoder | None = None, axis_order: str = "xyz"):
        super().__init__()
        if axis_order not in ("xyz", "zyx"):
            raise VlsegError(f"data.axis_order={axis_order!r}: use 'xyz' or 'zyx'")
        # "zyx": the network sees every array with its spatial axes reversed (nnU-Net reads NIfTIs that way, so
        # networks trained there, VoxTell's, expect it); the masks come back in vlseg's [X, Y, Z] order.
        self.transposed = axis_order == "zyx"
        check_pairing(image_encoder, fusion, type(image_encoder).__name__, type(fusion).__name__)
        self.image_encoder = image_encoder
        self.fusion = fusion
        self.text_encoder = text_encoder
        # Sentence embeddings of anatomical terms share a large common component (MiniLM: cos(liver, liver tumor)
        # = .64, cos(liver, left kidney) = .43), so the differences that matter are small.  A fixed standardisation,
        # fitted once on the training vocabulary and saved with the weights, puts those differences at unit scale.
        self.register_buffer("prompt_center", torch.zeros(text_dim))
        self.register_buffer("prompt_scale", torch.ones(1))  # 1-d: see QueryDecoder.logit_scale

    @torch.no_grad()
    def calibrate_prompts(self, embeddings: torch.Tensor) -> None:
        """Fit the prompt standardisation on ``[N, D]`` embeddings of the vocabulary's wordings."""
        emb = embeddings.float().to(self.prompt_center.device)
        self.prompt_center.copy_(emb.mean(0))
        self.prompt_scale.fill_(1.0 / max(float((emb - emb.mean(0)).std()), 1e-6))

    def set_activation_checkpointing(self, enabled: bool) -> list[str]:
        """Switch activation checkpointing on every component that supports it (an ``activation_checkpointing``
        attribute: the U-Net's stages, the query decoder's layers); returns the components switched."""
        switched = []
        for name, module in self.named_modules():
            if hasattr(module, "activation_checkpointing"):
                module.activation_checkpointing = bool(enabled)
                switched.append(name)
        return switched

    def encode_image(self, image: torch.Tensor) -> ImageFeatures:
        return self.image_encoder(image.permute(0, 1, 4, 3, 2).contiguous() if self.transposed else image)

    def embed_prompts(self, prompts) -> torch.Tensor:
        if isinstance(prompts, torch.Tensor):
            emb = prompts
        else:
            texts, index = prompts
            if self.text_encoder is None:
                raise ValueError("text strings given but this network has no trainable text encoder")
            emb = self.text_encoder(list(texts))[index]
        return (emb - self.prompt_center.to(emb.dtype)) * self.prompt_scale.to(emb.dtype)

    def decode(self, features: ImageFeatures, prompts, query_mask=None) -> FusionOutput:
        out = self.fusion(features, self.embed_prompts(prompts), query_mask)
        if not self.transposed:
            return out
        back = lambda t: t.permute(0, 1, 4, 3, 2)  # noqa: E731
        return FusionOutput(back(out.mask_logits), out.presence_logits, tuple(back(t) for t in out.deep_supervision))

    def forward(self, image, prompts, query_mask=None) -> FusionOutput:
        return self.decode(self.encode_image(image), prompts, query_mask)


def build_network(cfg: dict, vocabulary) -> tuple[VLSegNet, TextEncoder]:
    """Build the network and its text encoder from a resolved config. Returns ``(net, text_encoder)``."""
    text_encoder = build_text_encoder(cfg["text_encoder"], vocabulary)
    net = build_vision_network(cfg, text_encoder.dim, None if text_encoder.frozen else text_encoder)
    return net, text_encoder


def build_vision_network(cfg: dict, text_dim: int, text_encoder: TextEncoder | None = None) -> VLSegNet:
    """The config's image encoder and fusion for prompts ``text_dim`` wide, as a ``VLSegNet`` (a trained
    ``text_encoder`` inside; a frozen one stays outside, and needs not be built for this)."""
    image_encoder = IMAGE_ENCODERS.build(cfg["image_encoder"])
    fusion = build_fusion(cfg, image_encoder, text_dim)
    return VLSegNet(image_encoder, fusion, text_dim, text_encoder,
                    axis_order=(cfg.get("data") or {}).get("axis_order", "xyz"))


def build_fusion(cfg: dict, image_encoder: ImageEncoder, text_dim: int) -> Fusion:
    """The config's fusion for ``image_encoder`` and prompts ``text_dim`` wide, once the pairing is checked: the
    encoder's ``feature_channels`` and ``embed_dim`` go to every fusion, its ``strides`` to one that asks for them."""
    factory = FUSIONS.get(cfg["fusion"]["name"])
    check_pairing(image_encoder, factory, cfg["image_encoder"]["name"], cfg["fusion"]["name"])
    supplied = {"text_dim": text_dim, "feature_channels": image_encoder.feature_channels,
                "embed_dim": image_encoder.embed_dim}
    if "strides" in inspect.signature(factory).parameters:
        supplied["strides"] = list(image_encoder.strides)
    return FUSIONS.build(cfg["fusion"], **supplied)


def prompt_inputs(texts: list[list[str]], text_encoder: TextEncoder, device) -> torch.Tensor | tuple:
    """Per-sample prompt lists → what ``VLSegNet`` takes: cached embeddings ``[B, Q, D]`` for a frozen encoder,
    ``(distinct texts, [B, Q] index)`` for a trained one.  Padding positions point at entry 0 (masked later)."""
    q = max(1, max((len(row) for row in texts), default=0))
    distinct = list(dict.fromkeys(t for row in texts for t in row)) or [""]
    where = {t: i for i, t in enumerate(distinct)}
    index = torch.zeros((len(texts), q), dtype=torch.long)
    for b, row in enumerate(texts):
        index[b, : len(row)] = torch.tensor([where[t] for t in row], dtype=torch.long)
    if not text_encoder.frozen:
        return distinct, index.to(device)
    return text_encoder.encode(distinct).to(device)[index.to(device)]


def network_from_checkpoint(path) -> tuple[VLSegNet, TextEncoder, "Vocabulary", dict, dict]:  # noqa: F821
    """Rebuild ``(net, text_encoder, vocabulary, config, meta)`` from a checkpoint or run directory.

    The text encoder is rebuilt from the recorded config and its identity (weights fingerprint) must match the one the
    model was trained with: a different tower behind the same path would silently give meaningless queries.
    """
    from vlseg.checkpoint import load_network_state, read_checkpoint
    from vlseg.errors import VlsegError
    from vlseg.vocab.vocabulary import Vocabulary

    ckpt, meta, state = read_checkpoint(path)
    cfg = with_model_paths(meta["config"], ckpt)
    vocabulary = Vocabulary.from_dict(meta["vocabulary"], str(ckpt))
    try:
        net, text_encoder = build_network(cfg, vocabulary)
    except (KeyError, TypeError, ValueError) as exc:
        raise VlsegError(f"{ckpt}: cannot rebuild the network from its config ({exc})") from None
    want, got = meta["text_encoder"].get("fingerprint"), text_encoder.identity().get("fingerprint")
    if want != got:
        raise VlsegError(f"{ckpt}: text encoder {text_encoder.identity().get('path', '')} has fingerprint {got}, "
                         f"but the model was trained with {want}")
    load_network_state(net, state, ckpt / "model.safetensors")
    return net, text_encoder, vocabulary, cfg, meta


def with_model_paths(cfg: dict, ckpt) -> dict:
    """The config with the text encoder's relative file settings (``path``, ``bank``, ``weights``, ``config_dir``, in
    its section or its ``backbone``) resolved against the checkpoint folder, where an imported model keeps them."""
    cfg = copy.deepcopy(cfg)
    sections = [cfg.get("text_encoder") or {}]
    sections += [s["backbone"] for s in sections if isinstance(s.get("backbone"), dict)]
    for section in sections:
        for key in ("path", "bank", "weights", "config_dir"):
            value = section.get(key)
            if isinstance(value, str) and value and ":" not in value and not Path(value).is_absolute() \
                    and (Path(ckpt) / value).exists():
                section[key] = str(Path(ckpt) / value)
    return cfg


def count_parameters(cfg: dict, text_dim: int) -> dict:
    """Parameters of the image encoder and the fusion a config builds, for a text tower of width ``text_dim``
    (the tower itself is not built: published model sizes such as SAT's leave it out).

    Built on the meta device (no memory, no initialisation time) where the component allows it; MONAI's SwinUNETR
    computes a relative-position index at construction, which the meta device cannot, so it is built on the CPU."""
    counts = {}
    for device in ("meta", "cpu"):
        try:
            with torch.device(device):
                image_encoder = IMAGE_ENCODERS.build(cfg["image_encoder"])
                fusion = build_fusion(cfg, image_encoder, text_dim)
            break
        except (NotImplementedError, RuntimeError):
            if device == "cpu":
                raise
    counts["image_encoder"] = sum(p.numel() for p in image_encoder.parameters())
    counts["fusion"] = sum(p.numel() for p in fusion.parameters())
    counts["total"] = counts["image_encoder"] + counts["fusion"]
    return counts
