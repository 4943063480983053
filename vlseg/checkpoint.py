"""Checkpoint directories: everything ``Segmenter.from_pretrained`` needs, plus the state to resume training.

Layout of a run::

    checkpoints/<run>/config.yaml            resolved config of the run
    checkpoints/<run>/latest                 name of the newest complete checkpoint
    checkpoints/<run>/checkpoint-0000500/
        model.safetensors                    fp32 network weights (a trained text encoder included, a frozen one not),
                                             consolidated from DeepSpeed's partitions when it trained with ZeRO
        vlseg.json                           format, step, resolved config, vocabulary, text-encoder identity,
                                             how the run was distributed (strategy, ZeRO stage, processes)
        training_state/                      optimiser and RNG state (accelerate, or DeepSpeed's per-rank files),
                                             for --resume; `vlseg export` writes a copy without it

Every checkpoint is written under a temporary name and renamed when complete, so a crash never leaves a directory
that looks valid but is half written.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlseg.atomic import atomic_dir, atomic_path
from vlseg.errors import VlsegError

FORMAT = 1
META = "vlseg.json"
WEIGHTS = "model.safetensors"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:07d}"


def save_checkpoint(run_dir: Path, step: int, weights, meta: dict, save_training_state=None,
                    keep: int | None = None, is_main: bool = True, barrier=None) -> Path:
    """Write ``run_dir/checkpoint-<step>`` atomically; every process of a run calls this at the same step.

    ``save_training_state(folder)`` (all processes: DeepSpeed writes its optimiser partitions from each rank) adds the
    resumable state; ``weights`` is the network's state dict, or a function of the temporary checkpoint folder that
    returns it once the training state is on disk (DeepSpeed's weights are consolidated from there).  Only the main
    process writes the rest, renames the folder into place and prunes all but the last ``keep`` checkpoints.
    """
    run_dir = Path(run_dir)
    barrier = barrier or (lambda: None)
    final = run_dir / checkpoint_name(step)
    tmp = run_dir / f".tmp-{checkpoint_name(step)}"  # the same name on every process
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a process killed while writing
        tmp.mkdir(parents=True)
    barrier()
    if save_training_state is not None:
        save_training_state(tmp / "training_state")
    barrier()
    if is_main:
        write_weights(weights(tmp) if callable(weights) else weights, tmp / WEIGHTS)
        (tmp / META).write_text(json.dumps({"format": FORMAT, "step": step, "saved_at": time.time(), **meta},
                                           indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        with atomic_path(run_dir / "latest") as latest:
            latest.write_text(final.name + "\n")
        if keep:
            for old in list_checkpoints(run_dir)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def write_weights(state: dict, path: Path) -> None:
    """Save a state dict as safetensors, floating-point tensors in fp32 (16-bit training included).  A tensor held
    under two names (dynamic-network-architectures registers each conv and norm twice) is written once per name."""
    out, seen = {}, set()
    for k, v in state.items():
        v = (v.detach().float() if v.is_floating_point() else v.detach()).contiguous().cpu()
        if v.numel() and v.untyped_storage().data_ptr() in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    save_file(out, str(path))


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Delete temporary folders of checkpoints whose writing was interrupted."""
    for tmp in Path(run_dir).glob(".tmp-checkpoint-*"):
        shutil.rmtree(tmp, ignore_errors=True)


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
        # The newest complete checkpoint: a folder only gets its final name once complete, so whatever ``latest``
        # says (it is written just after the rename, and a kill can fall in between), the highest step is right.
        found = list_checkpoints(path)
        if found:
            return found[-1]
    raise VlsegError(f"{path}: not a vlseg checkpoint (no {META} and no checkpoint-* inside)")


def read_metadata(ckpt: Path) -> dict:
    """A checkpoint folder's validated ``vlseg.json``; every failure is a one-line VlsegError naming the file."""
    try:
        meta = json.loads((ckpt / META).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VlsegError(f"{ckpt / META}: unreadable checkpoint metadata ({exc})") from None
    for key in ("format", "config", "vocabulary", "text_encoder"):
        if key not in meta:
            raise VlsegError(f"{ckpt / META}: checkpoint metadata lacks {key!r}")
    if meta["format"] > FORMAT:
        raise VlsegError(f"{ckpt / META}: checkpoint format {meta['format']} is newer than this vlseg ({FORMAT})")
    return meta


def read_checkpoint(path: str | Path) -> tuple[Path, dict, dict]:
    """→ (checkpoint dir, metadata, state dict). Every failure is a one-line VlsegError naming the file."""
    ckpt = resolve_checkpoint(path)
    meta = read_metadata(ckpt)
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


# What a training checkpoint may hold besides tensors and plain containers: NumPy arrays and scalars (training logs,
# RNG states) and DeepSpeed's bookkeeping objects.  Anything else in a pickle is refused before it is unpickled.
ALLOWED_GLOBALS = (
    "numpy.ndarray", "numpy.dtype", "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    *(f"numpy.dtypes.{t}DType" for t in ("Float16", "Float32", "Float64", "Int8", "Int16", "Int32", "Int64",
                                         "UInt8", "UInt16", "UInt32", "UInt64", "Bool")),
    "deepspeed.utils.tensor_fragment.fragment_address", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum",
)


def _resolve(name: str):
    import importlib

    module, _, attr = name.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError):
        return None


