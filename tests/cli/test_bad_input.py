"""Bad input: one line naming the file and the problem, a non-zero exit, nothing written."""

import gzip
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


def _predict(model, scan, out, prompts=("liver",)):
    args = [sys.executable, "-m", "vlseg.cli", "predict", "-m", str(model), "-i", str(scan), "-o", str(out)]
    for p in prompts:
        args += ["-p", p]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=REPO)


def _good_scan(folder: Path, shape=(20, 20, 16)) -> Path:
    path = folder / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)), path)
    return path


def _cases(folder: Path) -> dict:
    good = _good_scan(folder)
    truncated = folder / "truncated.nii.gz"
    blob = good.read_bytes()
    truncated.write_bytes(blob[: len(blob) // 2])
    garbage = folder / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"this is not a nifti file at all" * 20))
    plain_garbage = folder / "plain.nii"
    plain_garbage.write_bytes(b"\x00\x01 not nifti" * 50)
    flat = folder / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20), np.int16), np.eye(4)), flat)
    four_d = folder / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 8, 3), np.int16), np.eye(4)), four_d)
    nan = folder / "nan.nii.gz"
    arr = np.zeros((10, 10, 8), np.float32)
    arr[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(arr, np.eye(4)), nan)
    not_dicom = folder / "not_dicom"  # neither a series nor a folder of scans (vlseg predict takes those too)
    not_dicom.mkdir(exist_ok=True)
    (not_dicom / "notes.txt").write_text("hello")
    return {
        "missing": (folder / "missing.nii.gz", "file not found"),
        "directory": (not_dicom, "no DICOM series found"),
        "truncated": (truncated, "truncated or corrupt"),
        "garbage": (garbage, "not a NIfTI"),
        "plain_garbage": (plain_garbage, "not a NIfTI"),
        "2d": (flat, "not a 3D image (shape 20x20)"),
        "4d": (four_d, "not a 3D image (shape 10x10x8x3)"),
        "nan": (nan, "1 voxels are NaN or infinite"),
    }


def test_bad_scans_fail_cleanly_through_the_cli(tiny_run, tmp_path):
    for name, (path, problem) in _cases(tmp_path).items():
        out_dir = tmp_path / f"out_{name}"
        res = _predict(tiny_run, path, out_dir)
        assert res.returncode == 2, (name, res.stderr[-1500:])
        lines = res.stderr.strip().splitlines()
        assert lines == [f"error: {path}: {problem}"] or (len(lines) == 1 and str(path) in lines[0]
                                                          and problem in lines[0]), (name, res.stderr)
        assert "Traceback" not in res.stderr
        assert not out_dir.exists(), name


def test_bad_scans_raise_vlseg_errors_in_python(tmp_path):
    from vlseg.errors import VlsegError
    from vlseg.io.scan import load_scan

    for name, (path, problem) in _cases(tmp_path).items():
        with pytest.raises(VlsegError) as err:
            load_scan(path)
        assert str(path) in str(err.value) and problem in str(err.value), name


@pytest.mark.parametrize("prompts,problem", [((), "no prompt given"), (("liver", "  "), "prompt 2 is blank")])
def test_bad_prompts(tiny_run, tmp_path, prompts, problem):
    res = _predict(tiny_run, _good_scan(tmp_path), tmp_path / "out", prompts)
    assert res.returncode == 2 and res.stderr.strip().startswith("error: ") and problem in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_unreadable_checkpoints(tiny_run, tmp_path):
    import shutil

    scan = _good_scan(tmp_path)
    res = _predict(tmp_path / "no_such_run", scan, tmp_path / "out")
    assert res.returncode == 2 and "no_such_run: checkpoint not found" in res.stderr

    broken = tmp_path / "broken"
    shutil.copytree(tiny_run, broken)
    ckpt = sorted(broken.glob("checkpoint-*"))[-1]
    (ckpt / "model.safetensors").write_bytes(b"garbage")
    res = _predict(broken, scan, tmp_path / "out")
    assert res.returncode == 2 and "model.safetensors: unreadable weights" in res.stderr

    (ckpt / "vlseg.json").write_text("{not json")
    res = _predict(broken, scan, tmp_path / "out")
    assert res.returncode == 2 and "vlseg.json: unreadable checkpoint metadata" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_label_grid_mismatch_is_reported(tmp_path):
    from vlseg.errors import VlsegError
    from vlseg.io.scan import load_label, load_scan

    scan = load_scan(_good_scan(tmp_path))
    lab = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 15), np.uint8), np.eye(4)), lab)
    with pytest.raises(VlsegError, match="label.nii.gz: label grid"):
        load_label(lab, like=scan)
