"""Check nnU-Net v2 raw datasets with nnU-Net's own ``verify_dataset_integrity``.

    python -m data_prep.verify_nnunet data/real/raw            every Dataset* folder under it (or one dataset folder)
    python -m data_prep.verify_nnunet data/phantoms

Prints one line per dataset, ``PASS <folder>`` or ``FAIL <folder>: <nnU-Net's complaint>``, plus any geometry warning
nnU-Net printed for it, and exits 2 when one fails.  Needs ``nnunetv2`` (the ``dev`` extra).  nnU-Net starts its
worker with the "spawn" method, so this runs only as a script or module, never from an interactive session.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

from vlseg.errors import VlsegError, run_guarded


def dataset_folders(root: Path) -> list[Path]:
    """``root`` when it holds a ``dataset.json``, else its sub-folders that do."""
    if (root / "dataset.json").is_file():
        return [root]
    folders = sorted(p for p in root.iterdir() if (p / "dataset.json").is_file()) if root.is_dir() else []
    if not folders:
        raise VlsegError(f"{root}: no dataset.json in it or in its sub-folders")
    return folders


@contextlib.contextmanager
def captured_stdout(sink: list[str]):
    """Everything written to file descriptor 1 inside the block, nnU-Net's worker processes included (they print
    their findings themselves), appended to ``sink`` as lines."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+") as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            sink.extend(tmp.read().splitlines())


def verify(folder: Path, processes: int = 1) -> tuple[bool, str]:
    """(passed, nnU-Net's complaint or its warnings) for one dataset folder."""
    try:
        from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    except ImportError as exc:
        raise VlsegError(f"nnunetv2 is not importable ({exc}); it comes with the dev extra") from None
    printed: list[str] = []
    try:
        with captured_stdout(printed):
            verify_dataset_integrity(str(folder), processes)
    except (AssertionError, RuntimeError, FileNotFoundError, StopIteration) as exc:
        found = [line for line in printed if line.startswith(("Error", "Warning"))]
        return False, " ".join(f"{type(exc).__name__}: {exc} {' '.join(found)}".split())
    warnings = [line for line in printed if line.startswith(("Warning", "WARNING"))]
    return True, "; ".join(warnings)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.verify_nnunet", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a dataset folder, or a folder of them (e.g. data/real/raw)")
    args = parser.parse_args(argv)

    def go():
        failed = 0
        for folder in dataset_folders(args.root):
            passed, note = verify(folder)
            failed += not passed
            print(f"{'PASS' if passed else 'FAIL'} {folder}" + (f": {note}" if note else ""), flush=True)
        if failed:
            raise VlsegError(f"{args.root}: {failed} dataset(s) fail nnU-Net's verify_dataset_integrity")

    return run_guarded(go)


if __name__ == "__main__":
    raise SystemExit(main())
