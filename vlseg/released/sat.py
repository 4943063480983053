"""SAT-Nano and SAT-Pro (github zhaoziheng/SAT, weights on the HF hub zzh99/SAT) as vlseg models.

The user downloads SAT's vision checkpoint, its text-encoder checkpoint and the BioLORD-2023-C transformers folder
(its tokenizer and config; the tower's weights come from SAT's text checkpoint, where SAT's knowledge pre-training left
them).  The import maps every key strictly:

* vision: ``module.`` removed; ``backbone.*`` → ``image_encoder.*`` (the same dynamic-network-architectures names, each
  conv and norm also inside ``all_modules``; the first conv keeps its 3 input channels, vlseg repeats a 1-channel scan
  as SAT does); ``projection_layer`` → the query decoder's ``key_proj``; decoder layer ``multihead_attn`` →
  ``cross_attn``, ``linear1/2`` → ``ffn.0/3``, ``norm2`` (before attention) → ``norm_cross``, ``norm3`` (before the
  feed-forward) → ``norm_ffn``; ``transformer_decoder.norm`` → ``out_norm``; ``mask_embed_proj`` → ``mask_head``;
  ``mid_mask_embed_proj.{i}`` → ``aux_heads.{i}`` (deep supervision, kept for fine-tuning).  Dropped on purpose:
  each layer's ``norm1`` (SAT's pre-norm path never calls it) and the optimizer state.
* text: ``text_tower.biolord.*`` → the transformers folder written into the model directory; ``projection_layer`` and
  ``modality_embed`` → ``text/sat_head.safetensors``.  Dropped on purpose: ``atlas_tower.*`` (the image tower of SAT's
  knowledge pre-training) and ``temperature`` (its contrastive loss's), and a stored ``position_ids`` buffer.

The widths are read from the weights and must be the family's published ones (``configs/released/sat-*.yaml``) unless
``--other-widths`` accepts a SAT-architecture checkpoint of another size (a fine-tune, a test model).
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
from pathlib import Path

import torch

from vlseg.errors import VlsegError
from vlseg.models.network import build_vision_network
from vlseg.released.base import RELEASED, ReleasedFamily, map_state, network_state, read_torch_file, write_model_dir

HEAD_FILE = "sat_head.safetensors"
TEXT_DIR = "text"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".h5", ".msgpack", ".ot", ".onnx", ".pt", ".pth")

# SAT source key (after ``module.``) → vlseg key, first match wins; None drops the key.
_VISION_RULES = [
    (r"backbone\.(.*)", r"image_encoder.\1"),
    (r"projection_layer\.(\d+)\.(weight|bias)", r"fusion.key_proj.\1.\2"),
    (r"transformer_decoder\.layers\.(\d+)\.multihead_attn\.(.*)", r"fusion.layers.\1.cross_attn.\2"),
    (r"transformer_decoder\.layers\.(\d+)\.linear1\.(weight|bias)", r"fusion.layers.\1.ffn.0.\2"),
    (r"transformer_decoder\.layers\.(\d+)\.linear2\.(weight|bias)", r"fusion.layers.\1.ffn.3.\2"),
    (r"transformer_decoder\.layers\.(\d+)\.norm1\.(weight|bias)", None),
    (r"transformer_decoder\.layers\.(\d+)\.norm2\.(weight|bias)", r"fusion.layers.\1.norm_cross.\2"),
    (r"transformer_decoder\.layers\.(\d+)\.norm3\.(weight|bias)", r"fusion.layers.\1.norm_ffn.\2"),
    (r"transformer_decoder\.norm\.(weight|bias)", r"fusion.out_norm.\1"),
    (r"query_proj\.(.*)", r"fusion.query_proj.\1"),
    (r"mask_embed_proj\.(\d+)\.(weight|bias)", r"fusion.mask_head.\1.\2"),
    (r"mid_mask_embed_proj\.(\d+)\.(\d+)\.(weight|bias)", r"fusion.aux_heads.\1.\2.\3"),
]
_TEXT_DROPPED = (r"atlas_tower\..*", r"temperature", r"text_tower\.biolord\.embeddings\.position_ids")


def _rename(key: str, rules) -> str | None:
    for pattern, target in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return None if target is None else match.expand(target)
    return key  # unknown: map_state reports it as having no place in the network


def vision_key(key: str) -> str | None:
    """The vlseg key of a key of SAT's vision checkpoint (``module.`` prefix optional); None for a dropped one."""
    return _rename(key.removeprefix("module."), _VISION_RULES)


def model_state(path: Path) -> dict[str, torch.Tensor]:
    """``model_state_dict`` of a SAT checkpoint (optimizer state and step ignored)."""
    data = read_torch_file(path)
    state = data.get("model_state_dict") if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise VlsegError(f"{path}: not a SAT checkpoint (no 'model_state_dict')")
    return state


