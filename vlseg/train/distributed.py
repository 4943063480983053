"""How a training run is spread over processes: precision, batch split, DeepSpeed configs, collectives.

One experiment config trains the same way under ``python``, ``torchrun``, ``accelerate launch`` and ``deepspeed``:

* ``train.batch_size`` is the **global** batch of one optimiser step.  Each of the ``W`` processes runs
  ``train.grad_accum`` micro-batches of ``batch_size / (W × grad_accum)`` samples; so changing the number of
  processes changes how a step is computed, not what it computes (and a run can resume on another process count).
* ``train.deepspeed`` names a DeepSpeed JSON (``configs/deepspeed/``); without it, accelerate runs plain DDP.  The
  JSON's ``"auto"`` entries (batch sizes, accumulation, clipping, bf16/fp16) are filled from the experiment config,
  so the two can never disagree.

accelerate is the one driver for both; what is written here is only what it leaves to the caller: the single-process
DeepSpeed environment, gloo on CPU, and the few collectives the training loop needs outside the model.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import sys
from contextlib import contextmanager

import torch

from vlseg.config import config_path
from vlseg.errors import VlsegError

# Launchers that start one process per rank set these; a plain ``python train.py`` sets none.
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_world() -> tuple[int, int]:
    """``(world size, rank)`` as the launcher declared them (1, 0 for a plain ``python``)."""
    return int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has AMX tiles, on which oneDNN runs bf16 convolutions.  There a training step of
    configs/real.yaml's network runs about twice as fast (``benchmarks/data_pipeline.py`` times both); without AMX,
    bf16 autocast of 3D convolutions is slower than fp32."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so absent or failing means "no"
    try:
        return bool(probe is not None and probe())
    except Exception:
        return False


def resolve_mixed_precision(setting: str) -> str:
    """``auto``: bf16 on a GPU that has it (else fp16); on a CPU, bf16 where it is fast (AMX), else fp32."""
    if setting is False or setting is None:  # YAML reads a bare `no` as false
        return "no"
    if setting not in ("auto", "no", "bf16", "fp16"):
        raise VlsegError(f"train.mixed_precision={setting!r}: expected auto, no, bf16 or fp16")
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "no"


def micro_batch_size(cfg: dict, world_size: int) -> int:
    """Samples per process per micro-step; the global batch must split evenly."""
    batch, accum = int(cfg["train"]["batch_size"]), int(cfg["train"]["grad_accum"])
    if accum < 1 or batch % (world_size * accum):
        raise VlsegError(f"train.batch_size={batch} (the global batch) cannot be split over {world_size} process(es) "
                         f"× train.grad_accum={accum}: choose a batch size that is a multiple of "
                         f"{world_size * max(accum, 1)}")
    return batch // (world_size * accum)


def deepspeed_config(cfg: dict, world_size: int, universal: bool = False) -> dict | None:
    """The run's DeepSpeed config (``train.deepspeed``) with every ``"auto"`` entry filled, or None for DDP."""
    path = cfg["train"].get("deepspeed")
    if not path:
        return None
    path = config_path(path)  # a file, or a shipped one by name: configs/deepspeed/zero2.json works anywhere
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise VlsegError(f"{path}: DeepSpeed config not found (train.deepspeed); see configs/deepspeed/") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise VlsegError(f"{path}: not a valid DeepSpeed JSON config ({exc})") from None
    if not isinstance(ds, dict):
        raise VlsegError(f"{path}: a DeepSpeed config is a JSON object")
    tcfg = cfg["train"]
    precision = resolve_mixed_precision(tcfg["mixed_precision"])
    wanted = {"train_batch_size": int(tcfg["batch_size"]),
              "train_micro_batch_size_per_gpu": micro_batch_size(cfg, world_size),
              "gradient_accumulation_steps": int(tcfg["grad_accum"]),
              "gradient_clipping": float(tcfg["grad_clip"])}
    ds = copy.deepcopy(ds)
    for key, value in wanted.items():
        given = ds.get(key, "auto")
        if given != "auto" and given != value:
            raise VlsegError(f"{path}: {key} is {given} but the experiment config gives {value}; write \"auto\" "
                             f"there and set it through train.* instead")
        ds[key] = value
    for name in ("bf16", "fp16"):
        section = ds.setdefault(name, {})
        enabled = section.get("enabled", "auto")
        if enabled == "auto":
            section["enabled"] = precision == name
        elif bool(enabled) != (precision == name):
            raise VlsegError(f"{path}: {name}.enabled is {enabled} but train.mixed_precision resolves to "
                             f"{precision!r}; write \"auto\" there")
    # vlseg passes torch's AdamW (no compiled DeepSpeed op needed); ZeRO accepts it only with these switches.
    ds["zero_allow_untested_optimizer"] = True
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds.setdefault("steps_per_print", 10**9)  # vlseg logs progress itself
    if universal:  # resume a ZeRO checkpoint written by another number of processes (see checkpoint.py)
        ds.setdefault("checkpoint", {})["load_universal"] = True
    return ds


