"""The preprocessing cache on real files: spacing plans, cached arrays equal to the direct computation, boxes and
foreground coordinates, crops read from the memory maps, idempotence and invalidation, atomic writes, per-case errors,
verification, the command line, and parallel runs giving the same bytes."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import vlseg.prepare.cache.build as pp
from data_prep.preprocess import main as cli
from vlseg.errors import VlsegError, split_error
from vlseg.io.scan import load_label, load_scan
from vlseg.prepare.cache.build import preprocess_corpus
from vlseg.prepare.cache.keys import FORMAT_VERSION, RERUN, case_dir, case_key, default_cache_dir
from vlseg.prepare.cache.plan import plan_corpus, plan_spacing
from vlseg.prepare.cache.read import CachedCase, open_cache
from vlseg.prepare.cache.verify import verify_corpus
from vlseg.prepare.manifest import Case, read_manifest, write_manifest
from vlseg.transforms.frame import to_model_frame
from vlseg.transforms.intensity import CT_WINDOW, normalize_intensity
from vlseg.transforms.spatial import resample_to_spacing

REPO = Path(__file__).resolve().parents[2]
SETTINGS = {"ct_window": [-200.0, 300.0], "target_spacing": None, "spacing_per_dataset": {}}
FILES = ("image.npy", "label.npy", "foreground.npz", "meta.json")


def _copy_cases(cases: list[Case], dst: Path) -> list[Case]:
    """The cases with their files copied under ``dst`` (tests change sources without touching the shared corpus)."""
    out = []
    for c in cases:
        folder = dst / "raw" / c.case_id
        folder.mkdir(parents=True)
        image, label = folder / "image.nii.gz", folder / "label.nii.gz"
        shutil.copyfile(c.image, image)
        shutil.copyfile(c.label, label)
        out.append(dataclasses.replace(c, image=image, label=label))
    return out


def _mtimes(cache: Path, case: Case) -> dict[str, int]:
    return {f: (case_dir(cache, case) / f).stat().st_mtime_ns for f in FILES}


def _save(path: Path, arr: np.ndarray, spacing=(2.0, 2.0, 2.0)) -> Path:
    nib.save(nib.Nifti1Image(arr, np.diag([*spacing, 1.0])), path)
    return path


def _tiny_case(folder: Path, case_id: str, image: np.ndarray, label: np.ndarray) -> Case:
    folder.mkdir(parents=True, exist_ok=True)
    return Case(case_id=case_id, dataset="Tiny", modality="CT",
                image=_save(folder / f"{case_id}_0000.nii.gz", image.astype(np.float32)),
                label=_save(folder / f"{case_id}.nii.gz", label.astype(np.uint8)),
                classes={"liver": [1]}, present={"liver": bool((label == 1).any())}, shape=image.shape,
                spacing=(2.0, 2.0, 2.0), split="train")


def _tiny_arrays(shape=(12, 12, 10)):
    image = np.linspace(-300, 400, int(np.prod(shape)), dtype=np.float32).reshape(shape)
    label = np.zeros(shape, np.uint8)
    label[3:8, 4:9, 2:6] = 1
    return image, label


# ------------------------------------------------------------------------------------------------------------ plans


def test_plan_spacing_median_and_anisotropy_rule():
    assert plan_spacing([(1, 1, 1), (2, 2, 2), (3, 3, 4)]) == (2.0, 2.0, 2.0)
    assert plan_spacing([(0.8, 0.8, 2.0), (0.9, 0.8, 2.2)]) == pytest.approx((0.85, 0.8, 2.1))  # 2.1/0.8 < 3
    # anisotropic: z median 5 > 3 x 0.7, so z takes its 10th percentile (a few thin-slice cases pull it down)
    z = [5.0, 5.0, 5.0, 1.5, 6.0, 5.0]
    planned = plan_spacing([(0.7, 0.7, v) for v in z])
    assert planned[:2] == (0.7, 0.7)
    assert planned[2] == pytest.approx(np.percentile(z, 10)) and planned[2] < np.median(z)
    # the coarse axis need not be z
    assert plan_spacing([(4.0, 1.0, 1.0), (6.0, 1.0, 1.0)])[0] == pytest.approx(np.percentile([4.0, 6.0], 10))
    for bad in ([], [(1.0, 1.0)], [(1.0, 0.0, 1.0)], [(1.0, float("nan"), 1.0)]):
        with pytest.raises(VlsegError, match="plan_spacing"):
            plan_spacing(bad)


def test_plan_corpus_modes(phantom_corpus):
    cases = read_manifest(phantom_corpus)
    datasets = {c.dataset for c in cases}
    assert plan_corpus(cases, SETTINGS) == {d: None for d in datasets}  # None: each case keeps its native grid
    assert plan_corpus(cases, {**SETTINGS, "target_spacing": "auto"}) == {d: [4.0, 4.0, 4.0] for d in datasets}
    fixed = plan_corpus(cases, {**SETTINGS, "target_spacing": [2, 2, 3],
                                "spacing_per_dataset": {"PhantomKidney": [5, 5, 5], "NotInThisSplit": [1, 1, 1]}})
    assert fixed["PhantomKidney"] == [5.0, 5.0, 5.0] and fixed["PhantomLiver"] == [2.0, 2.0, 3.0]
    assert "NotInThisSplit" not in fixed
    # "auto" plans each dataset from its training-split cases
    liver = [c for c in cases if c.dataset == "PhantomLiver"]
    odd = [dataclasses.replace(c, spacing=(1.0, 1.0, 1.0) if c.split == "train" else (9.0, 9.0, 9.0)) for c in liver]
    assert plan_corpus(odd, {**SETTINGS, "target_spacing": "auto"}) == {"PhantomLiver": [1.0, 1.0, 1.0]}
    with pytest.raises(VlsegError, match="target_spacing"):
        plan_corpus(cases, {**SETTINGS, "target_spacing": "median"})
    with pytest.raises(VlsegError, match="target_spacing"):
        plan_corpus(cases, {**SETTINGS, "target_spacing": [1, 1]})
    with pytest.raises(VlsegError, match="spacing_per_dataset.PhantomLiver"):
        plan_corpus(cases, {**SETTINGS, "spacing_per_dataset": {"PhantomLiver": [1, -1, 1]}})
    with pytest.raises(VlsegError, match="ct_window"):
        plan_corpus(cases, {**SETTINGS, "ct_window": [300, -200]})
    assert default_cache_dir(phantom_corpus) == phantom_corpus.parent / "cache"


# ------------------------------------------------------------------------------------------------- cache content


def test_cached_arrays_equal_direct_computation(phantom_corpus, tmp_path):
    cases = [c for c in read_manifest(phantom_corpus, split="train") if c.case_id.endswith("_000")]
    settings = {**SETTINGS, "ct_window": [-150.0, 250.0], "target_spacing": [3.0, 5.0, 4.0]}
    report = preprocess_corpus(cases, tmp_path / "cache", settings, workers=0, progress=False)
    assert report["written"] == [c.case_id for c in cases] and not report["errors"] and not report["skipped"]
    assert json.loads((tmp_path / "cache" / "report.json").read_text())["written"] == report["written"]
    plan = json.loads((tmp_path / "cache" / "plan.json").read_text())
    assert plan["spacing"] == {c.dataset: [3.0, 5.0, 4.0] for c in cases}
    assert plan["settings"]["ct_window"] == [-150.0, 250.0]

    for case, cc in zip(cases, open_cache(cases, tmp_path / "cache", settings)):
        scan = load_scan(case.image)
        image = resample_to_spacing(normalize_intensity(scan.data, "CT", (-150.0, 250.0)), scan.spacing,
                                    [3.0, 5.0, 4.0], order=1)
        label = resample_to_spacing(load_label(case.label, like=scan), scan.spacing, [3.0, 5.0, 4.0], order=0)
        assert isinstance(cc, CachedCase) and cc.case is case
        assert isinstance(cc.image, np.memmap) and isinstance(cc.label, np.memmap)
        assert cc.image.dtype == np.float16 and cc.label.dtype == np.uint8
        assert cc.shape == image.shape == (53, 32, 32) and cc.spacing == (3.0, 5.0, 4.0)
        np.testing.assert_allclose(np.asarray(cc.image, np.float32), image, atol=1e-3)  # float16 rounding
        assert np.array_equal(cc.label, label)
        meta = json.loads((case_dir(tmp_path / "cache", case) / "meta.json").read_text())
        assert meta["classes"] == case.classes and meta["format"] == FORMAT_VERSION and len(meta["key"]) == 64
        for name, values in case.classes.items():
            mask = np.isin(label, values)
            if not mask.any():
                assert name not in cc.boxes and name not in cc.foreground
                continue
            where = np.argwhere(mask)
            assert cc.boxes[name] == [*map(int, where.min(0)), *map(int, where.max(0) + 1)] == meta["boxes"][name]
            assert cc.voxels[name] == meta["voxels"][name] == int(mask.sum())
            coords = cc.foreground[name]
            assert coords.dtype == np.int16 and coords.shape == (int(mask.sum()), 3)  # all of them: < 20 000
            assert np.array_equal(coords, where)  # every voxel once, in C order
            assert np.array_equal(cc.class_mask(label, name), mask)
        assert set(cc.boxes) and set(cc.boxes) == set(cc.foreground)


def test_foreground_sample_is_capped_and_deterministic(phantom_corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(pp, "MAX_FOREGROUND", 100)
    case = read_manifest(phantom_corpus, split="train")[0]
    runs = []
    for name in ("a", "b"):
        preprocess_corpus([case], tmp_path / name, SETTINGS, workers=0, progress=False)
        runs.append(open_cache([case], tmp_path / name, SETTINGS)[0])
    label = np.asarray(runs[0].label)
    assert runs[0].voxels["liver"] > 100  # the phantom liver is larger: a sample is drawn
    for name, coords in runs[0].foreground.items():
        assert coords.shape == (min(100, runs[0].voxels[name]), 3)
        assert np.array_equal(coords, runs[1].foreground[name])
        assert len(np.unique(coords, axis=0)) == len(coords)  # without replacement
        assert runs[0].class_mask(label[tuple(coords.T)], name).all()


def test_crop_reads_regions_and_pads_outside(phantom_corpus, tmp_path):
    case = read_manifest(phantom_corpus, split="train")[0]
    preprocess_corpus([case], tmp_path / "cache", SETTINGS, workers=0, progress=False)
    cc = open_cache([case], tmp_path / "cache", SETTINGS)[0]
    full_img, full_lab = np.asarray(cc.image, np.float32), np.asarray(cc.label)
    assert cc.fill == float(full_img.min()) == -1.0  # CT clipped at the window's low end

    img, lab = cc.crop([2, 3, 1], [10, 9, 8])
    assert img.dtype == np.float32 and img.shape == lab.shape == (10, 9, 8)
    assert np.array_equal(img, full_img[2:12, 3:12, 1:9]) and np.array_equal(lab, full_lab[2:12, 3:12, 1:9])

    # hanging over the low corner in x and y and the high end in z: the same as slicing a padded copy
    padded_img = np.pad(full_img, 8, constant_values=cc.fill)
    padded_lab = np.pad(full_lab, 8, constant_values=0)
    starts, size = [-4, -2, cc.shape[2] - 3], [8, 8, 8]
    img, lab = cc.crop(starts, size)
    sl = tuple(slice(s + 8, s + 8 + n) for s, n in zip(starts, size))
    assert np.array_equal(img, padded_img[sl]) and np.array_equal(lab, padded_lab[sl])
    assert (img[:4] == cc.fill).all() and (lab[:, :, 3:] == 0).all()

    img, lab = cc.crop([100, 0, 0], [4, 4, 4])  # entirely outside
    assert (img == cc.fill).all() and not lab.any()
    name = next(iter(cc.boxes))
    x0, y0, z0, x1, y1, z1 = cc.boxes[name]
    _, lab = cc.crop([x0, y0, z0], [x1 - x0, y1 - y0, z1 - z0])
    assert cc.class_mask(lab, name).sum() == cc.voxels[name]
    with pytest.raises(VlsegError, match="does not annotate"):
        cc.class_mask(lab, "brain")


def test_cached_image_is_the_inference_frame_in_float16(phantom_corpus, tmp_path):
    case = read_manifest(phantom_corpus, split="train")[0]
    settings = {**SETTINGS, "target_spacing": [3.0, 5.0, 4.0]}
    preprocess_corpus([case], tmp_path / "cache", settings, workers=0, progress=False)
    (cc,) = open_cache([case], tmp_path / "cache", settings)
    scan = load_scan(case.image)
    image, frame = to_model_frame(scan, case.modality, CT_WINDOW, [3.0, 5.0, 4.0])  # what Segmenter computes
    assert cc.shape == frame.shape and cc.spacing == frame.spacing
    assert np.array_equal(np.asarray(cc.image), image.astype(np.float16))
    assert np.array_equal(cc.label, frame.label(load_label(case.label, like=scan)))


# ------------------------------------------------------------------------------------------- idempotence, staleness


def test_key_is_the_documented_hash_so_existing_caches_stay_valid(tmp_path):
    """The key of format 2, spelled out: a change to what it covers invalidates every cache already built."""
    ct = _tiny_case(tmp_path, "Tiny_000", *_tiny_arrays())
    mr = dataclasses.replace(ct, modality="mri", classes={"liver": [1], "cyst": [2, 3]})

    def documented(case, modality, spacing, window):
        settings = {"modality": modality, "spacing": spacing,
                    "classes": {k: v for k, v in sorted(case.classes.items())}}
        if window is not None:
            settings["ct_window"] = window
        sources = [[role, os.path.abspath(p), p.stat().st_size, p.stat().st_mtime_ns]
                   for role, p in (("image", case.image), ("label", case.label))]
        text = json.dumps({"format": 2, "settings": settings, "sources": sources}, sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    assert FORMAT_VERSION == 2
    assert case_key(ct, None, SETTINGS) == documented(ct, "CT", None, [-200.0, 300.0])
    assert case_key(ct, None, {}) == case_key(ct, None, SETTINGS)  # the default window is the config's
    assert case_key(ct, [2, 3, 4], {"ct_window": [-100, 200]}) == documented(ct, "CT", [2.0, 3.0, 4.0],
                                                                             [-100.0, 200.0])
    assert case_key(mr, [2, 2, 2], SETTINGS) == documented(mr, "MR", [2.0, 2.0, 2.0], None)
    assert case_key(mr, [2, 2, 2], {"ct_window": [0, 1]}) == case_key(mr, [2, 2, 2], SETTINGS)  # CT only


def test_rerun_skips_and_changes_rewrite(phantom_corpus, tmp_path):
    a, b = _copy_cases([c for c in read_manifest(phantom_corpus, split="train") if c.case_id.endswith("_000")][:2],
                       tmp_path)
    cache = tmp_path / "cache"
    assert preprocess_corpus([a, b], cache, SETTINGS, workers=0, progress=False)["written"] == [a.case_id, b.case_id]
    before = {c.case_id: _mtimes(cache, c) for c in (a, b)}

    again = preprocess_corpus([a, b], cache, SETTINGS, workers=0, progress=False)
    assert again["skipped"] == [a.case_id, b.case_id] and not again["written"]
    assert {c.case_id: _mtimes(cache, c) for c in (a, b)} == before  # not rewritten

    # another CT window: the cache no longer fits; opening it says so in one line, a run rewrites both cases
    window = {**SETTINGS, "ct_window": [-100.0, 200.0]}
    with pytest.raises(VlsegError) as err:
        open_cache([a, b], cache, window)
    message = str(err.value)
    assert "\n" not in message and a.case_id in message and "2 of 2" in message
    assert "vlseg prepare cache" in message
    assert preprocess_corpus([a, b], cache, window, workers=0, progress=False)["written"] == [a.case_id, b.case_id]
    np.testing.assert_allclose(open_cache([a], cache, window)[0].image.max(), 1.0, atol=1e-3)

    # another spacing rewrites too
    spaced = {**window, "spacing_per_dataset": {a.dataset: [5.0, 5.0, 5.0]}}
    assert preprocess_corpus([a, b], cache, spaced, workers=0, progress=False)["written"] == [a.case_id]
    assert open_cache([a], cache, spaced)[0].shape == (32, 32, 26)

    # touching a source rewrites that case only
    st = b.image.stat()
    os.utime(b.image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert preprocess_corpus([a, b], cache, spaced, workers=0, progress=False)["written"] == [b.case_id]

    # replacing the label (same grid, new content) rewrites and the cache shows the new content
    lab_img = nib.load(b.label)
    new = np.zeros(lab_img.shape, np.uint8)
    new[1:4, 2:6, 3:5] = b.classes[next(iter(b.classes))][0]
    tmp = b.label.with_name("new.nii.gz")
    nib.save(nib.Nifti1Image(new, lab_img.affine, lab_img.header), tmp)
    os.replace(tmp, b.label)
    assert preprocess_corpus([a, b], cache, spaced, workers=0, progress=False)["written"] == [b.case_id]
    assert int(open_cache([b], cache, spaced)[0].label.astype(bool).sum()) == 3 * 4 * 2

    # a cache file deleted behind its back: open_cache refuses it, the next run rewrites it
    (case_dir(cache, a) / "label.npy").unlink()
    with pytest.raises(VlsegError, match=f"{a.case_id}.*1 of 2"):
        open_cache([a, b], cache, spaced)
    assert preprocess_corpus([a, b], cache, spaced, workers=0, progress=False)["written"] == [a.case_id]
    assert len(open_cache([a, b], cache, spaced)) == 2


def test_open_cache_on_missing_cache_is_one_line(phantom_corpus, tmp_path):
    cases = read_manifest(phantom_corpus, split="train")
    with pytest.raises(VlsegError) as err:
        open_cache(cases, tmp_path / "nothing", SETTINGS)
    message = str(err.value)
    assert "\n" not in message and cases[0].case_id in message and f"{len(cases)} of {len(cases)}" in message
    assert "vlseg prepare cache" in message


def test_case_writes_are_atomic(phantom_corpus, tmp_path, monkeypatch):
    case = _copy_cases(read_manifest(phantom_corpus, split="train")[:1], tmp_path)[0]
    cache = tmp_path / "cache"
    folder = case_dir(cache, case)
    # a folder left by a crashed process (whose pid no longer runs) is cleaned up by the next write of the case
    dead = 2**22 + 12345
    with pytest.raises(ProcessLookupError):
        os.kill(dead, 0)
    (folder.parent / f".{case.case_id}.tmp{dead}-abc").mkdir(parents=True)

    real_savez = np.savez

    def crash(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", crash)  # fails after image.npy and label.npy are written
    report = preprocess_corpus([case], cache, SETTINGS, workers=0, progress=False)
    assert report["errors"] == [{"case": case.case_id, "file": str(folder),
                                 "problem": "cannot write the cache entry (No space left on device)"}]
    assert not folder.exists() and os.listdir(folder.parent) == []  # neither half a case nor temporary folders

    monkeypatch.setattr(np, "savez", real_savez)
    assert preprocess_corpus([case], cache, SETTINGS, workers=0, progress=False)["written"] == [case.case_id]
    before = (folder / "image.npy").read_bytes()
    monkeypatch.setattr(np, "savez", crash)
    window = {**SETTINGS, "ct_window": [-100.0, 100.0]}
    assert preprocess_corpus([case], cache, window, workers=0, progress=False)["errors"]
    assert (folder / "image.npy").read_bytes() == before  # the old complete entry is still there
    assert sorted(os.listdir(folder.parent)) == [case.case_id]
    assert len(open_cache([case], cache, SETTINGS)) == 1


# ---------------------------------------------------------------------------------------------- errors, verify, CLI


def test_bad_cases_are_reported_and_the_others_cached(phantom_corpus, tmp_path):
    good = _copy_cases(read_manifest(phantom_corpus, split="train")[:1], tmp_path)
    image, label = _tiny_arrays()
    nan_image = image.copy()
    nan_image[2, 3, 4] = np.nan
    nan_case = _tiny_case(tmp_path / "tiny", "Tiny_nan", nan_image, label)
    grid_case = _tiny_case(tmp_path / "tiny", "Tiny_grid", image, label)
    _save(grid_case.label, label[:, :, :8])  # the label on another grid
    missing = dataclasses.replace(_tiny_case(tmp_path / "tiny", "Tiny_missing", image, label),
                                  image=tmp_path / "tiny" / "nowhere.nii.gz")
    cases = [nan_case, *good, grid_case, missing]
    manifest = write_manifest(tmp_path / "manifest.jsonl", cases)
    cache = tmp_path / "cache"

    report = preprocess_corpus(cases, cache, SETTINGS, workers=0, progress=False)
    assert report["written"] == [good[0].case_id]
    errors = {e["case"]: e for e in report["errors"]}
    assert list(errors) == ["Tiny_nan", "Tiny_grid", "Tiny_missing"]
    assert errors["Tiny_nan"]["file"] == str(nan_case.image)
    assert errors["Tiny_nan"]["problem"] == "1 voxels are NaN or infinite"
    assert errors["Tiny_grid"]["file"] == str(grid_case.label)
    assert errors["Tiny_grid"]["problem"].startswith("label grid does not match image")
    assert errors["Tiny_missing"] == {"case": "Tiny_missing", "file": str(missing.image), "problem": "file not found"}
    assert json.loads((cache / "report.json").read_text())["errors"] == report["errors"]
    assert len(open_cache(good, cache, SETTINGS)) == 1
    assert not case_dir(cache, nan_case).exists() and not case_dir(cache, grid_case).exists()

    # the command line: the same errors, one line each, exit status 1
    out = subprocess.run([sys.executable, "-m", "data_prep.preprocess", "--manifest", str(manifest), "--workers", "0",
                          "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 3 and any(str(nan_case.image) in ln and "NaN" in ln for ln in lines)
    assert "Traceback" not in out.stderr
    assert "0 written, 1 up to date, 3 failed" in out.stdout



def test_error_text_read_back_into_file_and_problem():
    assert split_error(VlsegError("/data/a b.nii.gz: 1 voxels are NaN: see above"), "x") == (
        "/data/a b.nii.gz", "1 voxels are NaN: see above")  # at the first ": " only
    assert split_error(VlsegError("workers must be 0 or more"), Path("/img.nii")) == (
        "/img.nii", "workers must be 0 or more")  # names no file
    assert split_error(ValueError(": odd"), "img") == ("img", ": odd")


def test_verify_reports_every_problem(phantom_corpus, tmp_path, capsys):
    a, b, c, d = _copy_cases(read_manifest(phantom_corpus, split="train")[:4], tmp_path)
    cache = tmp_path / "cache"
    preprocess_corpus([a, b, c, d], cache, SETTINGS, workers=0, progress=False)
    assert verify_corpus([a, b, c, d], cache, SETTINGS, workers=0, progress=False) == []

    (case_dir(cache, a) / "image.npy").unlink()  # a deleted cache file
    name = next(iter(b.classes))
    b = dataclasses.replace(b, present={**b.present, name: not b.present[name]})  # a wrong presence flag
    box_name = next(iter(c.boxes))
    c = dataclasses.replace(c, boxes={**c.boxes, box_name: [0, 0, 0, 1, 1, 1]})  # a wrong box
    st = d.label.stat()
    os.utime(d.label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the cache entry of d is now out of date
    problems = verify_corpus([a, b, c, d], cache, SETTINGS, workers=0, progress=False)
    by_case = {}
    for p in problems:
        assert set(p) == {"case", "file", "problem"}
        by_case.setdefault(p["case"], []).append(p)
    assert set(by_case) == {a.case_id, b.case_id, c.case_id, d.case_id}
    assert by_case[a.case_id] == [{"case": a.case_id, "file": str(case_dir(cache, a) / "image.npy"),
                                   "problem": f"missing from the cache entry ({RERUN})"}]
    assert [p["file"] for p in by_case[b.case_id]] == [str(b.label)]
    assert f"manifest says {name!r} is" in by_case[b.case_id][0]["problem"]
    assert [p["file"] for p in by_case[c.case_id]] == [str(c.label)]
    assert f"manifest box of {box_name!r} is [0, 0, 0, 1, 1, 1]" in by_case[c.case_id][0]["problem"]
    assert [p["file"] for p in by_case[d.case_id]] == [str(case_dir(cache, d) / "meta.json")]
    assert "out of date" in by_case[d.case_id][0]["problem"]

    # the command line prints every problem, one line each, and exits 1; a broken raw file is one more problem
    manifest = write_manifest(tmp_path / "manifest.jsonl", [a, b, c, d])
    a.image.write_bytes(b"not a nifti")
    capsys.readouterr()
    assert cli(["--manifest", str(manifest), "--cache", str(cache), "--verify", "--workers", "2",
                "--no-progress"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == len(problems) + 2  # a's image: unreadable, and (its size changed) the entry out of date
    assert any(ln.startswith(f"{a.image}: not a NIfTI image") and f"(case {a.case_id})" in ln for ln in out)
    assert not list(cache.glob("*/.*"))  # --verify wrote nothing


def test_cli_settings_from_config_and_bad_input(phantom_corpus, tmp_path, capsys):
    cases = [c for c in read_manifest(phantom_corpus, split="train") if c.case_id.endswith("_000")][:2]
    cases = _copy_cases(cases, tmp_path)
    manifest = write_manifest(tmp_path / "corpus" / "manifest.jsonl", cases)
    config = tmp_path / "exp.yaml"
    config.write_text("data:\n  ct_window: [-100, 150]\n  spacing_per_dataset: {%s: [5, 5, 5]}\n" % cases[0].dataset)
    settings = {"ct_window": [-100.0, 150.0], "target_spacing": None,
                "spacing_per_dataset": {cases[0].dataset: [5.0, 5.0, 5.0]}}
    assert cli(["--manifest", str(manifest), "--config", str(config), "--workers", "0", "--no-progress"]) == 0
    cached = open_cache(cases, default_cache_dir(manifest), settings)  # the cache the config asks for
    assert cached[0].spacing == (5.0, 5.0, 5.0) and cached[1].spacing == (4.0, 4.0, 4.0)
    assert cli(["--manifest", str(manifest), "--config", str(config), "--verify", "--workers", "0",
                "--no-progress"]) == 0
    # key=value overrides change the settings: the default cache is now out of date
    assert cli(["--manifest", str(manifest), "--config", str(config), "--verify", "--workers", "0", "--no-progress",
                "data.ct_window=[-50,50]"]) == 1
    capsys.readouterr()

    for args, expected in (([], f"{tmp_path / 'missing.jsonl'}: manifest not found"),
                           (["--workers", "-1"], "--workers: must be 0 or more")):
        target = tmp_path / "missing.jsonl" if not args else manifest
        assert cli(["--manifest", str(target), *args, "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: {expected}" or err.startswith(f"error: {expected}"), err
        assert "\n" not in err


def test_parallel_run_writes_the_same_bytes(phantom_corpus, tmp_path):
    cases = read_manifest(phantom_corpus, split="train")[:4]
    settings = {**SETTINGS, "target_spacing": [3.0, 3.5, 5.0]}
    serial = preprocess_corpus(cases, tmp_path / "serial", settings, workers=0, progress=False)
    parallel = preprocess_corpus(cases, tmp_path / "parallel", settings, workers=2, progress=False)
    assert serial["written"] == parallel["written"] == [c.case_id for c in cases]
    for case in cases:
        for f in FILES:
            assert (case_dir(tmp_path / "serial", case) / f).read_bytes() == \
                   (case_dir(tmp_path / "parallel", case) / f).read_bytes(), (case.case_id, f)
    assert preprocess_corpus(cases, tmp_path / "parallel", settings, workers=2, progress=False)["skipped"] == \
        [c.case_id for c in cases]
