"""Training: ``python train.py --config configs/<name>.yaml [key=value ...] [--resume RUN_OR_CHECKPOINT|auto]``.

The same loop runs in one process, under DDP, or under DeepSpeed ZeRO (``train.deepspeed``), launched by ``python``,
``torchrun``, ``accelerate launch`` or ``deepspeed`` (vlseg.distributed explains how a step is split).  AdamW with
linear warm-up and cosine decay, gradient clipping, mixed precision where the device supports it, index-determined data,
a progress bar with the loss, TensorBoard scalars (overall and per dataset, throughput, peak memory) from the main
process, the resolved config saved with the run, periodic and on-SIGTERM atomic checkpoints.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vlseg.checkpoint import (
    deepspeed_fp32_weights,
    deepspeed_to_universal,
    list_checkpoints,
    load_network_state,
    read_checkpoint,
    remove_partial_checkpoints,
    save_checkpoint,
)
from vlseg.config import save_config
from vlseg.errors import VlsegError
from vlseg.models.network import build_network, prompt_inputs
from vlseg.prepare.cache.build import default_cache_dir, open_cache, preprocess_corpus
from vlseg.prepare.manifest import read_manifest
from vlseg.train.crops import CropDataset, collate, synthesis_plan
from vlseg.train.distributed import (
    all_reduce,
    broadcast_embeddings,
    deepspeed_config,
    finish,
    launched_world,
    make_accelerator,
    resolve_mixed_precision,
    unpartitioned_construction,
    zero_stage,
)
from vlseg.registry import LOSSES
from vlseg.train.preemption import Preempted, PreemptionFlag
from vlseg.train.provenance import collect as collect_provenance
from vlseg.train.provenance import record_run
from vlseg.train.sampler import StepShardSampler
from vlseg.vocab.vocabulary import Vocabulary


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def preprocess_settings(cfg: dict) -> dict:
    """The config entries the preprocessing cache depends on."""
    d = cfg["data"]
    return {"ct_window": list(d["ct_window"]), "target_spacing": d["target_spacing"],
            "spacing_per_dataset": dict(d.get("spacing_per_dataset") or {})}


def cache_dir(cfg: dict) -> Path:
    return Path(cfg["data"]["cache"]) if cfg["data"].get("cache") else default_cache_dir(cfg["data"]["manifest"])


def load_training_cases(cfg: dict, split: str, progress: bool = True, accelerator=None) -> list:
    """The split's cases, preprocessed into the cache where needed (up-to-date cases are skipped) and opened as
    memory maps.  Any case that cannot be preprocessed stops training with a one-line error."""
    manifest = Path(cfg["data"]["manifest"])
    cases = read_manifest(manifest, split=split)
    if not cases:
        raise VlsegError(f"{manifest}: no cases in split {split!r}")
    settings, cache = preprocess_settings(cfg), cache_dir(cfg)
    if accelerator is None or accelerator.is_main_process:
        report = preprocess_corpus(cases, cache, settings, workers=int(cfg["data"]["preprocess_workers"]),
                                   progress=progress)
        if report["errors"]:
            first = report["errors"][0]
            raise VlsegError(f"{first['file']}: {first['problem']} ({len(report['errors'])} case(s) failed "
                             f"preprocessing; all are listed in {cache / 'report.json'})")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return open_cache(cases, cache, settings)


def inference_spacing(cfg: dict, cases: list) -> list[float] | None:
    """The spacing predictions are made at: the configured one, else — when training resamples per dataset — the
    median of the training cases' cached spacings; None keeps each scan's native grid."""
    d = cfg["data"]
    if d.get("inference_spacing"):
        return [float(v) for v in d["inference_spacing"]]
    if isinstance(d["target_spacing"], (list, tuple)) and not d.get("spacing_per_dataset"):
        return [float(v) for v in d["target_spacing"]]
    if d["target_spacing"] is None and not d.get("spacing_per_dataset"):
        return None
    return [float(v) for v in np.median(np.array([c.spacing for c in cases], dtype=float), axis=0)]


def distribution(cfg: dict, world_size: int) -> dict:
    """How a run is distributed, as its checkpoints record it."""
    ds = deepspeed_config(cfg, world_size)
    return {"strategy": "deepspeed" if ds else "ddp", "zero_stage": zero_stage(ds), "world_size": world_size}


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: allocated GPU memory on a GPU, resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


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


def train(cfg: dict, resume: str | Path | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Run (or continue) training on every process of the launch; returns the run directory.

    Raises ``Preempted`` after writing a checkpoint when SIGTERM/SIGUSR1 arrived during training."""
    tcfg, dcfg = cfg["train"], cfg["data"]
    world_size, rank = launched_world()
    run_dir, resume = _resume_source(cfg, resume, overwrite, rank == 0)
    ckpt_dir = meta = state = None
    if resume is not None:
        ckpt_dir, meta, state = read_checkpoint(resume)
    dist_now = distribution(cfg, world_size)
    universal = False
    if meta is not None:
        saved = meta.get("distributed") or {"strategy": "ddp", "zero_stage": None, "world_size": 1}
        if saved["strategy"] != dist_now["strategy"]:
            raise VlsegError(f"{ckpt_dir}: trained with {saved['strategy']}, resumed with {dist_now['strategy']}; "
                             f"resume with the same train.deepspeed, or start a new run from its weights with "
                             f"train.init_from={ckpt_dir}")
        # ZeRO's optimiser state is partitioned per process: another process count or stage needs DeepSpeed's
        # universal format, converted below.
        universal = saved["strategy"] == "deepspeed" and (saved["world_size"], saved["zero_stage"]) != (
            world_size, dist_now["zero_stage"])
    if rank == 0:  # only the main process touches the run directory before the process group exists
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_checkpoints(run_dir)
        save_config(cfg, run_dir / "config.yaml")
    if tcfg.get("threads"):
        torch.set_num_threads(int(tcfg["threads"]))

    from accelerate.utils import set_seed

    set_seed(int(cfg["seed"]))
    accelerator = make_accelerator(cfg, universal=universal)
    main, world_size, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    on_deepspeed = dist_now["strategy"] == "deepspeed"
    cases = load_training_cases(cfg, dcfg["train_split"], progress and main, accelerator)
    if meta is None:  # the model knows the canonical classes its training corpus annotates (or synthesises)
        full = Vocabulary.load(cfg["vocabulary"])
        annotated = {name for cc in cases for name in cc.case.classes}
        if dcfg["synthesis"].get("enabled"):
            annotated.add(full.resolve(str(dcfg["synthesis"]["target"])) or str(dcfg["synthesis"]["target"]))
        if dcfg.get("classes"):  # a chosen subset: other annotated classes become unknown (never supervised)
            chosen = {full.resolve(str(n)) or str(n) for n in dcfg["classes"]}
            full.subset(chosen, source="data.classes")  # unknown names: one-line error
            annotated &= chosen
        vocabulary = full.subset(annotated, source=str(dcfg["manifest"]))
        dcfg["inference_spacing"] = inference_spacing(cfg, cases)
        if main:
            save_config(cfg, run_dir / "config.yaml")
    else:
        vocabulary = Vocabulary.from_dict(meta["vocabulary"])
    # Cases whose dataset annotates none of the model's classes have nothing to train on.
    cases = [cc for cc in cases if any(n in vocabulary.names for n in cc.case.classes)] or cases
    with unpartitioned_construction():
        net, text_encoder = build_network(cfg, vocabulary)
    if state is not None:
        trained_with = meta["text_encoder"].get("fingerprint")
        if trained_with != text_encoder.identity().get("fingerprint"):
            raise VlsegError(f"{ckpt_dir}: the configured text encoder is not the one this run was trained with "
                             f"(fingerprint {text_encoder.identity().get('fingerprint')} vs {trained_with})")
        load_network_state(net, state, ckpt_dir)
    elif tcfg.get("init_from"):
        init_dir, _, init_state = read_checkpoint(tcfg["init_from"])
        load_network_state(net, init_state, init_dir)
    # A frozen encoder's embeddings are computed once, on the main process; the others receive them.
    vocab_embeddings = broadcast_embeddings(text_encoder, vocabulary.all_texts(), main)
    if state is None and not tcfg.get("init_from"):
        net.calibrate_prompts(vocab_embeddings)
    net.set_activation_checkpointing(bool(tcfg.get("activation_checkpointing")))
    loss_fn = LOSSES.build(cfg["loss"])
    params = [p for p in net.parameters() if p.requires_grad]
    base_lr = float(tcfg["lr"])
    optimizer = torch.optim.AdamW(params, lr=base_lr, weight_decay=float(tcfg["weight_decay"]))
    steps, warmup, min_ratio = int(tcfg["steps"]), int(tcfg["warmup_steps"]), float(tcfg["min_lr_ratio"])
    # The learning rate is a function of the step, set on the optimiser each step: nothing to save or resume, and
    # the same under DDP and DeepSpeed (whose engine would otherwise step a scheduler of its own as well).
    net, optimizer = accelerator.prepare(net, optimizer)
    start = 0
    if ckpt_dir is not None:
        source = ckpt_dir / "training_state"
        if universal:
            source, problem = run_dir / ".universal-resume", None
            if main:
                try:
                    deepspeed_to_universal(ckpt_dir / "training_state", source)
                except VlsegError as exc:
                    problem = exc
            # Every process stops if the conversion failed (rather than wait forever for the main one).
            if all_reduce(torch.tensor([float(problem is not None)]), "max")[0] > 0:
                raise problem or VlsegError(f"{ckpt_dir}: conversion to DeepSpeed's universal format failed "
                                            f"(see the main process's error)")
        accelerator.load_state(str(source))
        accelerator.wait_for_everyone()
        if universal and main:
            shutil.rmtree(source, ignore_errors=True)
        start = int(meta["step"])

    batch, accum = int(tcfg["batch_size"]), int(tcfg["grad_accum"])
    dataset = CropDataset(cases, vocabulary, dcfg["crop_size"], seed=int(cfg["seed"]),
                          foreground_prob=float(dcfg["foreground_prob"]), max_queries=int(dcfg["max_queries"]),
                          synonyms=bool(dcfg["synonyms"]), query_unannotated=loss_fn.partial_labels == "naive",
                          dataset_temperature=float(dcfg["dataset_temperature"]),
                          dataset_factors=dcfg["dataset_weights"], class_factors=dcfg["class_weights"],
                          negative_fraction=float(dcfg["negative_fraction"]), zoom_range=dcfg["zoom_range"],
                          synthesis=synthesis_plan(dcfg["synthesis"], cases, vocabulary, dcfg["ct_window"]),
                          thin_prob=float(dcfg["thin_prob"]), thin_slices=dcfg["thin_slices"],
                          intensity_scale=dcfg["intensity_scale"], intensity_shift=float(dcfg["intensity_shift"]))
    sampler = StepShardSampler(batch, world_size, rank, accum, start_step=start, end_step=steps)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=int(dcfg["num_workers"]))
    datasets = list(dataset.dataset_names)
    voxels_per_sample = int(np.prod(dcfg["crop_size"]))

    meta_out = {"config": cfg, "vocabulary": vocabulary.to_dict(), "text_encoder": text_encoder.identity(),
                "run_name": cfg["run_name"], "distributed": dist_now | {"world_size": world_size}}
    stage = dist_now["zero_stage"]
    precision = resolve_mixed_precision(tcfg["mixed_precision"])

    def weights(folder: Path) -> dict:
        if on_deepspeed and (stage or precision != "no"):
            # ZeRO partitions (and DeepSpeed's bf16/fp16 optimisers) keep the fp32 master weights in the optimiser
            # state: consolidate them from the files just written, not from the (possibly 16-bit) module.
            return deepspeed_fp32_weights(folder / "training_state")
        return accelerator.unwrap_model(net).state_dict()

    def checkpoint(step: int) -> Path:
        return save_checkpoint(run_dir, step, weights, meta_out,
                               save_training_state=lambda folder: accelerator.save_state(str(folder)),
                               keep=tcfg.get("keep_checkpoints"), is_main=main, barrier=accelerator.wait_for_everyone)

    writer = None
    log_path = run_dir / "metrics.jsonl"
    if main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start + 1 if start else None)
        kept = []
        if start and log_path.is_file():  # a resumed run's log continues from its checkpoint, not from the crash
            kept = [line for line in log_path.read_text().splitlines() if json.loads(line)["step"] <= start]
        log_path.write_text("".join(line + "\n" for line in kept))
    bar = tqdm(total=steps, initial=start, desc=cfg["run_name"], disable=not (progress and main), dynamic_ncols=True)
    # What the run is made of, taken now: the checkout may change while a long run trains.
    provenance = collect_provenance(world_size) if main else None
    t_session = time.perf_counter()
    device = accelerator.device
    # DeepSpeed holds a 16-bit model under bf16/fp16 (no autocast): its inputs must match.
    input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if on_deepspeed else None
    window = torch.zeros(len(datasets), 2, dtype=torch.float64)  # per-dataset loss sum and pair count since last log
    t_last, step, last_saved, grad_norm = time.perf_counter(), start, None, None
    batches = iter(loader)
    with PreemptionFlag() as stop:
        for step in range(start + 1, steps + 1):
            micros = [next(batches) for _ in range(accum)]
            # The loss is normalised by the step's supervised pairs over all processes and micro-batches, so the
            # gradient is that of the global batch's mean, however the batch is split (vlseg.losses).
            n_local = sum(int(loss_fn.supervised(m["annotated"], m["query_mask"]).sum()) for m in micros)
            # The same reduction tells every process whether any of them was asked to stop: then all stop together,
            # the previous step being the last one (checkpointed below the loop).
            n_global, stops = all_reduce(torch.tensor([n_local, float(bool(stop))], dtype=torch.float64)).tolist()
            if stops:
                step -= 1
                break
            # accelerate (or DeepSpeed) divides by the accumulation steps and DDP averages over processes: undo both.
            scale = world_size * accum / max(n_global, 1.0)
            lr = base_lr * lr_factor(step - 1, warmup, steps, min_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            stats = torch.zeros(len(datasets), 5, dtype=torch.float64)  # per dataset: loss, bce, dice, presence, n
            net.train()
            for m in micros:
                with accelerator.accumulate(net):
                    prompts = prompt_inputs(m["texts"], text_encoder, device)
                    image = m["image"].to(device)
                    if input_dtype is not None:
                        image = image.to(input_dtype)
                        prompts = prompts.to(input_dtype) if isinstance(prompts, torch.Tensor) else prompts
                    with accelerator.autocast():
                        out = net(image, prompts, m["query_mask"].to(device))
                    parts = loss_fn(out, m["target"].to(device), m["annotated"].to(device),
                                    m["query_mask"].to(device), normalizer=1.0)
                    accelerator.backward(parts["loss"] * scale)
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(net.parameters(), float(tcfg["grad_clip"]))
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                rows = torch.tensor([datasets.index(m["dataset"][i]) for i in parts["pair_sample"].tolist()],
                                    dtype=torch.long)
                stats[:, :4].index_add_(0, rows, parts["pairs"].double())
                stats[:, 4].index_add_(0, rows, torch.ones(len(rows), dtype=torch.float64))
            stats = all_reduce(stats)
            n = max(float(stats[:, 4].sum()), 1.0)
            window += stats[:, [0, 4]]
            record = {"step": step, "loss": float(stats[:, 0].sum()) / n, "bce": float(stats[:, 1].sum()) / n,
                      "dice": float(stats[:, 2].sum()) / n, "presence": float(stats[:, 3].sum()) / n,
                      "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"), "lr": lr,
                      "datasets": {d: float(stats[i, 0] / stats[i, 4]) for i, d in enumerate(datasets)
                                   if stats[i, 4] > 0}}
            log_now = step % int(tcfg["log_every"]) == 0 or step == steps
            if log_now:  # every process takes part in the reduction of peak memory
                now = time.perf_counter()
                samples_per_s = batch * (step - max(start, step - int(tcfg["log_every"]))) / max(now - t_last, 1e-9)
                t_last = now
                record.update(samples_per_s=samples_per_s, voxels_per_s=samples_per_s * voxels_per_sample,
                              peak_memory_mb=float(all_reduce(torch.tensor([peak_memory_mb(device)]), "max")[0]))
            if main:
                with open(log_path, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", dice=f"{record['dice']:.3f}")
                if log_now:
                    for key in ("loss", "bce", "dice", "presence", "grad_norm", "lr", "samples_per_s", "voxels_per_s",
                                "peak_memory_mb"):
                        writer.add_scalar(f"train/{key}", record[key], step)
                    for i, d in enumerate(datasets):
                        if window[i, 1] > 0:
                            writer.add_scalar(f"loss_by_dataset/{d}", float(window[i, 0] / window[i, 1]), step)
            if log_now:
                window.zero_()
            if step % int(tcfg["checkpoint_every"]) == 0 or step == steps:
                checkpoint(step)
                last_saved = step
        signal_name = stop.signal_name
    bar.close()
    if last_saved != step and (step > start or not list_checkpoints(run_dir)):
        checkpoint(step)
    if writer is not None:
        writer.close()
    if main:  # code version, packages, hardware and training time, for reproduction and ablation tables
        record_run(run_dir, world_size, time.perf_counter() - t_session, provenance)
    accelerator.end_training()
    finish()
    if step < steps:
        raise Preempted(run_dir, step, signal_name)
    return run_dir


