"""Experiment configuration: code defaults ← YAML file ← ``key=value`` command-line overrides.

A config is a plain nested dict.  Every run writes the fully resolved dict next to its outputs, and every checkpoint
carries it, so a run can be rebuilt from its directory alone.  Code reads it through typed views of its sections
(``DataSection.from_config(cfg).crop_size``), which convert each setting once and say in one line which one is bad.

A component section (text encoder, image encoder, fusion, loss) names its component; the component's other settings
and their defaults are its constructor's arguments, filled in when a config is resolved, so a saved config lists
every setting while the defaults are written once, in the component's signature.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import yaml

from vlseg.errors import VlsegError
from vlseg.registry import FUSIONS, IMAGE_ENCODERS, LOSSES, TEXT_ENCODERS
from vlseg.transforms.intensity import CT_WINDOW

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
        "ct_window": list(CT_WINDOW),
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
        "intensity": "vlseg",  # normalisation scheme (vlseg.transforms.intensity): vlseg, window_unit, ...
        # inference on the box of voxels != 0 ("nonzero": nnU-Net, VoxTell) or > 0 ("positive": SAT); None: all
        "crop_foreground": None,
        "axis_order": "xyz",  # the array axes the network sees: xyz (RAS, as MONAI) or zyx (as nnU-Net)
        "synthesis": {  # synthetic lesions inside an annotated organ, learnt as their own class (vlseg.data.synth)
            "enabled": False,
            "organ": "liver",
            "target": "liver tumor",
            "datasets": [],  # empty: every CT dataset annotating the organ but not the target
            "lesion": {},  # LesionConfig fields
        },
    },
    # Component sections: the name only; the rest comes from the component's constructor (fill_component_defaults).
    "text_encoder": {"name": "hf"},  # by default the all-MiniLM-L6-v2 tower a pip package ships
    "image_encoder": {"name": "unet3d"},
    "fusion": {"name": "query_decoder"},
    "loss": {"name": "masked"},
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
        "prompt_chunk": 16,  # prompts decoded together from one window's features
        "min_prompt_similarity": 0.3,  # free text less similar than this to every class is refused (bundled MiniLM)
        "interpret_prompts": True,  # map prompts onto the vocabulary first; false: the text encoder reads them as typed
        # How an understood prompt is embedded: none (a class by its name, free text as typed), synonyms (a class by
        # its name-and-synonym ensemble), nearest (also free text whose nearest class is confident, as that class)
        "prompt_ensemble": "none",
        # When free text is asked as its nearest class (``nearest``), measured with the bundled MiniLM on the 513 held-
        # out paraphrases of vlseg's 502 classes, each against all classes' synonym ensembles
        # (benchmarks/prompt_handling.py): at similarity >= 0.8 and margin >= 0.03 it fires for 183 (36%) and picks the
        # paraphrase's own class for 173 (95%); at 0.7 and 0.02, 280 and 246 (88%); at 0.85 and 0.03, 128 and 127 (99%).
        # Its mistakes are mostly a part asked as its whole ("first thoracic vertebra" as the thoracic spine).  (Ranked
        # by class name alone, the nearest class is right for 62% of the free text, by synonym ensemble for 68%.)
        "nearest_min_similarity": 0.8,  # nearest: the class's cosine at least this (bundled MiniLM)
        "nearest_margin": 0.03,  # ... and this much above the next class's
        "blend": "probability",  # windows blended as probabilities, or as logits (then sigmoid)
        "pad_mode": "replicate",  # a side shorter than the window is padded by edge replication, or with zeros
        "window_placement": "monai",  # window starts as MONAI places them, or nnU-Net's evenly spaced ones
        "largest_component": False,  # keep each mask's largest connected component only
    },
}


# Sections holding a registered component: their keys are that component's constructor arguments, so choosing another
# component (a different ``name``) drops the settings that belonged to the previous one.
COMPONENTS = {"text_encoder": TEXT_ENCODERS, "image_encoder": IMAGE_ENCODERS, "fusion": FUSIONS, "loss": LOSSES}
COMPONENT_SECTIONS = tuple(COMPONENTS)
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
    return fill_component_defaults(cfg)


def fill_component_defaults(cfg: dict) -> dict:
    """``cfg`` with each component section completed by its component's constructor defaults (settings given keep
    their values; an unknown component name is a one-line error)."""
    cfg = copy.deepcopy(cfg)
    for section, registry in COMPONENTS.items():
        given = cfg.get(section)
        if isinstance(given, dict) and given.get("name") is not None:
            cfg[section] = {"name": given["name"], **registry.defaults(str(given["name"])), **given}
    return cfg


YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's safe loader, ~8x faster, where installed


def load_yaml(path: str | Path, what: str = "config file") -> dict:
    """A YAML mapping from a file; a missing file, bad YAML or a non-mapping is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise VlsegError(f"{path}: {what} not found")
    try:
        data = yaml.load(path.read_text(), Loader=YAML_LOADER) or {}
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


