"""Which samples each process reads at each step of a (possibly distributed) run.

The training stream is index-determined: sample ``i`` of a run is ``CropDataset[i]``, drawn with the dataset weights
from ``(seed, i)``, so the stream is infinite, weighted and the same whatever reads it.  Step ``s`` (0-based) of a run
with global batch ``B`` consumes samples ``s·B … s·B + B − 1``; this sampler deals them out: process ``r`` of ``W``, in
micro-step ``m`` of ``A``, reads the contiguous block ``s·B + (m·W + r)·b …`` of ``b = B / (W·A)`` samples.  So no two
processes read the same crop in a step, the union over processes is exactly the single-process batch, and where a run
stops and resumes (on any process count) changes nothing.  Nothing is cached per process: every process reads the
same memory-mapped preprocessing cache, which the OS page cache holds once.
"""

from __future__ import annotations

from typing import Iterator

from torch.utils.data import Sampler


class StepShardSampler(Sampler[list[int]]):
    """Batch sampler yielding this process's micro-batches for steps ``start … end − 1`` (``end=None``: forever)."""

    def __init__(self, batch_size: int, world_size: int = 1, rank: int = 0, grad_accum: int = 1, start_step: int = 0,
                 end_step: int | None = None):
        if batch_size % (world_size * grad_accum):
            raise ValueError(f"global batch {batch_size} does not split over {world_size} × {grad_accum}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        self.batch_size, self.world_size, self.rank, self.grad_accum = batch_size, world_size, rank, grad_accum
        self.micro = batch_size // (world_size * grad_accum)
        self.start_step, self.end_step = start_step, end_step

    def indices(self, step: int, micro_step: int) -> list[int]:
        first = step * self.batch_size + (micro_step * self.world_size + self.rank) * self.micro
        return list(range(first, first + self.micro))

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while self.end_step is None or step < self.end_step:
            for m in range(self.grad_accum):
                yield self.indices(step, m)
            step += 1

    def __len__(self) -> int:
        if self.end_step is None:
            raise TypeError("an endless sampler has no length")
        return (self.end_step - self.start_step) * self.grad_accum
