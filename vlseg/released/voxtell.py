"""VoxTell (MIC-DKFZ): an nnU-Net model folder (``plans.json`` + ``fold_0/checkpoint_final.pth``) and its prompt
embeddings → a vlseg model: ``nnunet_resenc`` + ``prompt_decoder`` + an ``embedding_bank`` (backed by the
Qwen3-Embedding folder when one is given).

The architecture's widths are read from the weights themselves (text width, query width, maps per prompt, layers,
memory grid), so the released model and smaller ones built with VoxTell's code import alike; the attention head count
(8) is not visible in the weights and is VoxTell's fixed value.  Quirks handled here:

* nnU-Net's decoder holds the encoder again (``decoder.encoder.*``): both copies must be equal and map to one;
* VoxTell's pre-norm transformer layers build a self-attention block and its norm (``self_attn``, ``norm1``) that
  their forward never calls: dropped, and said so;
* ``torch.compile``'s ``_orig_mod.`` and DDP's ``module.`` prefixes are removed;
* nnU-Net reads NIfTIs with the axes reversed, so the model is set to ``data.axis_order: zyx`` and the patch size from
  the plans is reversed into vlseg's [X, Y, Z] ``crop_size``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from vlseg.config import load_config
from vlseg.errors import VlsegError
from vlseg.released.base import RELEASED, ReleasedFamily, network_state, read_torch_file, write_model_dir

INSTRUCTION = ("Instruct: Given an anatomical term query, retrieve the precise anatomical entity and location it "
               "represents\nQuery: {}")
EXPECTED_OPS = {"conv_op": "Conv3d", "norm_op": "InstanceNorm3d", "nonlin": "LeakyReLU"}
ATTENTION_HEADS = 8  # VoxTellModel.TRANSFORMER_NUM_HEADS: not recoverable from the weights


def rename(key: str) -> str | None:
    """VoxTell's state-dict key → vlseg's (None: deliberately dropped)."""
    key = re.sub(r"^(module\.|_orig_mod\.)+", "", key)
    if key.startswith("encoder."):
        return "image_encoder." + key
    if key.startswith("decoder.encoder."):
        return "image_encoder." + key[len("decoder."):]
    for old, new in (("decoder.", "fusion."), ("project_bottleneck_embed.", "fusion.memory_proj."),
                     ("project_text_embed.", "fusion.text_proj."),
                     ("project_to_decoder_channels.", "fusion.stage_proj."),
                     ("transformer_decoder.norm.", "fusion.norm.")):
        if key.startswith(old):
            return new + key[len(old):]
    if key == "pos_embed":
        return "fusion.pos_embed"
    layer = re.match(r"transformer_decoder\.layers\.(\d+)\.([a-z_0-9]+)\.(.+)$", key)
    if layer:
        index, part, rest = layer.groups()
        if part in ("self_attn", "norm1"):  # built by VoxTell's layer, never used by its pre-norm forward
            return None
        parts = {"multihead_attn": "cross_attn", "linear1": "ffn.0", "linear2": "ffn.3", "norm2": "norm_cross",
                 "norm3": "norm_ffn"}
        if part in parts:
            return f"fusion.layers.{index}.{parts[part]}.{rest}"
    return key  # anything else is reported by map_state as having no place


def read_plans(model_dir: Path) -> tuple[dict, list[int]]:
    """The 3d_fullres architecture kwargs and patch size, checked to be the operators vlseg builds."""
    path = model_dir / "plans.json"
    try:
        plans = json.loads(path.read_text())
        config = plans["configurations"]["3d_fullres"]
        arch, patch = dict(config["architecture"]["arch_kwargs"]), [int(v) for v in config["patch_size"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise VlsegError(f"{path}: not an nnU-Net plans file with a 3d_fullres configuration ({exc})") from None
    for key, name in EXPECTED_OPS.items():
        if not str(arch.get(key, "")).endswith(name):
            raise VlsegError(f"{path}: {key} is {arch.get(key)!r}; VoxTell models use {name}")
    return arch, patch


def network_weights(model_dir: Path) -> dict:
    path = model_dir / "fold_0" / "checkpoint_final.pth"
    checkpoint = read_torch_file(path)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise VlsegError(f"{path}: no 'network_weights' inside (not an nnU-Net checkpoint)")
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in checkpoint["network_weights"].items()}


def fusion_settings(weights: dict, features: list[int], strides: list, patch: list[int], where: str) -> dict:
    """The prompt decoder's widths, read off the weights' shapes."""
    def shape(key: str) -> tuple:
        if key not in weights:
            raise VlsegError(f"{where}: key {key!r} missing: not a VoxTell network")
        return tuple(weights[key].shape)

    query, memory_channels = shape("project_bottleneck_embed.0.weight")
    stages = sorted({int(m.group(1)) for k in weights if (m := re.match(r"project_to_decoder_channels\.(\d+)\.", k))})
    layers = sorted({int(m.group(1)) for k in weights if (m := re.match(r"transformer_decoder\.layers\.(\d+)\.", k))})
    tokens = shape("pos_embed")[0]
    memory_stage = memory_grid = None
    for s, channels in enumerate(features):
        grid = [p // math.prod(int(st[a]) if isinstance(st, (list, tuple)) else int(st) for st in strides[:s + 1])
                for a, p in enumerate(patch)]
        if channels == memory_channels and math.prod(grid) == tokens:
            memory_stage, memory_grid = s, grid
    if memory_stage is None:
        raise VlsegError(f"{where}: no encoder stage has {memory_channels} channels and {tokens} tokens per window")
    channels = shape(f"project_to_decoder_channels.{stages[-1]}.2.weight")[0] // features[stages[-1]] \
        if len(stages) > 1 else 1
    return {"query_dim": query, "heads": ATTENTION_HEADS, "layers": len(layers),
            "ffn_dim": shape("transformer_decoder.layers.0.linear1.weight")[0],
            "text_hidden": shape("project_text_embed.0.weight")[0],
            "stage_hidden": shape("project_to_decoder_channels.0.0.weight")[0],
            "memory_stage": memory_stage, "memory_grid": memory_grid, "fused_stages": len(stages),
            "channels_per_prompt": channels}


@RELEASED.register("voxtell")
class VoxTell(ReleasedFamily):
    name = "voxtell"
    licence = "CC-BY-NC-SA-4.0 (weights; non-commercial use, share derivatives alike, attribute MIC-DKFZ)"
    origin = "https://huggingface.co/mrokuss/VoxTell (code: https://github.com/MIC-DKFZ/VoxTell)"
    description = ("VoxTell: free-text prompts (words to clinical sentences) on CT, MR and PET; nnU-Net ResEnc + "
                   "prompt-conditioned decoder.")

    def add_arguments(self, parser) -> None:
        parser.add_argument("--model-dir", required=True,
                            help="the VoxTell model folder: plans.json and fold_0/checkpoint_final.pth")
        parser.add_argument("--bank", help="VoxTell's text_embeddings.npz (precomputed prompts; copied into the model)")
        parser.add_argument("--text-model", help="local Qwen3-Embedding-4B transformers folder, for prompts outside "
                                                 "the bank (referenced, not copied)")

    def build_config(self, arch: dict, patch: list[int], weights: dict, text: dict, where: str) -> dict:
        features = [int(v) for v in arch["features_per_stage"]]
        fusion = fusion_settings(weights, features, arch["strides"], patch, where)
        fusion["n_conv_per_stage"] = [int(v) for v in arch["n_conv_per_stage_decoder"]]
        cfg = load_config(self.recipe)
        cfg["image_encoder"].update(
            features_per_stage=features, strides=[list(s) if isinstance(s, (list, tuple)) else s
                                                  for s in arch["strides"]],
            kernel_sizes=[list(k) if isinstance(k, (list, tuple)) else k for k in arch["kernel_sizes"]],
            n_blocks_per_stage=[int(v) for v in arch["n_blocks_per_stage"]], conv_bias=bool(arch["conv_bias"]),
            norm_eps=float((arch.get("norm_op_kwargs") or {}).get("eps", 1e-5)),
            stem_channels=arch.get("stem_channels"))
        cfg["fusion"].update(fusion)
        cfg["text_encoder"] = text
        cfg["data"]["crop_size"] = list(reversed(patch))  # nnU-Net's axes are vlseg's reversed
        return cfg

    def text_section(self, args) -> tuple[dict, dict]:
        """The text encoder's config (with the bank's path inside the model folder) and the files to copy."""
        backbone = None
        if args.text_model:
            backbone = {"name": "hf", "path": str(Path(args.text_model).expanduser().resolve()), "pooling": "last",
                        "normalize": False, "max_length": 512, "template": INSTRUCTION, "padding_side": "left",
                        "lowercase": True}
        if args.bank:
            return ({"name": "embedding_bank", "bank": "text/text_embeddings.npz", "backbone": backbone,
                     "lowercase": True}, {"text/text_embeddings.npz": Path(args.bank)})
        if backbone is None:
            raise VlsegError("voxtell: give --bank (VoxTell's text_embeddings.npz), --text-model (a Qwen3-Embedding "
                             "folder) or both; the model cannot read prompts otherwise")
        return backbone, {}

    def convert(self, args, out: Path) -> Path:
        from vlseg.models.network import build_network
        from vlseg.vocab.vocabulary import Vocabulary

        model_dir = Path(args.model_dir).expanduser()
        where = str(model_dir / "fold_0" / "checkpoint_final.pth")
        arch, patch = read_plans(model_dir)
        weights = network_weights(model_dir)
        text, files = self.text_section(args)
        cfg = self.build_config(arch, patch, weights, text, where)  # (checks the weights are a VoxTell network's)
        text_dim = int(weights["project_text_embed.0.weight"].shape[1])
        vocabulary = Vocabulary.load(cfg["vocabulary"])
        build_cfg = {**cfg, "text_encoder": {**text, "bank": str(args.bank)} if args.bank else text}
        net, text_encoder = build_network(build_cfg, vocabulary)
        if text_encoder.dim != text_dim:
            raise VlsegError(f"the text encoder gives {text_encoder.dim}-d embeddings, the VoxTell network reads "
                             f"{text_dim}-d ones")
        state = network_state(weights, net, rename, where)
        identity = text_encoder.identity()
        provenance = self.provenance(plans=model_dir / "plans.json", checkpoint=Path(where),
                                     bank=Path(args.bank) if args.bank else None)
        if args.text_model:
            provenance["text_model"] = str(args.text_model)
        return write_model_dir(out, cfg, state, vocabulary.to_dict(), identity, provenance, files)
