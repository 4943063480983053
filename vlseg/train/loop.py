"""Training: ``python train.py --config configs/<name>.yaml [key=value ...] [--resume RUN_OR_CHECKPOINT|auto]``.

The same loop runs in one process, under DDP, or under DeepSpeed ZeRO (``train.deepspeed``), launched by ``python``,
``torchrun``, ``accelerate launch`` or ``deepspeed`` (vlseg.train.distributed explains how a step is split).  A run
is its steps: where it starts (``resume``), its corpus and vocabulary (``corpus``), the network and the weights it
starts from, the optimiser step (``step``), index-determined crops (``crops``, ``sampler``), what it reports
(``log``) and the atomic checkpoints it writes periodically and on SIGTERM (``resume``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from vlseg.checkpoint import list_checkpoints, resolve_checkpoint
from vlseg.config import DataSection, TrainSection
from vlseg.models.network import build_network, with_model_paths
from vlseg.registry import LOSSES
from vlseg.train.corpus import training_corpus
from vlseg.train.crops import CropDataset, collate
from vlseg.train.distributed import (
    broadcast_embeddings,
    finish,
    launched_world,
    make_accelerator,
    unpartitioned_construction,
)
from vlseg.train.log import TrainLog
from vlseg.train.preemption import Preempted, PreemptionFlag
from vlseg.train.provenance import collect as collect_provenance
from vlseg.train.provenance import record_run
from vlseg.train.resume import (
    CheckpointWriter,
    RunStart,
    load_starting_weights,
    open_run_dir,
    plan_start,
    restore_training_state,
)
from vlseg.train.sampler import StepShardSampler
from vlseg.train.step import Stepper


def build_model(cfg: dict, train: TrainSection, vocabulary, start: RunStart, main: bool):
    """The network and text encoder, with the weights the run starts from; a fresh network fits its prompt
    standardisation to the vocabulary's embeddings (computed once, on the main process, for a frozen encoder)."""
    if train.init_from:  # an imported model keeps its text files in its folder: the run records where they are
        cfg["text_encoder"] = with_model_paths(cfg, resolve_checkpoint(train.init_from))["text_encoder"]
    with unpartitioned_construction():
        net, text_encoder = build_network(cfg, vocabulary)
    loaded = load_starting_weights(net, text_encoder, start, train.init_from)
    vocab_embeddings = broadcast_embeddings(text_encoder, vocabulary.all_texts(), main)
    if not loaded:
        net.calibrate_prompts(vocab_embeddings)
    net.set_activation_checkpointing(train.activation_checkpointing)
    return net, text_encoder


def _run_steps(stepper: Stepper, loader, log: TrainLog, save: CheckpointWriter, first: int, train: TrainSection):
    """Steps ``first + 1 …`` until ``train.steps`` or a stop signal; returns the last step done, the last one
    checkpointed, and the signal's name (None when none came)."""
    batches, step, last_saved = iter(loader), first, None
    with PreemptionFlag() as stop:
        for step in range(first + 1, train.steps + 1):
            micros = [next(batches) for _ in range(train.grad_accum)]
            n_global = stepper.supervised_pairs(micros, stop)
            if n_global is None:  # asked to stop: the previous step is the last (checkpointed by the caller)
                step -= 1
                break
            stats, lr = stepper(step, micros, n_global)
            log.record(step, stats, stepper.grad_norm, lr)
            if step % train.checkpoint_every == 0 or step == train.steps:
                save(step)
                last_saved = step
    return step, last_saved, stop.signal_name


def train(cfg: dict, resume: str | Path | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Run (or continue) training on every process of the launch; returns the run directory.

    Raises ``Preempted`` after writing a checkpoint when SIGTERM/SIGUSR1 arrived during training."""
    data, tr = DataSection.from_config(cfg), TrainSection.from_config(cfg)
    world_size, rank = launched_world()
    start = plan_start(cfg, resume, overwrite, world_size, rank)
    if rank == 0:  # only the main process touches the run directory before the process group exists
        open_run_dir(start, cfg)
    if tr.threads:
        torch.set_num_threads(tr.threads)

    from accelerate.utils import set_seed

    set_seed(int(cfg["seed"]))
    accelerator = make_accelerator(cfg, universal=start.universal)
    main, world_size, rank = accelerator.is_main_process, accelerator.num_processes, accelerator.process_index
    cases, vocabulary = training_corpus(cfg, data, start, accelerator, progress and main)
    net, text_encoder = build_model(cfg, tr, vocabulary, start, main)
    loss_fn = LOSSES.build(cfg["loss"])
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=tr.lr,
                                  weight_decay=tr.weight_decay)
    net, optimizer = accelerator.prepare(net, optimizer)
    first = restore_training_state(accelerator, start)

    dataset = CropDataset.from_section(cases, vocabulary, data, int(cfg["seed"]), loss_fn.partial_labels == "naive")
    sampler = StepShardSampler(tr.batch_size, world_size, rank, tr.grad_accum, start_step=first, end_step=tr.steps)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=data.num_workers)
    save = CheckpointWriter(accelerator, net, start, tr, {"config": cfg, "vocabulary": vocabulary.to_dict(),
                                                          "text_encoder": text_encoder.identity(),
                                                          "run_name": cfg["run_name"]})
    log = TrainLog(start.run_dir, cfg["run_name"], dataset.dataset_names, tr, first, int(np.prod(data.crop_size)),
                   accelerator.device, main, progress)
    # What the run is made of, taken now: the checkout may change while a long run trains.
    provenance = collect_provenance(world_size) if main else None
    t_session = time.perf_counter()
    stepper = Stepper(accelerator, net, optimizer, loss_fn, text_encoder, dataset.dataset_names, tr,
                      start.distributed["strategy"] == "deepspeed")
    step, last_saved, signal_name = _run_steps(stepper, loader, log, save, first, tr)
    if last_saved != step and (step > first or not list_checkpoints(start.run_dir)):
        save(step)
    log.close()
    if main:  # code version, packages, hardware and training time, for reproduction and ablation tables
        record_run(start.run_dir, world_size, time.perf_counter() - t_session, provenance)
    accelerator.end_training()
    finish()
    if step < tr.steps:
        raise Preempted(start.run_dir, step, signal_name)
    return start.run_dir