# ------------------------------------------------------------------------------------------------- sizes from weights


def _count(state: dict, pattern: str) -> int:
    found = {m.group(1) for k in state if (m := re.fullmatch(pattern, k))}
    return len(found)


def vision_sizes(state: dict[str, torch.Tensor], path: Path) -> dict:
    """The architecture settings a SAT vision state dict implies (keys without ``module.``)."""
    def shape(key: str) -> tuple:
        if key not in state:
            raise VlsegError(f"{path}: no {key!r}; not a SAT (Maskformer, UNET backbone) checkpoint")
        return tuple(state[key].shape)

    stages = _count(state, r"backbone\.encoder\.stages\.(\d+)\.0\.convs\.0\.conv\.weight")
    if stages == 0:
        shape("backbone.encoder.stages.0.0.convs.0.conv.weight")
    features = [shape(f"backbone.encoder.stages.{s}.0.convs.0.conv.weight")[0] for s in range(stages)]
    levels = _count(state, r"mid_mask_embed_proj\.(\d+)\.0\.weight")
    return {
        "in_channels": shape("backbone.encoder.stages.0.0.convs.0.conv.weight")[1],
        "features_per_stage": features,
        "n_conv_per_stage": _count(state, r"backbone\.encoder\.stages\.0\.0\.convs\.(\d+)\.conv\.weight"),
        "n_conv_per_stage_decoder": _count(state, r"backbone\.decoder\.stages\.0\.convs\.(\d+)\.conv\.weight"),
        "dim": shape("transformer_decoder.norm.weight")[0],
        "layers": _count(state, r"transformer_decoder\.layers\.(\d+)\.linear1\.weight"),
        "ffn_dim": shape("transformer_decoder.layers.0.linear1.weight")[0],
        "key_hidden": shape("projection_layer.0.weight")[0],
        "mask_hidden": shape("mask_embed_proj.0.weight")[0],
        "deep_supervision": levels,
        "aux_hidden": [shape(f"mid_mask_embed_proj.{i}.0.weight")[0] for i in range(levels)] or None,
    }


_ENCODER_KEYS = ("in_channels", "features_per_stage", "n_conv_per_stage", "n_conv_per_stage_decoder")
_FUSION_KEYS = ("dim", "layers", "ffn_dim", "key_hidden", "mask_hidden", "deep_supervision", "aux_hidden")


def fill_sizes(cfg: dict, sizes: dict, where: Path, other_widths: bool, family: str) -> dict:
    """The family's config with the checkpoint's sizes; a different size is refused unless ``other_widths``."""
    for section, keys in (("image_encoder", _ENCODER_KEYS), ("fusion", _FUSION_KEYS)):
        for key in keys:
            want, got = cfg[section].get(key), sizes[key]
            if key == "deep_supervision" and got == 0:  # a checkpoint saved without the heads: inference only
                cfg["fusion"]["aux_hidden"] = None
            elif not other_widths and _plain(want) != _plain(got):
                raise VlsegError(f"{where}: {section}.{key} is {got} in this checkpoint, {family} has {want} "
                                 f"(another SAT size: use its family, or --other-widths)")
            cfg[section][key] = got
    return cfg


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


# ---------------------------------------------------------------------------------------------------------- vision


# ------------------------------------------------------------------------------------------------------------ text


def text_key(key: str) -> str | None:
    """Where a key of SAT's text checkpoint goes: ``tower.<MPNet key>``, ``head.<key>``, or None (dropped)."""
    key = key.removeprefix("module.")
    if any(re.fullmatch(p, key) for p in _TEXT_DROPPED):
        return None
    if key.startswith("text_tower.biolord."):
        return "tower." + key.removeprefix("text_tower.biolord.")
    if key.startswith(("projection_layer.", "modality_embed.")):
        return "head." + key
    return key


