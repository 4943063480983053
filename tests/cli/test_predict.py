"""vlseg predict: folders of scans with the model loaded once, parts for several processes, one label map, statistics,
mirroring TTA, --fast; every output in the input's own geometry, checked on an oblique, non-RAS scan."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from vlseg.cli.predict import case_name, list_inputs, select_part
from vlseg.errors import VlsegError
from vlseg.infer.result import PromptResult, SegmentationResult
from vlseg.infer.segmenter import Segmenter
from vlseg.infer.stitching import BoxMask
from vlseg.io.scan import load_scan
from vlseg.prepare.manifest import read_manifest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def oblique_scans(phantom_corpus, tmp_path_factory):
    """Two test phantoms stored obliquely (rotated 20° about z, then 10° about x) with an LPI-like axis flip."""
    folder = tmp_path_factory.mktemp("oblique")
    a, b = np.deg2rad(20), np.deg2rad(10)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    for i, case in enumerate(read_manifest(phantom_corpus, split="test")[:2]):
        img = nib.load(case.image)
        affine = np.eye(4)
        affine[:3, :3] = rx @ rz @ np.diag([-3.0, 3.5, -4.0])
        affine[:3, 3] = [100.0, -60.0, 30.0]
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), folder / f"case{i}.nii.gz")
    return folder


def _predict(model, *args):
    return subprocess.run([sys.executable, "-m", "vlseg.cli", "predict", "-m", str(model), *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)


def test_folder_batch_with_a_broken_case_multilabel_and_statistics(tiny_run, oblique_scans, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for f in oblique_scans.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "broken.nii.gz").write_bytes(b"junk")
    out = _predict(tiny_run, "-i", folder, "-o", tmp_path / "out", "-p", "liver", "-p", "Liver Tumours",
                   "--multilabel", "--statistics")
    assert out.returncode == 2
    assert "broken.nii.gz: not a NIfTI image" in out.stderr and "1 of 3 case(s) failed" in out.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["case0", "case1"]  # nothing for the broken one
    assert "(as 'liver tumor': spelling, plural)" in out.stdout or "(as 'liver tumor': plural)" in out.stdout
    for case in ("case0", "case1"):
        src, res = nib.load(oblique_scans / f"{case}.nii.gz"), tmp_path / "out" / case
        for name in ("liver.nii.gz", "liver_tumours.nii.gz", "labels.nii.gz"):
            written = nib.load(res / name)
            assert written.shape == src.shape and np.allclose(written.affine, src.affine, atol=1e-5)
        labels = np.asarray(nib.load(res / "labels.nii.gz").dataobj)
        table = json.loads((res / "labels.json").read_text())
        assert table["rule"] == "overlaps go to the smaller structure"
        assert [row["prompt"] for row in table["labels"]] == ["liver", "Liver Tumours"]
        liver = np.asarray(nib.load(res / "liver.nii.gz").dataobj) > 0
        assert set(np.unique(labels)) <= {0, 1, 2} and (labels[liver] > 0).all() and (labels[~liver] != 1).all()
        report = json.loads((res / "report.json").read_text())
        assert {row["prompt"] for row in report["statistics"]} == {"liver", "Liver Tumours"}
        assert (res / "statistics.csv").read_text().startswith("prompt,class,present,volume_ml")


def test_parts_split_a_folder_disjointly(tmp_path):
    for name in ["b.nii.gz", "a.nii", "c.nrrd", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "series1").mkdir()
    cases = list_inputs(tmp_path)
    assert [c.name for c in cases] == ["a.nii", "b.nii.gz", "c.nrrd", "series1"]
    parts = [select_part(cases, 3, i) for i in range(3)]
    assert sorted(c.name for p in parts for c in p) == [c.name for c in cases] and all(parts)
    assert case_name(Path("x/scan.nii.gz")) == "scan"
    with pytest.raises(VlsegError, match="part-id"):
        select_part(cases, 2, 2)
    dicom = tmp_path / "series1"
    (dicom / "IM0001").write_bytes(b"x")
    assert list_inputs(dicom) is None  # a folder holding a series itself is one scan
    (tmp_path / "a.nrrd").write_bytes(b"x")
    with pytest.raises(VlsegError, match="both be written to 'a'"):
        list_inputs(tmp_path)


def test_num_parts_in_the_cli(tiny_run, oblique_scans, tmp_path):
    out = _predict(tiny_run, "-i", oblique_scans, "-o", tmp_path / "p1", "-p", "liver", "--num-parts", "2",
                   "--part-id", "1", "--no-overlay")
    assert out.returncode == 0, out.stderr[-2000:]
    assert [p.name for p in (tmp_path / "p1").iterdir()] == ["case1"]


def test_label_map_overlap_rule(oblique_scans):
    scan = load_scan(oblique_scans / "case0.nii.gz")
    shape = scan.data.shape
    big = BoxMask(shape, (0, 0, 0), np.ones((6, 6, 6), np.uint8))
    small = BoxMask(shape, (2, 2, 2), np.ones((2, 2, 2), np.uint8))
    results = [PromptResult(p, None, 1.0, True, m, m.sum(), 0.0) for p, m in [("organ", big), ("lesion", small)]]
    labels, table = SegmentationResult(scan, results, 0.0, "").label_map()
    assert labels[3, 3, 3] == 2 and labels[0, 0, 0] == 1 and labels.dtype == np.uint8
    assert table[0]["overlapped_voxels"] == 8 and table[1]["overlapped_voxels"] == 0


def test_tta_and_fast(tiny_run, oblique_scans, tmp_path):
    segmenter = Segmenter.from_pretrained(tiny_run)
    plain = segmenter.segment(oblique_scans / "case0.nii.gz", ["liver"], threshold=0.0, presence_threshold=0.0)
    mirrored = segmenter.segment(oblique_scans / "case0.nii.gz", ["liver"], presence_threshold=0.0, tta=True)
    assert mirrored.extra["tta"] and mirrored.results[0].mask.shape == plain.results[0].mask.shape
    assert mirrored.results[0].presence_probability != plain.results[0].presence_probability
    out = _predict(tiny_run, "-i", oblique_scans / "case1.nii.gz", "-o", tmp_path / "fast", "-p", "liver",
                   "--fast", "--threads", "1", "--no-overlay")
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "fast" / "report.json").read_text())
    base = Segmenter.from_pretrained(tiny_run).config["data"]["inference_spacing"]
    base = base or load_scan(oblique_scans / "case1.nii.gz").spacing  # (a model working on each scan's own grid)
    assert report["working_spacing_mm"] == pytest.approx([1.5 * v for v in base])
    conflict = _predict(tiny_run, "-i", oblique_scans / "case1.nii.gz", "-o", tmp_path / "x", "-p", "liver",
                        "--fast", "--spacing", "4")
    assert conflict.returncode == 2 and "--fast and --spacing" in conflict.stderr


def test_coarse_to_fine(tiny_run, oblique_scans):
    segmenter = Segmenter.from_pretrained(tiny_run)
    scan = oblique_scans / "case0.nii.gz"
    plain = segmenter.segment(scan, ["liver", "spleen"], threshold=0.0, presence_threshold=0.0)
    # Everything found everywhere by the coarse pass: the fine pass covers the whole scan and answers as the plain one.
    both = segmenter.segment(scan, ["liver", "spleen"], threshold=0.0, presence_threshold=0.0, coarse_to_fine=True)
    assert both.extra["coarse_to_fine"] and both.extra["windows"] > plain.extra["windows"]
    for a, b in zip(plain.results, both.results):
        assert np.array_equal(np.asarray(a.mask), np.asarray(b.mask))
        assert a.presence_probability == pytest.approx(b.presence_probability)
    # Nothing found by the coarse pass: no window at the working spacing at all, every mask empty.
    none = segmenter.segment(scan, ["liver", "spleen"], presence_threshold=1.01, coarse_to_fine=True)
    assert 0 < none.extra["windows"] < plain.extra["windows"] and not any(r.present for r in none.results)
    assert all(0 < r.presence_probability < 1 for r in none.results)  # (the coarse pass's verdict is reported)


def test_a_region_limits_the_windows():
    from vlseg.infer.stitching import PromptStitcher

    full = PromptStitcher((100, 100, 40), (32, 32, 16), 0.5, 1)
    part = PromptStitcher((100, 100, 40), (32, 32, 16), 0.5, 1, region=((0, 0, 0), (20, 20, 10)))
    assert len(part.corners) < len(full.corners) and all(c[0] < 20 and c[1] < 20 and c[2] < 10 for c in part.corners)
    probs = torch.full((1, 32, 32, 16), 0.8)
    for corner in part.corners:
        part.add(corner, probs)
    prob = part.probability(0)
    assert prob[5, 5, 5] == pytest.approx(0.8, abs=1e-4) and prob[90, 90, 35] == 0.0


def test_long_prompts_in_the_cli(tiny_run, oblique_scans, tmp_path):
    shared = "liver " * 400
    prompts = [shared + "tumor", shared + "kidney"]
    out = _predict(tiny_run, "-i", oblique_scans / "case0.nii.gz", "-o", tmp_path / "long", "-p", prompts[0],
                   "-p", prompts[1])
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "long" / "report.json").read_text())
    assert [row["prompt"] for row in report["prompts"]] == prompts
    files = [row["file"] for row in report["prompts"]]
    assert files[0] != files[1] and all(len(f) < 120 for f in files)
    assert all((tmp_path / "long" / f).is_file() for f in files) and (tmp_path / "long" / "overlay.png").is_file()


def test_negated_prompts_are_refused_before_any_scan_is_read(tiny_run, tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"junk")
    out = _predict(tiny_run, "-i", broken, "-o", tmp_path / "out", "-p", "liver", "-p", "not the liver")
    assert out.returncode == 2 and not (tmp_path / "out").exists()
    assert out.stderr.strip().startswith("error: prompt 'not the liver': vlseg does not understand negation ('not')")
    assert len(out.stderr.strip().splitlines()) == 1