# ------------------------------------------------------------------------------------------------------ typed views


def _typed(value, hint, where: str):
    """``value`` read as ``hint`` (int, float, bool, str, dict, ``tuple[T, ...]``, ``T | None`` or Any), else a
    one-line error naming the setting."""
    args = typing.get_args(hint)
    if hint is Any or (value is None and type(None) in args):
        return value
    if type(None) in args:
        (hint,) = [a for a in args if a is not type(None)]
        return _typed(value, hint, where)
    kind = typing.get_origin(hint) or hint
    try:
        if kind is tuple:
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return tuple(args[0](v) for v in value)  # tuples of numbers or strings
        if kind is dict:
            return dict(value or {})
        return kind(value)
    except (TypeError, ValueError):
        wanted = f"a list of {args[0].__name__}" if kind is tuple else kind.__name__
        raise VlsegError(f"{where}={value!r}: expected {wanted}") from None


def _view(cls, cfg: dict, name: str):
    """The typed view ``cls`` of section ``name``; settings a stored config lacks (written before they existed)
    take their defaults."""
    section = deep_merge(DEFAULTS[name], cfg.get(name) or {})
    hints = typing.get_type_hints(cls)
    return cls(**{f.name: _typed(section[f.name], hints[f.name], f"{name}.{f.name}") for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class DataSection:
    """``data``: the corpus, the spacing scans are brought to, and how training crops are drawn (see DEFAULTS)."""

    manifest: str
    train_split: str
    val_split: str
    crop_size: tuple[int, ...]
    foreground_prob: float
    max_queries: int
    synonyms: bool
    ct_window: tuple[float, ...]
    target_spacing: Any  # None, "auto" or [x, y, z] mm: checked by the spacing plan (vlseg.prepare.cache)
    spacing_per_dataset: dict
    inference_spacing: tuple[float, ...] | None
    classes: tuple[str, ...] | None
    cache: str | None
    preprocess_workers: int
    num_workers: int
    dataset_temperature: float
    dataset_weights: dict
    class_weights: dict
    negative_fraction: float
    zoom_range: tuple[float, ...]
    intensity_scale: tuple[float, ...]
    intensity_shift: float
    thin_prob: float
    thin_slices: tuple[int, ...]
    intensity: str
    crop_foreground: str | None
    axis_order: str
    synthesis: dict  # its lesion parameters are free-form: vlseg.transforms.lesions.LesionConfig reads them

    @classmethod
    def from_config(cls, cfg: dict) -> DataSection:
        return _view(cls, cfg, "data")

    def working_spacing(self, case_spacings=None) -> list[float] | None:
        """The spacing (mm) predictions are made at, one rule for training and inference: ``inference_spacing`` when
        set; else a fixed ``target_spacing`` (None: each scan's own grid) when no dataset has a spacing of its own;
        else — training resampled per dataset — the median of the training cases' spacings ``case_spacings``.
        Without them (inference, from a config training did not complete) a fixed ``target_spacing`` or None."""
        if self.inference_spacing:
            return list(self.inference_spacing)
        target = self.target_spacing
        fixed = [float(v) for v in target] if isinstance(target, (list, tuple)) else None
        if case_spacings is None or (not self.spacing_per_dataset and (target is None or fixed is not None)):
            return fixed
        return [float(v) for v in np.median(np.array(case_spacings, dtype=float), axis=0)]


@dataclass(frozen=True)
class TrainSection:
    """``train``: the schedule, the optimiser, precision and distribution, logging and checkpoints (see DEFAULTS)."""

    steps: int
    batch_size: int
    grad_accum: int
    deepspeed: str | None
    activation_checkpointing: bool
    init_from: str | None
    lr: float
    weight_decay: float
    warmup_steps: int
    min_lr_ratio: float
    grad_clip: float
    mixed_precision: Any  # auto, no, bf16, fp16 (YAML reads a bare `no` as false): vlseg.train.distributed
    log_every: int
    checkpoint_every: int
    keep_checkpoints: int | None
    threads: int | None

    @classmethod
    def from_config(cls, cfg: dict) -> TrainSection:
        return _view(cls, cfg, "train")


@dataclass(frozen=True)
class InferenceSection:
    """``inference``: sliding windows, mask and presence thresholds, how prompts are read (see DEFAULTS)."""

    overlap: float
    sw_batch_size: int
    threshold: float
    presence_threshold: float
    prompt_chunk: int
    min_prompt_similarity: float
    interpret_prompts: bool
    prompt_ensemble: str
    nearest_min_similarity: float
    nearest_margin: float
    blend: str
    pad_mode: str
    window_placement: str
    largest_component: bool

    @classmethod
    def from_config(cls, cfg: dict) -> InferenceSection:
        return _view(cls, cfg, "inference")