def text_target_shapes(folder: Path, head: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """The shapes SAT's text checkpoint must fill: the tower the folder's config describes, and a head as wide as the
    checkpoint's (its width is SAT's choice, checked against the tower when the encoder is built)."""
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise VlsegError(f"{folder}: not a transformers folder ({str(exc).splitlines()[0]})") from None
    with torch.device("meta"):
        tower = AutoModel.from_config(config)
    shapes = {"tower." + k: tuple(v.shape) for k, v in tower.state_dict().items()}
    from vlseg.models.text.sat import HEAD_KEYS

    shapes.update({"head." + k: tuple(head[k].shape) for k in HEAD_KEYS if k in head})
    return shapes


def write_text_folder(biolord: Path, text_ckpt: Path, out: Path) -> None:
    """``out``: BioLORD's config and tokenizer files, the tower's weights from SAT's text checkpoint, and the head."""
    from safetensors.torch import save_file

    from vlseg.models.text.sat import HEAD_KEYS

    state = model_state(text_ckpt)
    head = {k.removeprefix("module."): v for k, v in state.items() if k.removeprefix("module.") in HEAD_KEYS}
    mapped = map_state(state, text_target_shapes(biolord, head), text_key, str(text_ckpt))
    out.mkdir(parents=True)
    for item in biolord.iterdir():
        if item.is_file() and item.suffix not in WEIGHT_SUFFIXES:
            shutil.copy2(item, out / item.name)
    tower = {k.removeprefix("tower."): v.contiguous() for k, v in mapped.items() if k.startswith("tower.")}
    save_file(tower, str(out / "model.safetensors"), metadata={"format": "pt"})
    save_file({k.removeprefix("head."): v.contiguous() for k, v in mapped.items() if k.startswith("head.")},
              str(out / HEAD_FILE))


# ---------------------------------------------------------------------------------------------------------- family


class _SatFamily(ReleasedFamily):
    # The code repository carries no licence file (checked at commit 5676be5); the weights' terms are those of their
    # model card, and BioLORD-2023-C's of its own.
    licence = ("not stated in github zhaoziheng/SAT (no licence file); see the model cards of huggingface.co/zzh99/SAT "
               "and FremyCompany/BioLORD-2023-C before use")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--checkpoint", required=True, type=Path, help="SAT's vision checkpoint (.pth)")
        parser.add_argument("--text-checkpoint", required=True, type=Path,
                            help="SAT's text-encoder checkpoint (.pth, the knowledge-enhanced BioLORD)")
        parser.add_argument("--biolord", required=True, type=Path,
                            help="the FremyCompany/BioLORD-2023-C transformers folder (tokenizer and config)")
        parser.add_argument("--modality", default="ct", help="modality embedding added to every prompt: ct, mri "
                            "(or t1, t2, flair, dwi, adc), us, pet; default ct (text_encoder.modality later)")
        parser.add_argument("--other-widths", action="store_true",
                            help="accept a SAT-architecture checkpoint whose widths differ from this family's")

    def convert(self, args: argparse.Namespace, out: Path) -> Path:
        from vlseg.config import fill_component_defaults, load_config
        from vlseg.models.text.sat import SatTextEncoder
        from vlseg.vocab.vocabulary import Vocabulary

        if not Path(args.biolord, "config.json").is_file():
            raise VlsegError(f"{args.biolord}: not a transformers folder (no config.json)")
        raw = model_state(args.checkpoint)  # mapped as stored, so that an error names the key as the file has it
        state = {k.removeprefix("module."): v for k, v in raw.items()}
        cfg = load_config(self.recipe)
        cfg = fill_sizes(cfg, vision_sizes(state, args.checkpoint), args.checkpoint, args.other_widths, self.name)
        cfg["text_encoder"].update({"path": TEXT_DIR, "weights": f"{TEXT_DIR}/{HEAD_FILE}", "modality": args.modality})
        cfg = fill_component_defaults(cfg)
        with tempfile.TemporaryDirectory(prefix="vlseg-sat-") as staging:
            text_dir = Path(staging) / TEXT_DIR
            write_text_folder(Path(args.biolord), Path(args.text_checkpoint), text_dir)
            text = SatTextEncoder(path=str(text_dir), weights=str(text_dir / HEAD_FILE), modality=args.modality)
            identity = {**text.identity(), "path": TEXT_DIR}
            net = build_vision_network(cfg, text.dim)
            weights = network_state(raw, net, vision_key, str(args.checkpoint))
            provenance = self.provenance(checkpoint=args.checkpoint, text_checkpoint=args.text_checkpoint,
                                         biolord=args.biolord)
            return write_model_dir(out, cfg, weights, Vocabulary.load("default").to_dict(), identity, provenance,
                                   {TEXT_DIR: text_dir})


@RELEASED.register("sat-nano")
class SatNano(_SatFamily):
    name = "sat-nano"
    origin = "https://huggingface.co/zzh99/SAT (SAT-Nano, vision backbone UNET)"
    description = "SAT-Nano: 6-stage plain U-Net (64…768) + 6-layer cross-attention query decoder, BioLORD prompts."


@RELEASED.register("sat-pro")
class SatPro(_SatFamily):
    name = "sat-pro"
    origin = "https://huggingface.co/zzh99/SAT (SAT-Pro, vision backbone UNET-L)"
    description = "SAT-Pro: 6-stage plain U-Net (128…1536, 3 convs) + 6-layer cross-attention query decoder."