def zero_stage(ds: dict | None) -> int | None:
    return None if ds is None else int(ds.get("zero_optimization", {}).get("stage", 0))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_accelerator(cfg: dict, universal: bool = False):
    """An ``Accelerator`` for this run: DDP (or a single process), or DeepSpeed when ``train.deepspeed`` is set."""
    if not torch.cuda.is_available():
        # DeepSpeed picks its accelerator at import; on a CPU-only machine it must be told (its CPU backend uses gloo
        # when oneCCL is absent).  accelerate's checkpointing imports DeepSpeed too, even for DDP runs.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    world_size, _ = launched_world()
    ds = deepspeed_config(cfg, world_size, universal)
    micro_batch_size(cfg, world_size)  # the split is checked for DDP runs too
    precision = resolve_mixed_precision(cfg["train"]["mixed_precision"])
    # accelerate keeps one process-wide state and refuses a second Accelerator with other settings; a process that
    # trains several runs (a notebook, an ablation loop, the tests) starts each run from a clean state.
    AcceleratorState._reset_state(reset_partial_state=False)
    common = {"mixed_precision": precision, "gradient_accumulation_steps": int(cfg["train"]["grad_accum"])}
    if ds is None:
        return Accelerator(cpu=not torch.cuda.is_available(), **common)
    if not all(v in os.environ for v in _LAUNCH_VARS):
        # A plain `python train.py` with DeepSpeed: DeepSpeed would otherwise look for MPI to discover its world.
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    handlers = [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]
    # Not cpu=True here: accelerate would silently drop the DeepSpeed plugin.
    return Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds), kwargs_handlers=handlers, **common)


@contextmanager
def unpartitioned_construction():
    """Build modules as ordinary, whole ones even while a ZeRO-3 run is configured.

    accelerate registers a ZeRO-3 config with transformers, whose ``from_pretrained`` then partitions every model it
    loads across processes.  The frozen text encoder must stay whole on every process (it is outside the DeepSpeed
    engine and nothing would gather its weights); a trained one is partitioned by the engine itself at ``prepare``.
    """
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        yield
        return
    ref = hf_deepspeed._hf_deepspeed_config_weak_ref  # transformers offers unset/set, but no getter for the object
    registered = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if registered is not None:
            hf_deepspeed.set_hf_deepspeed_config(registered)


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum (or max) a small CPU tensor over all processes; the identity in a single process.

    The training loop's bookkeeping (supervised-pair counts, per-dataset losses, the preemption flag, peak memory)
    lives on the CPU; gloo reduces CPU tensors, NCCL only device tensors, so it travels on the backend's device.
    """
    if not is_initialized() or torch.distributed.get_world_size() == 1:
        return tensor
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else None
    work = tensor.to(device) if device is not None else tensor.clone()
    reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
    torch.distributed.all_reduce(work, op=reduce_op)
    return work.cpu()


def broadcast_embeddings(text_encoder, texts: list[str], is_main: bool) -> torch.Tensor:
    """A frozen encoder's embeddings of ``texts``, computed once on the main process and sent to the others, whose
    caches are filled with them: no rank runs the text tower again during training."""
    if not text_encoder.frozen or not is_initialized() or torch.distributed.get_world_size() == 1:
        with torch.no_grad():  # a trained encoder has no cache: each process needs its own copy of the weights anyway
            return text_encoder.encode(texts)
    payload = [None]
    if is_main:
        with torch.no_grad():
            payload = [text_encoder.encode(texts).cpu()]
    torch.distributed.broadcast_object_list(payload, src=0)
    if not is_main:
        text_encoder.fill_cache(texts, payload[0])
    return payload[0]


def finish() -> None:
    """Leave the process group cleanly (a bare exit of a 2-process gloo group occasionally aborts, see CPU_NOTES);
    a launched process then ends through ``exit_after_finish``."""
    if is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def exit_after_finish(code: int) -> None:
    """End a process of a multi-process launch that has left its group with ``finish()`` and written everything,
    without the interpreter's and the C++ libraries' exit-time destructors; in a single process, do nothing.

    Even after a clean ``finish()``, those destructors (gloo's, DeepSpeed's CPU collectives') sometimes meet a
    still-joinable thread and abort the process (SIGABRT, "terminate called without an active exception") after the
    run was saved, and the launcher then reports the whole job failed.
    """
    if launched_world()[0] > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
