"""One optimiser step over the global batch, however it is split over processes and micro-batches."""

from __future__ import annotations

import math

import torch

from vlseg.config import TrainSection
from vlseg.models.network import prompt_inputs
from vlseg.train.distributed import all_reduce, resolve_mixed_precision


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class Stepper:
    """AdamW with linear warm-up and cosine decay, gradient clipping and mixed precision where configured.

    The learning rate is a function of the step, set on the optimiser each step: nothing to save or resume, and the
    same under DDP and DeepSpeed (whose engine would otherwise step a scheduler of its own as well)."""

    def __init__(self, accelerator, net, optimizer, loss_fn, text_encoder, datasets: list[str], train: TrainSection,
                 on_deepspeed: bool):
        self.accelerator, self.net, self.optimizer, self.loss_fn = accelerator, net, optimizer, loss_fn
        self.text_encoder, self.datasets, self.train = text_encoder, list(datasets), train
        precision = resolve_mixed_precision(train.mixed_precision)
        # DeepSpeed holds a 16-bit model under bf16/fp16 (no autocast): its inputs must match.
        self.input_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if on_deepspeed else None
        self.grad_norm = None  # of the last optimiser step

    def supervised_pairs(self, micros: list[dict], stop) -> float | None:
        """The step's supervised (sample, query) pairs over all processes and micro-batches, the loss's normaliser;
        None when any process was asked to ``stop`` (then all stop together, before this step)."""
        n_local = sum(int(self.loss_fn.supervised(m["annotated"], m["query_mask"]).sum()) for m in micros)
        n_global, stops = all_reduce(torch.tensor([n_local, float(bool(stop))], dtype=torch.float64)).tolist()
        return None if stops else n_global

    def __call__(self, step: int, micros: list[dict], n_global: float) -> tuple[torch.Tensor, float]:
        """Train on the step's micro-batches; returns, per dataset, the loss, bce, dice and presence summed over the
        step's pairs of all processes and the pair count ``[datasets, 5]``, and the learning rate."""
        # The loss is normalised by the step's pairs over all processes and micro-batches, so the gradient is that
        # of the global batch's mean however the batch is split.  accelerate (or DeepSpeed) divides by the
        # accumulation steps and DDP averages over processes: the scale undoes both.
        scale = self.accelerator.num_processes * self.train.grad_accum / max(n_global, 1.0)
        t = self.train
        lr = t.lr * lr_factor(step - 1, t.warmup_steps, t.steps, t.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        stats = torch.zeros(len(self.datasets), 5, dtype=torch.float64)  # per dataset: loss, bce, dice, presence, n
        self.net.train()
        for m in micros:
            parts = self._micro_step(m, scale)
            rows = torch.tensor([self.datasets.index(m["dataset"][i]) for i in parts["pair_sample"].tolist()],
                                dtype=torch.long)
            stats[:, :4].index_add_(0, rows, parts["pairs"].double())
            stats[:, 4].index_add_(0, rows, torch.ones(len(rows), dtype=torch.float64))
        return all_reduce(stats), lr

    def _micro_step(self, m: dict, scale: float) -> dict:
        accelerator, device = self.accelerator, self.accelerator.device
        with accelerator.accumulate(self.net):
            prompts = prompt_inputs(m["texts"], self.text_encoder, device)
            image = m["image"].to(device)
            if self.input_dtype is not None:
                image = image.to(self.input_dtype)
                prompts = prompts.to(self.input_dtype) if isinstance(prompts, torch.Tensor) else prompts
            with accelerator.autocast():
                out = self.net(image, prompts, m["query_mask"].to(device))
            parts = self.loss_fn(out, m["target"].to(device), m["annotated"].to(device), m["query_mask"].to(device),
                                 normalizer=1.0)
            accelerator.backward(parts["loss"] * scale)
            if accelerator.sync_gradients:
                self.grad_norm = accelerator.clip_grad_norm_(self.net.parameters(), self.train.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return parts
