"""Training: ``python train.py --config configs/<name>.yaml [key=value ...] [--resume RUN_OR_CHECKPOINT]``.

Built on accelerate, so the same loop runs on a CPU, one GPU, or (issue #4) DeepSpeed.  AdamW with linear warm-up and
cosine decay, gradient clipping, mixed precision where the device supports it, seeded and index-determined data, a
progress bar with the loss, TensorBoard scalars, the resolved config saved with the run, periodic atomic checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from vlseg.checkpoint import list_checkpoints, load_network_state, read_checkpoint, save_checkpoint
from vlseg.config import apply_overrides, load_config, save_config
from vlseg.data.crops import CropDataset, collate, synthesis_plan
from vlseg.data.manifest import read_manifest
from vlseg.data.preprocess import default_cache_dir, open_cache, preprocess_corpus
from vlseg.errors import VlsegError
from vlseg.losses import LOSSES
from vlseg.models.network import build_network, prompt_inputs
from vlseg.vocab import Vocabulary


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


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
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_fast_bf16() else "no"


def make_accelerator(cfg: dict):
    if not torch.cuda.is_available():
        # accelerate's checkpointing imports DeepSpeed, which otherwise warns on every save that it fell back to CPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state and refuses a second Accelerator with other settings; a process that
    # trains several runs (a notebook, an ablation loop, the tests) starts each run from a clean state.
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=resolve_mixed_precision(cfg["train"]["mixed_precision"]),
                       cpu=not torch.cuda.is_available())


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


def train(cfg: dict, resume: str | Path | None = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Run (or continue) training; returns the run directory."""
    tcfg, dcfg = cfg["train"], cfg["data"]
    run_dir = Path(cfg["output_root"]) / cfg["run_name"]
    ckpt_dir = meta = state = None
    if resume is not None:
        ckpt_dir, meta, state = read_checkpoint(resume)
    elif list_checkpoints(run_dir):
        if not overwrite:
            raise VlsegError(f"{run_dir}: run already has checkpoints; pass --resume {run_dir}, --overwrite, "
                             f"or choose another run_name=")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    if tcfg.get("threads"):
        torch.set_num_threads(int(tcfg["threads"]))

    from accelerate.utils import set_seed

    set_seed(int(cfg["seed"]))
    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
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
        save_config(cfg, run_dir / "config.yaml")
    else:
        vocabulary = Vocabulary.from_dict(meta["vocabulary"])
    # Cases whose dataset annotates none of the model's classes have nothing to train on.
    cases = [cc for cc in cases if any(n in vocabulary.names for n in cc.case.classes)] or cases
    net, text_encoder = build_network(cfg, vocabulary)
    if state is not None:
        trained_with = meta["text_encoder"].get("fingerprint")
        if trained_with != text_encoder.identity().get("fingerprint"):
            raise VlsegError(f"{ckpt_dir}: the configured text encoder is not the one this run was trained with "
                             f"(fingerprint {text_encoder.identity().get('fingerprint')} vs {trained_with})")
        load_network_state(net, state, ckpt_dir)
    with torch.no_grad():  # a frozen encoder's cache is filled here; steps then only look embeddings up
        vocab_embeddings = text_encoder.encode(vocabulary.all_texts())
    if state is None:
        net.calibrate_prompts(vocab_embeddings)
    loss_fn = LOSSES.build(cfg["loss"])
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=float(tcfg["lr"]), weight_decay=float(tcfg["weight_decay"]))
    steps = int(tcfg["steps"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, int(tcfg["warmup_steps"]), steps, float(tcfg["min_lr_ratio"])))
    net, optimizer, scheduler = accelerator.prepare(net, optimizer, scheduler)
    start = 0
    if ckpt_dir is not None:
        accelerator.load_state(str(ckpt_dir / "training_state"))
        start = int(meta["step"])

    batch = int(tcfg["batch_size"])
    dataset = CropDataset(cases, vocabulary, dcfg["crop_size"], seed=int(cfg["seed"]),
                          foreground_prob=float(dcfg["foreground_prob"]), max_queries=int(dcfg["max_queries"]),
                          synonyms=bool(dcfg["synonyms"]), query_unannotated=loss_fn.partial_labels == "naive",
                          dataset_temperature=float(dcfg["dataset_temperature"]),
                          dataset_factors=dcfg["dataset_weights"], class_factors=dcfg["class_weights"],
                          negative_fraction=float(dcfg["negative_fraction"]), zoom_range=dcfg["zoom_range"],
                          synthesis=synthesis_plan(dcfg["synthesis"], cases, vocabulary, dcfg["ct_window"]),
                          thin_prob=float(dcfg["thin_prob"]), thin_slices=dcfg["thin_slices"],
                          intensity_scale=dcfg["intensity_scale"], intensity_shift=float(dcfg["intensity_shift"]))
    indices = list(range(start * batch, steps * batch))  # sample i of the run is always dataset[i]
    loader = DataLoader(dataset, batch_size=batch, sampler=indices, collate_fn=collate,
                        num_workers=int(dcfg["num_workers"]))

    meta_out = {"config": cfg, "vocabulary": vocabulary.to_dict(), "text_encoder": text_encoder.identity(),
                "run_name": cfg["run_name"]}

    def checkpoint(step: int) -> Path:
        accelerator.wait_for_everyone()
        if not main:
            return run_dir
        return save_checkpoint(run_dir, step, accelerator.unwrap_model(net).state_dict(), meta_out,
                               save_training_state=lambda folder: accelerator.save_state(str(folder)),
                               keep=tcfg.get("keep_checkpoints"))

    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start + 1 if start else None)
    log_path = run_dir / "metrics.jsonl"
    if main and start == 0:
        log_path.write_text("")
    bar = tqdm(total=steps, initial=start, desc=cfg["run_name"], disable=not (progress and main), dynamic_ncols=True)
    device, t_last, step = accelerator.device, time.perf_counter(), start
    for step, sample in enumerate(loader, start=start + 1):
        net.train()
        prompts = prompt_inputs(sample["texts"], text_encoder, device)
        with accelerator.autocast():
            out = net(sample["image"].to(device), prompts, sample["query_mask"].to(device))
        parts = loss_fn(out, sample["target"].to(device), sample["annotated"].to(device),
                        sample["query_mask"].to(device))
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(parts["loss"])
        grad_norm = accelerator.clip_grad_norm_(net.parameters(), float(tcfg["grad_clip"]))
        optimizer.step()
        scheduler.step()
        record = {"step": step, "loss": float(parts["loss"].detach()), "bce": float(parts["bce"]),
                  "dice": float(parts["dice"]), "presence": float(parts["presence"]),
                  "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0]}
        if main:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", dice=f"{record['dice']:.3f}")
            if step % int(tcfg["log_every"]) == 0 or step == steps:
                now = time.perf_counter()
                for key in ("loss", "bce", "dice", "presence", "grad_norm", "lr"):
                    writer.add_scalar(f"train/{key}", record[key], step)
                writer.add_scalar("train/samples_per_s", batch * int(tcfg["log_every"]) / max(now - t_last, 1e-9),
                                  step)
                t_last = now
        if step % int(tcfg["checkpoint_every"]) == 0 and step != steps:
            checkpoint(step)
    bar.close()
    if step > start or not list_checkpoints(run_dir):
        checkpoint(step)
    if writer is not None:
        writer.close()
    accelerator.end_training()
    return run_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="train.py", description="Train a text-prompted 3D segmenter.")
    parser.add_argument("--config", help="experiment YAML (configs/...); defaults apply where it is silent")
    parser.add_argument("--resume", help="run or checkpoint directory to continue from (its config is reused)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run of the same name")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.steps=200")
    return parser


def main(argv=None) -> int:
    from vlseg.cli import run_guarded

    args = build_parser().parse_args(argv)

    def go():
        if args.resume:
            _, meta, _ = read_checkpoint(args.resume)
            cfg = apply_overrides(meta["config"], args.overrides)
        else:
            cfg = load_config(args.config, args.overrides)
        run_dir = train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
        print(f"run saved in {run_dir}")

    return run_guarded(go)
