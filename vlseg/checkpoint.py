"""Checkpoint directories: everything ``Segmenter.from_pretrained`` needs, plus the state to resume training.

Layout of a run::

    checkpoints/<run>/config.yaml            resolved config of the run
    checkpoints/<run>/latest                 name of the newest complete checkpoint
    checkpoints/<run>/checkpoint-0000500/
        model.safetensors                    network weights (a trained text encoder included, a frozen one not)
        vlseg.json                           format, step, resolved config, vocabulary, text-encoder identity
        training_state/                      optimiser, scheduler and RNG state (accelerate), for --resume

Every checkpoint is written under a temporary name and renamed when complete, so a crash never leaves a directory
that looks valid but is half written.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlseg.atomic import atomic_path
from vlseg.errors import VlsegError

FORMAT = 1
META = "vlseg.json"
WEIGHTS = "model.safetensors"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:07d}"


def save_checkpoint(run_dir: Path, step: int, state_dict: dict, meta: dict, save_training_state=None,
                    keep: int | None = None) -> Path:
    """Write ``run_dir/checkpoint-<step>`` atomically. ``save_training_state(folder)`` adds resumable state."""
    run_dir = Path(run_dir)
    final = run_dir / checkpoint_name(step)
    tmp = run_dir / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, str(tmp / WEIGHTS))
    (tmp / META).write_text(json.dumps({"format": FORMAT, "step": step, "saved_at": time.time(), **meta}, indent=1))
    if save_training_state is not None:
        save_training_state(tmp / "training_state")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    with atomic_path(run_dir / "latest") as tmp:
        tmp.write_text(final.name + "\n")
    if keep:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    return sorted(p for p in Path(run_dir).glob("checkpoint-*") if (p / META).is_file())


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its ``latest`` checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise VlsegError(f"{path}: checkpoint not found")
    if (path / META).is_file():
        return path
    if path.is_dir():
        latest = path / "latest"
        if latest.is_file():
            candidate = path / latest.read_text().strip()
            if (candidate / META).is_file():
                return candidate
        found = list_checkpoints(path)
        if found:
            return found[-1]
    raise VlsegError(f"{path}: not a vlseg checkpoint (no {META} and no checkpoint-* inside)")


def read_checkpoint(path: str | Path) -> tuple[Path, dict, dict]:
    """→ (checkpoint dir, metadata, state dict). Every failure is a one-line VlsegError naming the file."""
    ckpt = resolve_checkpoint(path)
    try:
        meta = json.loads((ckpt / META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VlsegError(f"{ckpt / META}: unreadable checkpoint metadata ({exc})") from None
    for key in ("format", "config", "vocabulary", "text_encoder"):
        if key not in meta:
            raise VlsegError(f"{ckpt / META}: checkpoint metadata lacks {key!r}")
    if meta["format"] > FORMAT:
        raise VlsegError(f"{ckpt / META}: checkpoint format {meta['format']} is newer than this vlseg ({FORMAT})")
    if not (ckpt / WEIGHTS).is_file():
        raise VlsegError(f"{ckpt / WEIGHTS}: weights file missing")
    try:
        state = load_file(str(ckpt / WEIGHTS))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise VlsegError(f"{ckpt / WEIGHTS}: unreadable weights ({str(exc).splitlines()[0]})") from None
    return ckpt, meta, state


def load_network_state(net: torch.nn.Module, state: dict, source: Path) -> None:
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise VlsegError(f"{source}: weights do not match the configured network "
                         f"(missing {len(missing)}, unexpected {len(unexpected)}, e.g. {(missing or unexpected)[0]})")
