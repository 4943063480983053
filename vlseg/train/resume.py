"""Where a training run starts and what it leaves to start from: the resume checks, the weights and training state a
run continues from, and the checkpoints it writes."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from vlseg.checkpoint import (
    deepspeed_fp32_weights,
    deepspeed_to_universal,
    list_checkpoints,
    load_network_state,
    read_checkpoint,
    remove_partial_checkpoints,
    save_checkpoint,
)
from vlseg.config import TrainSection, save_config
from vlseg.errors import VlsegError
from vlseg.train.distributed import all_reduce, deepspeed_config, resolve_mixed_precision, zero_stage


@dataclass(frozen=True)
class RunStart:
    """A run's directory and, when it resumes, the checkpoint it continues: folder, metadata and weights."""

    run_dir: Path
    checkpoint: Path | None
    meta: dict | None
    state: dict | None
    distributed: dict  # how this launch distributes the run, as its checkpoints record it
    universal: bool  # the checkpoint's ZeRO state was partitioned otherwise: converted to DeepSpeed's universal format


def distribution(cfg: dict, world_size: int) -> dict:
    """How a run is distributed, as its checkpoints record it."""
    ds = deepspeed_config(cfg, world_size)
    return {"strategy": "deepspeed" if ds else "ddp", "zero_stage": zero_stage(ds), "world_size": world_size}


def _resume_source(cfg: dict, resume, overwrite: bool, main: bool):
    """Resolve ``resume`` (``"auto"``: this run's newest checkpoint if it has one) and prepare the run directory."""
    run_dir = Path(cfg["output_root"]) / cfg["run_name"]
    if resume == "auto":
        resume = run_dir if list_checkpoints(run_dir) else None
    if resume is None and list_checkpoints(run_dir):
        if not overwrite:
            raise VlsegError(f"{run_dir}: run already has checkpoints; pass --resume {run_dir} (or --resume auto), "
                             f"--overwrite, or choose another run_name=")
        if main:
            shutil.rmtree(run_dir)
    return run_dir, resume


def _needs_universal(checkpoint: Path, meta: dict, now: dict) -> bool:
    """Whether the checkpoint's optimiser state must be converted to be resumed as ``now`` distributes the run; a
    change of strategy (DDP ↔ DeepSpeed) cannot be resumed at all."""
    saved = meta.get("distributed") or {"strategy": "ddp", "zero_stage": None, "world_size": 1}
    if saved["strategy"] != now["strategy"]:
        raise VlsegError(f"{checkpoint}: trained with {saved['strategy']}, resumed with {now['strategy']}; "
                         f"resume with the same train.deepspeed, or start a new run from its weights with "
                         f"train.init_from={checkpoint}")
    # ZeRO's optimiser state is partitioned per process: another process count or stage needs DeepSpeed's universal
    # format.
    return saved["strategy"] == "deepspeed" and (saved["world_size"], saved["zero_stage"]) != (
        now["world_size"], now["zero_stage"])


def plan_start(cfg: dict, resume, overwrite: bool, world_size: int, rank: int) -> RunStart:
    """Where the run starts (``resume``: a run or checkpoint directory, ``"auto"`` or None), checked against how
    this launch distributes it.  An existing run is replaced only with ``overwrite`` (by the main process)."""
    run_dir, resume = _resume_source(cfg, resume, overwrite, rank == 0)
    checkpoint = meta = state = None
    if resume is not None:
        checkpoint, meta, state = read_checkpoint(resume)
    now = distribution(cfg, world_size)
    universal = meta is not None and _needs_universal(checkpoint, meta, now)
    return RunStart(run_dir, checkpoint, meta, state, now, universal)


def open_run_dir(start: RunStart, cfg: dict) -> None:
    """The run directory with the config; the main process alone calls this, before the process group exists."""
    start.run_dir.mkdir(parents=True, exist_ok=True)
    remove_partial_checkpoints(start.run_dir)
    save_config(cfg, start.run_dir / "config.yaml")


def load_starting_weights(net, text_encoder, start: RunStart, init_from: str | None) -> bool:
    """The weights the network starts from: the resumed checkpoint's (trained with this very text encoder), else
    ``train.init_from``'s.  False when the network keeps its fresh initialisation."""
    if start.state is not None:
        trained_with = start.meta["text_encoder"].get("fingerprint")
        if trained_with != text_encoder.identity().get("fingerprint"):
            raise VlsegError(f"{start.checkpoint}: the configured text encoder is not the one this run was trained "
                             f"with (fingerprint {text_encoder.identity().get('fingerprint')} vs {trained_with})")
        load_network_state(net, start.state, start.checkpoint)
        return True
    if init_from:
        init_dir, _, init_state = read_checkpoint(init_from)
        load_network_state(net, init_state, init_dir)
        return True
    return False


def _universal_copy(start: RunStart, main: bool) -> Path:
    """The checkpoint's training state converted to DeepSpeed's universal format (by the main process); every
    process stops if the conversion failed, rather than wait forever for the main one."""
    source, problem = start.run_dir / ".universal-resume", None
    if main:
        try:
            deepspeed_to_universal(start.checkpoint / "training_state", source)
        except VlsegError as exc:
            problem = exc
    if all_reduce(torch.tensor([float(problem is not None)]), "max")[0] > 0:
        raise problem or VlsegError(f"{start.checkpoint}: conversion to DeepSpeed's universal format failed "
                                    f"(see the main process's error)")
    return source


def restore_training_state(accelerator, start: RunStart) -> int:
    """The resumed checkpoint's optimiser (and DeepSpeed engine) state, loaded into the prepared ``accelerator``;
    returns the step it was saved at, 0 for a new run."""
    if start.checkpoint is None:
        return 0
    main = accelerator.is_main_process
    source = _universal_copy(start, main) if start.universal else start.checkpoint / "training_state"
    accelerator.load_state(str(source))
    accelerator.wait_for_everyone()
    if start.universal and main:
        shutil.rmtree(source, ignore_errors=True)
    return int(start.meta["step"])


class CheckpointWriter:
    """``writer(step)`` writes the run's ``checkpoint-<step>``: weights, the metadata that rebuilds the model
    (config, vocabulary, text encoder, distribution) and the training state to resume from.  Every process calls it
    at the same step."""

    def __init__(self, accelerator, net, start: RunStart, train: TrainSection, meta: dict):
        self.accelerator, self.net, self.run_dir, self.keep = accelerator, net, start.run_dir, train.keep_checkpoints
        self.meta = meta | {"distributed": start.distributed | {"world_size": accelerator.num_processes}}
        precision = resolve_mixed_precision(train.mixed_precision)
        # ZeRO partitions (and DeepSpeed's bf16/fp16 optimisers) keep the fp32 master weights in the optimiser state:
        # consolidate them from the files just written, not from the (possibly 16-bit) module.
        self.consolidate = start.distributed["strategy"] == "deepspeed" and bool(
            start.distributed["zero_stage"] or precision != "no")

    def _weights(self, folder: Path) -> dict:
        if self.consolidate:
            return deepspeed_fp32_weights(folder / "training_state")
        return self.accelerator.unwrap_model(self.net).state_dict()

    def __call__(self, step: int) -> Path:
        return save_checkpoint(self.run_dir, step, self._weights, self.meta,
                               save_training_state=lambda folder: self.accelerator.save_state(str(folder)),
                               keep=self.keep, is_main=self.accelerator.is_main_process,
                               barrier=self.accelerator.wait_for_everyone)
