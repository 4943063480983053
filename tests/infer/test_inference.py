"""Inference on real NIfTI files: geometry preserved, every output written, Python API and CLI."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from vlseg import Segmenter
from vlseg.prepare.manifest import read_manifest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def segmenter(tiny_run):
    return Segmenter.from_pretrained(tiny_run)


@pytest.fixture(scope="module")
def lps_scan(phantom_corpus, tmp_path_factory):
    """A test phantom re-stored in LPS orientation with an anisotropic, translated affine."""
    case = read_manifest(phantom_corpus, split="test")[0]
    img = nib.load(case.image)
    data = np.asarray(img.dataobj)[::-1, ::-1, :].copy()
    affine = img.affine.copy()
    affine[:3, :3] = np.diag([-4.0, -4.0, 5.0])
    affine[:3, 3] = [120.0, 90.0, -40.0]
    path = tmp_path_factory.mktemp("scans") / "lps_scan.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def test_segment_keeps_the_input_geometry(segmenter, lps_scan, tmp_path):
    result = segmenter.segment(lps_scan, ["liver tumor", "liver", "liver"])
    assert [r.prompt for r in result.results] == ["liver tumor", "liver"]  # duplicates collapse
    files = result.save(tmp_path / "out")
    src = nib.load(lps_scan)
    for prompt in ("liver tumor", "liver"):
        out = nib.load(files[prompt])
        assert out.shape == src.shape and np.allclose(out.affine, src.affine)
        assert out.get_data_dtype() == np.uint8
        assert np.array_equal(np.asarray(out.dataobj), result.mask(prompt))
        # The canonical mask maps onto the file layout by the LPS flip.
        assert np.array_equal(result.mask(prompt), result.mask(prompt, space="canonical")[::-1, ::-1, :])
    report = json.loads(files["report"].read_text())
    assert [p["prompt"] for p in report["prompts"]] == ["liver tumor", "liver"]
    entry = report["prompts"][1]
    assert 0.0 <= entry["presence_probability"] <= 1.0 and entry["file"] == "liver.nii.gz"
    assert entry["volume_ml"] == pytest.approx(entry["voxels"] * 4 * 4 * 5 / 1000.0, rel=1e-3)
    assert report["runtime_s"] > 0 and report["shape"] == list(src.shape)
    png = Image.open(files["overlay"])
    assert png.format == "PNG" and png.height >= 256
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["liver.nii.gz", "liver_tumor.nii.gz",
                                                                     "overlay.png", "report.json"]
    assert not list(tmp_path.glob(".vlseg-*"))


def count_windows(segmenter) -> dict:
    """Make ``segmenter`` count the windows its image encoder sees, in the returned ``{"n": ...}``."""
    calls = {"n": 0}
    encode = segmenter.net.encode_image

    def counting(x):
        calls["n"] += x.shape[0]
        return encode(x)

    segmenter.net.encode_image = counting
    return calls


def test_backbone_runs_once_per_window_for_all_prompts(segmenter, lps_scan):
    calls = count_windows(segmenter)
    try:
        segmenter.segment(lps_scan, ["liver"])
        one = calls["n"]
        calls["n"] = 0
        segmenter.segment(lps_scan, ["liver", "spleen", "left kidney", "right kidney", "liver tumor"])
    finally:
        del segmenter.net.encode_image
    assert one > 1 and calls["n"] == one  # 5 prompts cost no more backbone passes than 1


def test_presence_threshold_vetoes_masks(segmenter, lps_scan):
    everything = segmenter.segment(lps_scan, ["liver"], threshold=0.0, presence_threshold=0.0)
    assert everything.results[0].voxels == int(np.prod(nib.load(lps_scan).shape))
    vetoed = segmenter.segment(lps_scan, ["liver"], threshold=0.0, presence_threshold=1.01)
    assert vetoed.results[0].voxels == 0 and not vetoed.results[0].present


def test_cli_predict(tiny_run, lps_scan, tmp_path):
    out = subprocess.run([sys.executable, "-m", "vlseg.cli", "predict", "-m", str(tiny_run), "-i", str(lps_scan),
                          "-p", "liver tumor", "-p", "liver", "-o", str(tmp_path / "pred")],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "report:" in out.stdout and "overlay:" in out.stdout
    assert (tmp_path / "pred" / "liver_tumor.nii.gz").is_file() and (tmp_path / "pred" / "report.json").is_file()


def test_working_spacing_override(tiny_run, lps_scan, tmp_path):
    """``spacing`` replaces the checkpoint's working spacing; the masks still come back on the scan's grid."""
    coarse, default = Segmenter.from_pretrained(tiny_run, spacing="8"), Segmenter.from_pretrained(tiny_run)
    assert coarse.config["data"]["inference_spacing"] == [8.0, 8.0, 8.0]
    coarse_calls, default_calls = count_windows(coarse), count_windows(default)
    result = coarse.segment(lps_scan, ["liver"], threshold=0.0, presence_threshold=0.0)
    assert result.results[0].mask.shape == nib.load(lps_scan).shape
    assert result.report()["working_spacing_mm"] == [8.0, 8.0, 8.0]
    default.segment(lps_scan, ["liver"])
    assert 0 < coarse_calls["n"] < default_calls["n"]  # a coarser grid needs fewer windows
    assert Segmenter.from_pretrained(tiny_run, spacing=[4, 4, 5]).config["data"]["inference_spacing"] == [4, 4, 5]


def test_cli_predict_rejects_a_bad_spacing(tiny_run, lps_scan, tmp_path):
    out = subprocess.run([sys.executable, "-m", "vlseg.cli", "predict", "-m", str(tiny_run), "-i", str(lps_scan),
                          "-p", "liver", "-o", str(tmp_path / "pred"), "--spacing", "4,0,4"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: spacing: the spacing (mm) must be 3 positive numbers, got ['4', '0', '4']"
    assert not (tmp_path / "pred").exists()


def test_long_prompts_get_short_distinct_file_names(lps_scan, tmp_path):
    """Prompts of thousands of characters: file names stay far below the 255-byte limit and distinct (also from a
    prompt typed as another's file name), and report.json keeps every prompt as typed."""
    from vlseg.infer.result import PromptResult, SegmentationResult
    from vlseg.infer.stitching import BoxMask
    from vlseg.io.scan import load_scan

    scan = load_scan(lps_scan)
    box = BoxMask(scan.data.shape, (0, 0, 0), np.ones((2, 2, 2), np.uint8))

    def save(prompts, out):
        results = [PromptResult(p, None, 1.0, True, box, 8, 0.0) for p in prompts]
        files = SegmentationResult(scan, results, 0.0, "").save(out, overlay=False)
        report = json.loads(files["report"].read_text())
        assert [row["prompt"] for row in report["prompts"]] == prompts
        names = [row["file"] for row in report["prompts"]]
        assert len(set(names)) == len(names) and all(len(n.encode()) <= 120 for n in names)
        assert sorted(p.name for p in out.iterdir()) == sorted(names + ["report.json"])
        assert all(np.asarray(nib.load(out / n).dataobj).sum() == 8 for n in names)
        return names

    shared = "Liver, " + "segment the whole hepatic parenchyma including the caudate lobe " * 60
    long_a, long_b = shared + "and its vessels", shared + "without its vessels"
    names = save([long_a, long_b, "Liver", "liver", "liver!"], tmp_path / "a")
    assert names[2].startswith("liver") and names[0].startswith("liver_segment_the_whole")
    # A prompt typed as the file name another prompt gets: the two still get two files.
    typed = names[0][: -len(".nii.gz")]
    save([typed, long_a], tmp_path / "b")
    assert not list(tmp_path.glob(".vlseg-*"))