def check_pickle(path: Path) -> list[str]:
    """The non-tensor globals a torch file references, or a one-line VlsegError when one of them is outside
    ``ALLOWED_GLOBALS`` (unpickling it could run arbitrary code)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:  # noqa: BLE001 - any reason it cannot be inspected is a reason not to load it
        raise VlsegError(f"{path}: not a readable torch file ({str(exc).strip().splitlines()[0][:200]})") from None
    refused = [g for g in found if g not in ALLOWED_GLOBALS]
    if refused:
        raise VlsegError(f"{path}: refused, unpickling it would need {refused[0]} (arbitrary code); vlseg reads "
                         f"torch files with weights_only=True and an allow-list of data types only")
    return found


def load_torch_file(path: Path, mmap: bool = False):
    """A torch file loaded with ``weights_only=True``, the allow-listed globals it references permitted (checked
    first by ``check_pickle``); onto the CPU, memory-mapped when asked (and the file's format allows)."""
    # NumPy's dtype classes are reached through numpy.dtype without being listed: allowed whenever NumPy is
    found = check_pickle(path)
    names = set(found) | ({g for g in ALLOWED_GLOBALS if g.startswith("numpy.")} if found else set())
    allowed = [obj for obj in map(_resolve, sorted(names)) if obj is not None]
    with torch.serialization.safe_globals(allowed):
        if mmap:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
        return torch.load(path, map_location="cpu", weights_only=True)


# accelerate saves a DeepSpeed engine under this tag inside ``training_state/``.
DEEPSPEED_TAG = "pytorch_model"


def _stage0_fp32_weights(model_states: Path) -> dict:
    """Without ZeRO, DeepSpeed's 16-bit optimiser keeps the fp32 master copies in its own state (``fp32_groups``, in
    the order of the trainable parameters); DeepSpeed's consolidation script reads only ZeRO checkpoints."""
    saved = load_torch_file(model_states)
    state = {k: v.float() if v.is_floating_point() else v for k, v in saved["module"].items()}
    masters = [t for group in (saved.get("optimizer") or {}).get("fp32_groups") or [] for t in group]
    if masters:
        frozen = set(saved.get("frozen_param_shapes") or {})
        buffers = set(saved.get("buffer_names") or [])
        trainable = [k for k in state if k not in buffers and k not in frozen]
        if len(trainable) != len(masters) or any(state[k].shape != t.shape for k, t in zip(trainable, masters)):
            raise VlsegError(f"{model_states}: cannot match DeepSpeed's fp32 master weights to the parameters")
        state.update({k: t.float() for k, t in zip(trainable, masters)})
    return state


def deepspeed_fp32_weights(training_state: Path) -> dict:
    """One fp32 state dict from a DeepSpeed checkpoint (ZeRO partitions and 16-bit optimisers included), through
    DeepSpeed's own consolidation."""
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = Path(training_state) / DEEPSPEED_TAG
    for part in sorted(folder.glob("*.pt")):  # DeepSpeed unpickles them itself: each is checked first
        check_pickle(part)
    if not list(folder.glob("*zero_pp_rank_*")):  # no ZeRO partitions: stage 0
        return _stage0_fp32_weights(folder / "mp_rank_00_model_states.pt")

    chatter = io.StringIO()  # it narrates every file it reads; an exception still says what went wrong
    with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        return get_fp32_state_dict_from_zero_checkpoint(str(training_state), tag=DEEPSPEED_TAG)


def deepspeed_to_universal(training_state: Path, out: Path) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format, which loads on any number of processes and ZeRO
    stage; accelerate's own files (RNG states) are copied beside it.  DeepSpeed's converter runs as a command."""
    training_state, out = Path(training_state), Path(out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
           str(training_state / DEEPSPEED_TAG), "--output_folder", str(out / DEEPSPEED_TAG), "--inject_missing_state",
           "--num_extract_workers", "1", "--num_merge_workers", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise VlsegError(f"{training_state}: DeepSpeed could not convert this checkpoint to its universal format "
                         f"({last})")
    for item in training_state.iterdir():
        if item.is_file() and item.name != "latest":
            shutil.copy2(item, out / item.name)
    return out


def export_checkpoint(source: str | Path, out: str | Path) -> Path:
    """Write a release copy of a checkpoint: its consolidated fp32 weights and metadata, without the training state.
    A DeepSpeed checkpoint's weights are consolidated again from its partitions (so a checkpoint whose
    ``model.safetensors`` is missing or stale is repaired)."""
    source = resolve_checkpoint(source)
    meta = read_metadata(source)
    strategy = (meta.get("distributed") or {}).get("strategy", "ddp")
    if strategy == "deepspeed" and (source / "training_state" / DEEPSPEED_TAG).is_dir():
        state = deepspeed_fp32_weights(source / "training_state")
    else:
        _, _, state = read_checkpoint(source)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise VlsegError(f"{out}: already exists and is not empty")
    with atomic_dir(out) as tmp:
        write_weights(state, tmp / WEIGHTS)
        (tmp / META).write_text(json.dumps(meta, indent=1))
        if (source / "calibration.json").is_file():  # the presence threshold vlseg calibrate chose travels with it
            (tmp / "calibration.json").write_bytes((source / "calibration.json").read_bytes())
    return out
