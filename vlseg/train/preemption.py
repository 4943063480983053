"""Preemption: a cluster scheduler sends SIGTERM some time before it kills a job.

While training runs, SIGTERM (and SIGUSR1, which SLURM's ``--signal`` can send ahead of the time limit) only raise a
flag; the training loop checks it between optimiser steps — all processes agree through the reduction each step already
makes, so they stop after the same step — writes a checkpoint and exits with ``PREEMPTED_EXIT``.  ``train.py --resume auto`` (or
``--resume <run>``) then continues from exactly that step.
"""

from __future__ import annotations

import signal

PREEMPTED_EXIT = 143  # 128 + SIGTERM: "stopped by a signal", so a requeue wrapper can tell it from success or a crash
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Context manager installing the handlers; ``bool(flag)`` says whether a stop was requested."""

    def __init__(self):
        self.requested = False
        self.signal_name = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __bool__(self) -> bool:
        return self.requested

    def __enter__(self) -> "PreemptionFlag":
        try:
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handlers, never preempted
            self._previous.clear()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class Preempted(Exception):
    """Training stopped on a signal after writing a checkpoint at ``step``."""

    def __init__(self, run_dir, step: int, signal_name: str | None):
        super().__init__(f"{signal_name or 'signal'} received: checkpoint written at step {step} in {run_dir}; "
                         f"continue with: python train.py --resume {run_dir}")
        self.run_dir, self.step = run_dir, step
