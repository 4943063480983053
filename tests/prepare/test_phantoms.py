"""The phantom corpus: nnU-Net v2 layout, partial annotations, geometry, anatomy, manifest, determinism, CLI."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from vlseg.cli.prepare import phantoms_main as main
from vlseg.errors import VlsegError
from vlseg.prepare.manifest import read_manifest, write_manifest
from vlseg.prepare.phantoms import DATASETS, generate_corpus, make_case

REPO = Path(__file__).resolve().parents[2]
SHAPE, SPACING = (40, 40, 32), (2.5, 2.5, 3.0)
N_TRAIN, N_TEST = 3, 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return generate_corpus(tmp_path_factory.mktemp("phantoms"), n_train=N_TRAIN, n_test=N_TEST, shape=SHAPE,
                           spacing=SPACING, seed=5, progress=False)


def arrays(case):
    img, lab = nib.load(case.image), nib.load(case.label)
    return img, lab, np.asarray(img.dataobj), np.asarray(lab.dataobj)


def test_layout_and_dataset_json(corpus):
    root = corpus.parent
    assert corpus == root / "manifest.jsonl"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [d[0] for d in DATASETS]
    expected = {
        "Dataset001_PhantomLiver": {"background": 0, "liver": [1, 2], "liver tumor": 2},
        "Dataset002_PhantomKidney": {"background": 0, "right kidney": 1, "left kidney": 2},  # consecutive, as nnU-Net
        "Dataset003_PhantomSpleen": {"background": 0, "spleen": 2, "liver": 1},             # wants them
        "Dataset004_PhantomTest": {"background": 0, "liver": [1, 2], "liver tumor": 2, "spleen": 3,
                                   "right kidney": 4, "left kidney": 5},
    }
    for folder, name, _, kind in DATASETS:
        meta = json.loads((root / folder / "dataset.json").read_text())
        assert meta["labels"] == expected[folder] and meta["name"] == name
        assert meta["channel_names"] == {"0": "CT"} and meta["file_ending"] == ".nii.gz"
        if any(isinstance(v, list) for v in meta["labels"].values()):
            assert meta["regions_class_order"] == list(range(1, len(meta["labels"])))
        else:
            assert "regions_class_order" not in meta
        n = N_TEST if kind == "test" else N_TRAIN  # test cases too sit in imagesTr: nnU-Net wants labelled cases there
        assert meta["numTraining"] == n
        assert sorted(p.name for p in (root / folder / "imagesTr").iterdir()) == \
            [f"{name}_{i:03d}_0000.nii.gz" for i in range(n)]
        assert sorted(p.name for p in (root / folder / "labelsTr").iterdir()) == \
            [f"{name}_{i:03d}.nii.gz" for i in range(n)]
        assert not any((root / folder / o).exists() for o in ("imagesTs", "labelsTs"))


def test_manifest_lists_every_case(corpus, tmp_path):
    cases = read_manifest(corpus)
    assert len(cases) == 3 * N_TRAIN + N_TEST and len({c.case_id for c in cases}) == len(cases)
    for _, name, classes, kind in DATASETS:
        mine = read_manifest(corpus, datasets=[name])
        splits = [c.split for c in mine]
        assert splits == (["test"] * N_TEST if kind == "test" else ["train"] * (N_TRAIN - 1) + ["val"])
        assert all(list(c.classes) == classes and c.modality == "CT" for c in mine)
    for case in cases:
        assert case.image.is_absolute() and case.image.is_file() and case.label.is_file()
        assert case.shape == SHAPE and case.spacing == SPACING
    for line in corpus.read_text().splitlines():  # paths on disk are relative to the manifest's folder
        row = json.loads(line)
        assert not Path(row["image"]).is_absolute() and (corpus.parent / row["label"]).is_file()
    assert read_manifest(write_manifest(tmp_path / "again.jsonl", cases)) == cases


def test_geometry_matches_image(corpus):
    for case in read_manifest(corpus):
        img, lab, image, label = arrays(case)
        assert image.dtype == np.int16 and label.dtype == np.uint8
        assert image.shape == label.shape == SHAPE
        assert np.allclose(img.affine, lab.affine)
        assert np.allclose(np.diag(img.affine)[:3], SPACING) and np.count_nonzero(img.affine[:3, :3]) == 3
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S") and np.any(img.affine[:3, 3] != 0)
        assert img.header.get_zooms() == SPACING
        assert image.min() >= -1024 and -1100 < image[0, 0, 0] < -900  # air in the corner
        assert 300 < np.percentile(image, 99.9) < 1000  # bone


def test_label_files_hold_only_annotated_values(corpus):
    for case in read_manifest(corpus):
        label = arrays(case)[3]
        allowed = {0} | {v for values in case.classes.values() for v in values}
        assert set(np.unique(label).tolist()) <= allowed, case.case_id
        if case.dataset == "PhantomSpleen":
            assert case.classes == {"spleen": [2], "liver": [1]} and set(np.unique(label)) == {0, 1, 2}
        if case.dataset == "PhantomLiver":
            assert case.classes == {"liver": [1, 2], "liver tumor": [2]}
        if case.dataset == "PhantomKidney":
            assert case.classes == {"right kidney": [1], "left kidney": [2]} and set(np.unique(label)) == {0, 1, 2}
        if case.dataset == "PhantomTest":
            assert case.classes == {"liver": [1, 2], "liver tumor": [2], "spleen": [3], "right kidney": [4],
                                    "left kidney": [5]}


def test_presence_flags(corpus):
    cases = read_manifest(corpus)
    for case in cases:
        label = arrays(case)[3]
        assert set(case.present) == set(case.classes)
        for name in case.classes:
            assert case.present[name] == bool(case.class_mask(label, name).any()), (case.case_id, name)
        assert all(case.present[n] for n in case.classes if n != "liver tumor")  # organs are always there
    tumours = [c.present["liver tumor"] for c in cases if "liver tumor" in c.classes]
    assert any(tumours)


def test_tumours_lie_inside_the_liver_and_are_darker(corpus):
    seen = 0
    for case in read_manifest(corpus, datasets=["PhantomLiver", "PhantomTest"]):
        _, _, image, label = arrays(case)
        tumour, liver = label == 2, np.isin(label, [1, 2])
        if not tumour.any():
            continue
        seen += 1
        assert not (ndimage.binary_dilation(tumour) & ~liver).any(), case.case_id  # liver all around each lesion
        parenchyma = ndimage.binary_erosion(label == 1, iterations=2)  # away from the partial-volume rim
        assert image[tumour].mean() < image[parenchyma].mean() - 15  # hypodense
    assert seen


def test_anatomy_positions_and_separation(corpus):
    for case in read_manifest(corpus, split="test"):
        _, _, image, label = arrays(case)
        organs = {"liver": np.isin(label, [1, 2]), "spleen": label == 3, "right kidney": label == 4,
                  "left kidney": label == 5}
        centre = {k: np.argwhere(m).mean(0) / np.array(SHAPE) for k, m in organs.items()}
        assert centre["liver"][0] < 0.5 < centre["spleen"][0]  # RAS: liver on the patient's right (low x)
        assert centre["right kidney"][0] < 0.5 < centre["left kidney"][0]
        assert centre["right kidney"][1] < 0.5 and centre["left kidney"][1] < 0.5  # kidneys posterior
        assert centre["liver"][1] > centre["right kidney"][1] and centre["liver"][2] > centre["right kidney"][2]
        for name, mask in organs.items():
            assert not _touches_border(mask), (case.case_id, name)
            others = np.zeros_like(mask)
            for other, m in organs.items():
                if other != name:
                    others |= m
            assert not (ndimage.binary_dilation(mask) & others).any(), (case.case_id, name)  # fat between organs
        assert np.median(image[label == 1]) > np.median(image[label == 4]) + 5  # liver brighter than medulla-ish


def _touches_border(mask):
    return any(mask.take(i, axis=a).any() for a in range(3) for i in (0, -1))


def test_default_shape_keeps_every_organ_inside():
    for i in range(3):
        image, label, n_tumours = make_case((64, 64, 48), np.random.default_rng([0, 0, i]))
        assert image.dtype == np.float32 and label.dtype == np.uint8
        for value in (1, 3, 4, 5):
            mask = np.isin(label, [1, 2]) if value == 1 else label == value
            assert mask.sum() > 150 and not _touches_border(mask), (i, value)
        assert (label == 2).any() == (n_tumours > 0)
        assert 8 < np.std(image[:4, :4, :]) < 16  # noise of sigma ~12 HU in the air


def test_deterministic_and_stale_files_removed(tmp_path):
    kw = dict(n_test=1, shape=(32, 32, 24), progress=False)
    a = generate_corpus(tmp_path / "a", n_train=3, seed=3, **kw)
    b = generate_corpus(tmp_path / "b", n_train=3, seed=3, **kw)
    c = generate_corpus(tmp_path / "c", n_train=3, seed=4, **kw)
    assert a.read_text() == b.read_text()
    differs = False
    for ca, cb, cc in zip(read_manifest(a), read_manifest(b), read_manifest(c)):
        for attr in ("image", "label"):
            xa, xb = (np.asarray(nib.load(getattr(x, attr)).dataobj) for x in (ca, cb))
            assert np.array_equal(xa, xb)
            assert np.allclose(nib.load(getattr(ca, attr)).affine, nib.load(getattr(cb, attr)).affine)
        differs |= not np.array_equal(np.asarray(nib.load(ca.image).dataobj), np.asarray(nib.load(cc.image).dataobj))
    assert differs
    images = [np.asarray(nib.load(x.image).dataobj) for x in read_manifest(a, datasets=["PhantomLiver"])]
    assert not np.array_equal(images[0], images[1])  # every case is its own anatomy

    generate_corpus(tmp_path / "a", n_train=2, seed=3, **kw)  # a smaller corpus over the old one
    assert len(list((tmp_path / "a" / "Dataset001_PhantomLiver" / "imagesTr").iterdir())) == 2
    assert len(read_manifest(a)) == 3 * 2 + 1


def test_bad_arguments():
    with pytest.raises(VlsegError, match="n_train"):
        generate_corpus("unused", n_train=1, progress=False)
    with pytest.raises(VlsegError, match="shape"):
        generate_corpus("unused", shape=(64, 64, 8), progress=False)
    with pytest.raises(VlsegError, match="spacing"):
        generate_corpus("unused", spacing=(3.0, 0.0, 3.0), progress=False)
    assert not Path("unused").exists()


def test_cli(tmp_path, capsys):
    out_dir = tmp_path / "p"
    run = subprocess.run([sys.executable, "-m", "data_prep.phantoms", "--out", str(out_dir), "--n-train", "2",
                          "--n-test", "1", "--shape", "32", "32", "24", "--spacing", "2", "2", "4", "--seed", "1"],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert str(out_dir / "manifest.jsonl") in run.stdout
    cases = read_manifest(out_dir / "manifest.jsonl")
    assert len(cases) == 7 and cases[0].spacing == (2.0, 2.0, 4.0) and cases[0].shape == (32, 32, 24)
    # Bad arguments: one line on stderr and status 2 (in-process: a second interpreter start costs seconds).
    assert main(["--out", str(tmp_path / "q"), "--n-train", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: n_train") and len(err.strip().splitlines()) == 1


def test_read_manifest_errors_name_file_and_line(corpus, tmp_path):
    with pytest.raises(VlsegError, match=r"missing\.jsonl: manifest not found"):
        read_manifest(tmp_path / "missing.jsonl")
    lines = corpus.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n" + lines[1] + "\n{broken\n")
    with pytest.raises(VlsegError, match=r"bad\.jsonl:3: not valid JSON"):
        read_manifest(bad)
    row = json.loads(lines[1])
    del row["image"]
    bad.write_text(lines[0] + "\n" + json.dumps(row) + "\n")
    with pytest.raises(VlsegError, match=r"bad\.jsonl:2: missing field 'image'"):
        read_manifest(bad)
