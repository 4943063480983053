"""The process pool that preprocessing and verification run their per-case jobs in."""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

from tqdm.auto import tqdm

from vlseg.errors import VlsegError


def _worker_init(threads: int) -> None:
    import torch

    torch.set_num_threads(max(1, threads))


def _mp_context(preload: str):
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload([preload])  # no effect once the server runs; then workers import it themselves
        return ctx
    return multiprocessing.get_context("spawn")


def run_jobs(fn, jobs: list, workers: int, desc: str, progress: bool) -> list:
    """``fn`` over ``jobs``, results in job order; ``workers`` processes (0 or 1: in this process), progress bar.
    Each job is a tuple whose first item is its ``Case``.

    Workers are not forked from this process: a fork of a process whose OpenMP/torch thread pools have run can hang
    in the child.  They come from multiprocessing's fork server, which imports ``fn``'s module (and torch) once, so
    that starting workers costs ~1.5 s the first time in a process and almost nothing afterwards; where there is no
    fork server (Windows) they are spawned."""
    workers = int(workers)
    if workers < 0:
        raise VlsegError(f"workers must be 0 or more, got {workers}")
    bar = tqdm(total=len(jobs), desc=desc, unit="case", disable=not progress or not jobs)
    try:
        if workers <= 1 or len(jobs) <= 1:
            results = []
            for job in jobs:
                results.append(fn(job))
                bar.update(1)
            return results
        workers = min(workers, len(jobs))
        threads = max(1, (os.cpu_count() or 1) // workers)
        results = [None] * len(jobs)
        with ProcessPoolExecutor(max_workers=workers, mp_context=_mp_context(fn.__module__),
                                 initializer=_worker_init, initargs=(threads,)) as pool:
            futures = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
            try:
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.update(1)
            except BrokenProcessPool:
                case = jobs[next((i for f, i in futures.items() if not f.done() or f.exception() is not None), 0)][0]
                raise VlsegError(f"{case.image}: a {desc} worker process ended abruptly on this or another case "
                                 f"(out of memory? see any messages above); retry with fewer workers or "
                                 f"workers=0") from None
        return results
    finally:
        bar.close()
