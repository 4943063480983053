"""What a run needs recorded to be reproduced: code version, package versions, hardware, how it was launched."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

PACKAGES = ("vlseg", "torch", "transformers", "open_clip_torch", "monai", "accelerate", "deepspeed", "peft", "numpy",
            "nibabel", "SimpleITK")


def git_commit(folder: Path | None = None) -> dict:
    """The commit of the checkout vlseg runs from and whether it had uncommitted changes (None where it is not a git checkout)."""
    folder = Path(folder or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def hardware() -> dict:
    import torch

    info = {"machine": platform.machine(), "processor": platform.processor() or None, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "cuda": torch.version.cuda,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    return info


def collect(world_size: int = 1) -> dict:
    return {"git": git_commit(), "python": sys.version.split()[0], "platform": platform.platform(),
            "packages": versions(), "hardware": hardware(), "world_size": world_size,
            "command": " ".join(sys.argv)}


def record_run(run_dir: Path, world_size: int, train_seconds: float, provenance: dict | None = None) -> Path:
    """Write ``run_dir/run_info.json``: the provenance of the latest session of the run (``provenance``, as
    ``collect`` gave it when the session started; collected now if not given), every session's, and the training
    time summed over them (a resumed run adds to it)."""
    path = Path(run_dir) / "run_info.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}
    session = {**(provenance or collect(world_size)), "train_seconds": round(train_seconds, 3)}
    sessions = previous.get("sessions", []) + [session]
    info = {"train_seconds": round(sum(s["train_seconds"] for s in sessions), 3), "latest": sessions[-1],
            "sessions": sessions}
    from vlseg.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(info, indent=1))
    return path
