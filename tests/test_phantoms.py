"""The phantom corpus: nnU-Net layout, partial annotations, manifest."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_prep.phantoms import LABELS, generate_corpus
from vlseg.data.manifest import read_manifest
from vlseg.errors import VlsegError


def test_layout_and_dataset_json(phantom_corpus):
    root = phantom_corpus.parent
    meta = json.loads((root / "Dataset001_PhantomLiver" / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "liver": [1, 2], "liver tumor": 2}
    assert meta["channel_names"] == {"0": "CT"} and meta["file_ending"] == ".nii.gz" and meta["numTraining"] == 3
    spleen = json.loads((root / "Dataset003_PhantomSpleen" / "dataset.json").read_text())
    assert spleen["labels"] == {"background": 0, "spleen": 3, "liver": 1}
    assert len(list((root / "Dataset004_PhantomTest" / "imagesTs").glob("*_0000.nii.gz"))) == 2


def test_partial_annotations_in_label_files(phantom_corpus):
    cases = read_manifest(phantom_corpus)
    assert {c.split for c in cases} == {"train", "val", "test"}
    assert len(read_manifest(phantom_corpus, split="val")) == 3  # one per training dataset
    for case in cases:
        img, lab = nib.load(case.image), nib.load(case.label)
        assert img.shape == lab.shape == case.shape and np.allclose(img.affine, lab.affine)
        label = np.asarray(lab.dataobj)
        allowed = {0} | {v for vals in case.classes.values() for v in vals}
        assert set(np.unique(label)) <= allowed, case.case_id
        for name, values in case.classes.items():
            assert case.present[name] == bool(np.isin(label, values).any())
        if case.dataset == "PhantomSpleen":
            assert case.classes["liver"] == [1] and 2 not in label and "liver tumor" not in case.classes
        if case.dataset == "PhantomKidney":
            assert set(case.classes) == {"right kidney", "left kidney"}
    test = read_manifest(phantom_corpus, split="test")
    assert all(set(c.classes) == set(LABELS) for c in test)


def test_anatomy_is_plausible(phantom_corpus):
    for case in read_manifest(phantom_corpus, datasets=["PhantomTest", "PhantomLiver"]):
        label = np.asarray(nib.load(case.label).dataobj)
        image = np.asarray(nib.load(case.image).dataobj).astype(float)
        liver = np.isin(label, [1, 2])
        tumour = label == 2
        if tumour.any():  # tumours are inside the liver and darker than it
            assert image[tumour].mean() < image[label == 1].mean() - 10
        xs = np.argwhere(liver)[:, 0].mean()
        assert xs < label.shape[0] / 2  # RAS: the liver is on the patient's right (low x)
        if case.dataset == "PhantomTest":
            assert np.argwhere(label == 3)[:, 0].mean() > label.shape[0] / 2  # spleen on the left
            assert np.argwhere(label == 4)[:, 0].mean() < np.argwhere(label == 5)[:, 0].mean()


def test_deterministic(tmp_path):
    a = generate_corpus(tmp_path / "a", n_train=2, n_test=1, shape=(32, 32, 24), seed=3, progress=False)
    b = generate_corpus(tmp_path / "b", n_train=2, n_test=1, shape=(32, 32, 24), seed=3, progress=False)
    for ca, cb in zip(read_manifest(a), read_manifest(b)):
        assert np.array_equal(np.asarray(nib.load(ca.image).dataobj), np.asarray(nib.load(cb.image).dataobj))


def test_cli(tmp_path):
    out = subprocess.run([sys.executable, "-m", "data_prep.phantoms", "--out", str(tmp_path / "p"), "--n-train", "2",
                          "--n-test", "1", "--shape", "32", "32", "24"], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert len(read_manifest(tmp_path / "p" / "manifest.jsonl")) == 7


def test_manifest_errors_name_file_and_line(tmp_path, phantom_corpus):
    with pytest.raises(VlsegError, match="nope.jsonl: manifest not found"):
        read_manifest(tmp_path / "nope.jsonl")
    lines = phantom_corpus.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n{broken\n")
    with pytest.raises(VlsegError, match=r"bad.jsonl:2: not valid JSON"):
        read_manifest(bad)
    row = json.loads(lines[0])
    del row["label"]
    bad.write_text(json.dumps(row) + "\n")
    with pytest.raises(VlsegError, match=r"bad.jsonl:1: missing field 'label'"):
        read_manifest(bad)
