"""What a training run reports as it goes: ``metrics.jsonl``, TensorBoard scalars and the progress bar."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vlseg.config import TrainSection
from vlseg.train.distributed import all_reduce

SCALARS = ("loss", "bce", "dice", "presence", "grad_norm", "lr", "samples_per_s", "voxels_per_s", "peak_memory_mb")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: allocated GPU memory on a GPU, resident set size on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class TrainLog:
    """One ``metrics.jsonl`` line per step (loss terms, gradient norm, learning rate, loss per dataset) and the
    progress bar; every ``log_every`` steps also throughput, peak memory and TensorBoard scalars, overall and per
    dataset (the loss per dataset averaged over the steps since the last log).  The main process writes; every
    process calls ``record`` (peak memory is the maximum over them)."""

    def __init__(self, run_dir: Path, run_name: str, datasets: list[str], train: TrainSection, start: int,
                 voxels_per_sample: int, device, main: bool, progress: bool):
        self.datasets, self.start, self.main, self.device = list(datasets), start, main, device
        self.steps, self.log_every, self.batch = train.steps, train.log_every, train.batch_size
        self.voxels_per_sample = voxels_per_sample
        self.path, self.writer = run_dir / "metrics.jsonl", None
        if main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start + 1 if start else None)
            kept = []
            if start and self.path.is_file():  # a resumed run's log continues from its checkpoint, not from the crash
                kept = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= start]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.bar = tqdm(total=train.steps, initial=start, desc=run_name, disable=not (progress and main),
                        dynamic_ncols=True)
        self.window = torch.zeros(len(datasets), 2, dtype=torch.float64)  # per dataset: loss sum, pairs since last log
        self.t_last = time.perf_counter()

    def _step_record(self, step: int, stats: torch.Tensor, grad_norm, lr: float) -> dict:
        """``stats``: per dataset, loss, bce, dice and presence summed over the step's pairs, and the pair count."""
        n = max(float(stats[:, 4].sum()), 1.0)
        return {"step": step, "loss": float(stats[:, 0].sum()) / n, "bce": float(stats[:, 1].sum()) / n,
                "dice": float(stats[:, 2].sum()) / n, "presence": float(stats[:, 3].sum()) / n,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"), "lr": lr,
                "datasets": {d: float(stats[i, 0] / stats[i, 4]) for i, d in enumerate(self.datasets)
                             if stats[i, 4] > 0}}

    def _throughput(self, step: int) -> dict:
        now = time.perf_counter()
        samples_per_s = self.batch * (step - max(self.start, step - self.log_every)) / max(now - self.t_last, 1e-9)
        self.t_last = now
        return {"samples_per_s": samples_per_s, "voxels_per_s": samples_per_s * self.voxels_per_sample,
                "peak_memory_mb": float(all_reduce(torch.tensor([peak_memory_mb(self.device)]), "max")[0])}

    def record(self, step: int, stats: torch.Tensor, grad_norm, lr: float) -> None:
        record = self._step_record(step, stats, grad_norm, lr)
        self.window += stats[:, [0, 4]]
        log_now = step % self.log_every == 0 or step == self.steps
        if log_now:  # every process takes part in the reduction of peak memory
            record.update(self._throughput(step))
        if self.main:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.3f}", dice=f"{record['dice']:.3f}")
            if log_now:
                self._scalars(step, record)
        if log_now:
            self.window.zero_()

    def _scalars(self, step: int, record: dict) -> None:
        for key in SCALARS:
            self.writer.add_scalar(f"train/{key}", record[key], step)
        for i, d in enumerate(self.datasets):
            if self.window[i, 1] > 0:
                self.writer.add_scalar(f"loss_by_dataset/{d}", float(self.window[i, 0] / self.window[i, 1]), step)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
