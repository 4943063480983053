"""The preprocessing cache: spacing plans, arrays equal to direct computation, crops reading regions, idempotence and
invalidation, per-case errors, --verify, and the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from vlseg.data.manifest import read_manifest, write_manifest
from vlseg.data.preprocess import (case_dir, open_cache, plan_corpus, plan_spacing, preprocess_corpus,
                                   verify_corpus)
from vlseg.errors import VlsegError
from vlseg.io import load_label, load_scan, normalize_intensity, resample_to_spacing

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"ct_window": [-200.0, 300.0], "target_spacing": None, "spacing_per_dataset": {}}


def test_plan_spacing_median_and_anisotropy_rule():
    assert plan_spacing([(1, 1, 1), (2, 2, 2), (3, 3, 3)]) == (2.0, 2.0, 2.0)
    # anisotropic: coarse axis median 5 > 3 x 0.7 → its 10th percentile instead of the median
    spacings = [(0.7, 0.7, 5.0), (0.7, 0.7, 5.0), (0.7, 0.7, 2.5), (0.7, 0.7, 6.0)]
    planned = plan_spacing(spacings)
    assert planned[:2] == (0.7, 0.7)
    assert planned[2] == pytest.approx(np.percentile([5.0, 5.0, 2.5, 6.0], 10))
    with pytest.raises(VlsegError):
        plan_spacing([])


def test_plan_corpus_modes(phantom_corpus):
    cases = read_manifest(phantom_corpus)
    datasets = {c.dataset for c in cases}
    assert set(plan_corpus(cases, SETTINGS).values()) == {None}
    auto = plan_corpus(cases, {**SETTINGS, "target_spacing": "auto"})
    assert all(v == [4.0, 4.0, 4.0] for v in auto.values()) and set(auto) == datasets
    fixed = plan_corpus(cases, {**SETTINGS, "target_spacing": [2, 2, 3],
                                "spacing_per_dataset": {"PhantomKidney": [5, 5, 5]}})
    assert fixed["PhantomKidney"] == [5.0, 5.0, 5.0] and fixed["PhantomLiver"] == [2.0, 2.0, 3.0]
    with pytest.raises(VlsegError, match="NoSuch"):
        plan_corpus(cases, {**SETTINGS, "spacing_per_dataset": {"NoSuch": [1, 1, 1]}})
    with pytest.raises(VlsegError, match="target_spacing"):
        plan_corpus(cases, {**SETTINGS, "target_spacing": "median"})


def test_cached_arrays_equal_direct_computation_and_crops_read_regions(phantom_corpus, tmp_path):
    cases = read_manifest(phantom_corpus, split="train")[:2]
    settings = {**SETTINGS, "target_spacing": [3.0, 5.0, 4.0]}
    report = preprocess_corpus(cases, tmp_path / "cache", settings, workers=0, progress=False)
    assert sorted(report["written"]) == sorted(c.case_id for c in cases) and not report["errors"]
    cached = open_cache(cases, tmp_path / "cache", settings)
    for case, cc in zip(cases, cached):
        scan = load_scan(case.image)
        image = resample_to_spacing(normalize_intensity(scan.data, case.modality, (-200, 300)), scan.spacing,
                                    [3.0, 5.0, 4.0], order=1)
        label = resample_to_spacing(load_label(case.label, like=scan), scan.spacing, [3.0, 5.0, 4.0], order=0)
        assert cc.image.dtype == np.float16 and isinstance(cc.image, np.memmap)
        np.testing.assert_allclose(np.asarray(cc.image, np.float32), image, atol=2e-3)
        assert np.array_equal(cc.label, label) and cc.spacing == (3.0, 5.0, 4.0)
        for name, values in case.classes.items():
            mask = np.isin(label, values)
            if not mask.any():
                assert name not in cc.boxes
                continue
            where = np.argwhere(mask)
            assert cc.boxes[name] == [*where.min(0), *(where.max(0) + 1)]
            assert mask[tuple(cc.foreground[name].T)].all()
        # a crop inside, and one hanging over the corner (padded: image minimum, label 0)
        img, lab = cc.crop([2, 3, 1], [10, 9, 8])
        assert np.array_equal(img, np.asarray(cc.image[2:12, 3:12, 1:9], np.float32))
        assert np.array_equal(lab, cc.label[2:12, 3:12, 1:9])
        img, lab = cc.crop([-4, -2, cc.shape[2] - 3], [8, 8, 8])
        assert np.array_equal(img[4:, 2:, :3], np.asarray(cc.image[:4, :6, -3:], np.float32))
        assert (img[:4] == -1.0).all() and (lab[:, :, 3:] == 0).all()


def test_rerun_skips_and_changes_invalidate(phantom_corpus, tmp_path):
    cases = read_manifest(phantom_corpus, split="train")[:2]
    cache = tmp_path / "cache"
    preprocess_corpus(cases, cache, SETTINGS, workers=0, progress=False)
    first = case_dir(cache, cases[0]) / "image.npy"
    stamp = first.stat().st_mtime_ns
    again = preprocess_corpus(cases, cache, SETTINGS, workers=0, progress=False)
    assert again["written"] == [] and len(again["skipped"]) == 2 and first.stat().st_mtime_ns == stamp
    # a settings change rewrites every case; the old cache no longer opens under the new settings
    window = {**SETTINGS, "ct_window": [-100.0, 200.0]}
    with pytest.raises(VlsegError, match="out of date.*data_prep.preprocess"):
        open_cache(cases, cache, window)
    assert len(preprocess_corpus(cases, cache, window, workers=0, progress=False)["written"]) == 2
    # touching one source rewrites that case only
    os.utime(cases[1].image, ns=(stamp + 10**9, stamp + 10**9))
    redo = preprocess_corpus(cases, cache, window, workers=0, progress=False)
    assert redo["written"] == [cases[1].case_id] and redo["skipped"] == [cases[0].case_id]


def test_two_workers_write_the_same_bytes(phantom_corpus, tmp_path):
    cases = read_manifest(phantom_corpus, split="train")[:3]
    preprocess_corpus(cases, tmp_path / "a", SETTINGS, workers=0, progress=False)
    preprocess_corpus(cases, tmp_path / "b", SETTINGS, workers=2, progress=False)
    for case in cases:
        for name in ("image.npy", "label.npy"):
            assert (case_dir(tmp_path / "a", case) / name).read_bytes() == \
                   (case_dir(tmp_path / "b", case) / name).read_bytes()


def _broken_corpus(phantom_corpus, tmp_path):
    """Three good cases plus: NaN voxels, a label on another grid, a missing label, an unknown modality."""
    cases = read_manifest(phantom_corpus, split="train")[:3]
    bad = []
    for i, kind in enumerate(("nan", "grid", "missing", "modality")):
        case = read_manifest(phantom_corpus, split="train")[i]
        case.case_id = f"{case.case_id}_{kind}"
        img = nib.load(case.image)
        if kind == "nan":
            data = np.asarray(img.dataobj, np.float32)
            data[1, 1, 1] = np.nan
            case.image = tmp_path / "nan.nii.gz"
            nib.save(nib.Nifti1Image(data, img.affine), case.image)
        elif kind == "grid":
            case.label = tmp_path / "small_label.nii.gz"
            nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), img.affine), case.label)
        elif kind == "missing":
            case.label = tmp_path / "gone.nii.gz"
        else:
            case.modality = "PET"
        bad.append(case)
    manifest = write_manifest(tmp_path / "broken.jsonl", cases + bad)
    return cases, bad, manifest


def test_bad_cases_are_reported_and_the_others_cached(phantom_corpus, tmp_path):
    cases, bad, manifest = _broken_corpus(phantom_corpus, tmp_path)
    report = preprocess_corpus(cases + bad, tmp_path / "cache", SETTINGS, workers=0, progress=False)
    assert sorted(report["written"]) == sorted(c.case_id for c in cases)
    problems = {e["case"]: e for e in report["errors"]}
    assert set(problems) == {c.case_id for c in bad}
    assert "NaN" in problems[bad[0].case_id]["problem"] and problems[bad[0].case_id]["file"].endswith("nan.nii.gz")
    assert "does not match" in problems[bad[1].case_id]["problem"]
    assert problems[bad[2].case_id]["file"].endswith("gone.nii.gz")
    assert "PET" in problems[bad[3].case_id]["problem"]
    assert json.loads((tmp_path / "cache" / "report.json").read_text())["errors"] == report["errors"]
    for case in bad:
        assert not case_dir(tmp_path / "cache", case).exists()  # nothing half-written
    # the command line says the same, one line per case, and exits 1
    out = subprocess.run([sys.executable, "-m", "data_prep.preprocess", "--manifest", str(manifest),
                          "--cache", str(tmp_path / "cli-cache"), "--no-progress"],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 1, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 4 and "Traceback" not in out.stderr
    assert "3 written" in out.stdout


def test_verify_reports_every_problem(phantom_corpus, tmp_path):
    cases = read_manifest(phantom_corpus, split="train")[:3]
    cache = tmp_path / "cache"
    preprocess_corpus(cases, cache, SETTINGS, workers=0, progress=False)
    assert verify_corpus(cases, cache, SETTINGS, workers=0, progress=False) == []
    (case_dir(cache, cases[0]) / "label.npy").unlink()
    name = next(iter(cases[1].classes))
    cases[1].present[name] = not cases[1].present[name]
    manifest = write_manifest(tmp_path / "m.jsonl", cases)
    problems = verify_corpus(read_manifest(manifest), cache, SETTINGS, workers=2, progress=False)
    assert {p["case"] for p in problems} == {cases[0].case_id, cases[1].case_id}
    assert any("label.npy" in p["file"] for p in problems)
    assert any(name in p["problem"] and "present" in p["problem"] for p in problems)
    out = subprocess.run([sys.executable, "-m", "data_prep.preprocess", "--manifest", str(manifest), "--cache",
                          str(cache), "--verify", "--no-progress"], capture_output=True, text=True, cwd=REPO,
                         timeout=300)
    assert out.returncode == 1 and out.stderr.count("problem:") == len(problems)
    assert "2 problem(s)" in out.stdout or f"{len(problems)} problem(s)" in out.stdout
