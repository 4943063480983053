"""What every importer of a released model shares: safe reading of ``.pth`` files, the strict key mapping, the family
registry and the writer of an ordinary vlseg model directory.

An imported model is a vlseg checkpoint like any other (``model.safetensors`` + ``vlseg.json``), so prediction,
evaluation, calibration and fine-tuning use it unchanged.  Its ``vlseg.json`` adds ``provenance``: the family, where
the weights come from, their licence and the SHA-256 of every file the import read.

Strictness is the point: every key of the released file is mapped to a vlseg key or deliberately dropped by a rule
the family states, every vlseg key is filled, every shape is equal.  The first key that does not fit stops the import
with its name, instead of the "load what fits" default of the originals, which yields a silently half-random model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping

import torch

from vlseg.checkpoint import FORMAT, META, load_torch_file, write_weights
from vlseg.errors import VlsegError
from vlseg.registry import Registry

RELEASED = Registry("released model family", "vlseg.released")


def read_torch_file(path: str | Path) -> dict:
    """A ``.pth``/``.pt`` file read with ``weights_only=True`` onto the CPU (files saved from a GPU included),
    memory-mapped where its format allows (a multi-GB training checkpoint is not read whole).

    A file whose unpickling would run arbitrary code (a pickled class, a function) is refused: weights never need it;
    NumPy data and DeepSpeed's bookkeeping are allowed (``vlseg.checkpoint.ALLOWED_GLOBALS``).
    """
    path = Path(path)
    if not path.is_file():
        raise VlsegError(f"{path}: file not found")
    try:
        return load_torch_file(path, mmap=True)
    except pickle.UnpicklingError as exc:
        first = (str(exc).strip().splitlines() or ["unsafe object"])[0]
        raise VlsegError(f"{path}: refused, unpickling it would need arbitrary code ({first[:200]}); vlseg reads "
                         f"weights with torch.load(weights_only=True) only") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise VlsegError(f"{path}: not a readable torch file ({str(exc).strip().splitlines()[0][:200]})") from None


def map_state(source: Mapping[str, torch.Tensor], target_shapes: Mapping[str, tuple],
              rename: Callable[[str], str | None], where: str) -> dict[str, torch.Tensor]:
    """Map a released state dict onto vlseg's keys, strictly.

    ``rename(key)`` gives the vlseg key of a source key, or None for a key the family drops on purpose.  Several
    source keys may land on one vlseg key only when they hold equal tensors (dynamic-network-architectures registers
    each conv and norm twice, and nnU-Net's decoders hold their encoder again).  Any source key mapped to a key vlseg
    does not have, any vlseg key left empty, any shape difference: one ``VlsegError`` naming the first such key.
    """
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    for key, value in source.items():
        if not isinstance(value, torch.Tensor):
            raise VlsegError(f"{where}: entry {key!r} is a {type(value).__name__}, not a tensor")
        new = rename(key)
        if new is None:
            continue
        if new not in target_shapes:
            raise VlsegError(f"{where}: key {key!r} (as {new!r}) has no place in the vlseg network")
        if tuple(value.shape) != tuple(target_shapes[new]):
            raise VlsegError(f"{where}: key {key!r} has shape {tuple(value.shape)}, the vlseg network's {new!r} has "
                             f"{tuple(target_shapes[new])}")
        if new in out:
            if not torch.equal(out[new], value):
                raise VlsegError(f"{where}: keys {origin[new]!r} and {key!r} both map to {new!r} but differ")
            continue
        out[new], origin[new] = value, key
    missing = [k for k in target_shapes if k not in out]
    if missing:
        raise VlsegError(f"{where}: no weights for the vlseg network's {missing[0]!r} "
                         f"({len(missing)} key{'s' if len(missing) > 1 else ''} missing)")
    return out


def network_state(source: Mapping[str, torch.Tensor], net: torch.nn.Module, rename: Callable[[str], str | None],
                  where: str) -> dict[str, torch.Tensor]:
    """A released state dict mapped strictly onto ``net`` (a ``VLSegNet``); the network's prompt standardisation,
    which the originals do not have, set to the identity (prompts enter as their text encoder gives them)."""
    fixed = {"prompt_center": torch.zeros_like(net.prompt_center), "prompt_scale": torch.ones_like(net.prompt_scale)}
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items() if k not in fixed}
    return {**map_state(source, shapes, rename, where), **fixed}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sources(**files) -> dict:
    """Provenance entries ``{role: {"file": name, "sha256": ...}}`` for the files an import read (folders: every file
    inside, hashed together)."""
    out = {}
    for role, path in files.items():
        if path is None:
            continue
        path = Path(path)
        if path.is_dir():
            digest = hashlib.sha256()
            for item in sorted(p for p in path.rglob("*") if p.is_file()):
                digest.update(str(item.relative_to(path)).encode())
                digest.update(file_sha256(item).encode())
            out[role] = {"folder": path.name, "sha256": digest.hexdigest()}
        else:
            out[role] = {"file": path.name, "sha256": file_sha256(path)}
    return out


class ReleasedFamily:
    """One released model family.  Subclasses set ``licence``, ``origin`` and ``description``, declare the files the
    user downloaded (``add_arguments``) and turn them into a model directory (``convert``)."""

    name: str = ""
    licence: str = ""
    origin: str = ""
    description: str = ""

    @property
    def recipe(self) -> str:
        """The family's own settings: the shipped config ``configs/released/<family>.yaml``."""
        return f"released/{self.name}"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        raise NotImplementedError

    def convert(self, args: argparse.Namespace, out: Path) -> Path:
        raise NotImplementedError

    def provenance(self, **files) -> dict:
        return {"family": self.name, "origin": self.origin, "licence": self.licence, "imported_at": time.time(),
                "sources": sources(**files)}


def write_model_dir(out: str | Path, config: dict, state: Mapping[str, torch.Tensor], vocabulary: dict,
                    text_identity: dict, provenance: dict, extra_files: Mapping[str, object] | None = None) -> Path:
    """Write an imported model as a vlseg checkpoint directory, atomically: ``model.safetensors``, ``vlseg.json``
    (config, vocabulary, text-encoder identity, provenance), ``config.yaml`` and ``extra_files`` (``{name: source path,
    bytes, or a callable writing into the given path}``: the text tower's files, an embedding bank)."""
    from vlseg.atomic import atomic_dir
    from vlseg.config import save_config

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise VlsegError(f"{out}: already exists and is not empty")
    with atomic_dir(out) as tmp:
        for name, content in (extra_files or {}).items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if callable(content):
                content(target)
            elif isinstance(content, (bytes, bytearray)):
                target.write_bytes(content)
            elif Path(content).is_dir():
                shutil.copytree(content, target)
            else:
                shutil.copy2(content, target)
        write_weights(dict(state), tmp / "model.safetensors")
        meta = {"format": FORMAT, "step": 0, "saved_at": time.time(), "config": config, "vocabulary": vocabulary,
                "text_encoder": text_identity, "provenance": provenance}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        save_config(config, tmp / "config.yaml")
    return out
