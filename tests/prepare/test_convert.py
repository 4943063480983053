"""Converters: nnU-Net v2 and MSD folders → manifest, with the hierarchy closed and bad cases reported, not fatal; a
dataset layout added by registering one entry."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from vlseg.errors import VlsegError
from vlseg.prepare.convert import class_values, convert
from vlseg.prepare.layouts.base import Listing, choose_layout, dataset_layout
from vlseg.prepare.manifest import read_manifest
from vlseg.registry import DATASET_LAYOUTS
from vlseg.vocab.vocabulary import Vocabulary

REPO = Path(__file__).resolve().parents[2]


def _map(tmp_path, labels, dataset="Local", modality="CT", **extra):
    path = tmp_path / f"{dataset}.yaml"
    path.write_text(json.dumps({"dataset": dataset, "modality": modality, "labels": labels, **extra}))
    return path


def test_hierarchy_is_closed_over_local_labels():
    v = Vocabulary.load()
    assert class_values({"liver": [1], "cancer": [2]}, {"liver": "liver", "cancer": "liver tumor"}, v, "m") == \
        {"liver": [1, 2], "liver tumor": [2]}
    both = class_values({"r": [3], "l": [4]}, {"r": "right kidney", "l": "left kidney"}, v, "m")
    assert both == {"right kidney": [3], "left kidney": [4], "kidney": [3, 4]}  # the union class comes for free
    assert class_values({"liver": [1]}, {"liver": "liver"}, v, "m") == {"liver": [1]}
    with pytest.raises(VlsegError, match="m: label 'tumour' is not declared"):
        class_values({"liver": [1]}, {"tumour": "liver tumor"}, v, "m")
    with pytest.raises(VlsegError, match="m: 'hepar' is not a canonical class"):
        class_values({"liver": [1]}, {"liver": "hepar"}, v, "m")


def test_nnunet_v2_dataset(phantom_corpus, tmp_path):
    source = phantom_corpus.parent / "Dataset001_PhantomLiver"
    cases, errors, _ = convert(source, _map(tmp_path, {"liver": "liver", "liver tumor": "liver tumor"}),
                            tmp_path / "m.jsonl", val_fraction=0.34, progress=False)
    assert not errors and len(cases) == 3
    read = read_manifest(tmp_path / "m.jsonl")
    assert [c.split for c in read].count("val") == 1
    for case in read:
        assert case.classes == {"liver": [1, 2], "liver tumor": [2]} and case.image.is_file()
        label = np.asarray(nib.load(case.label).dataobj)
        assert case.present["liver tumor"] == bool((label == 2).any()) and case.present["liver"]
        assert case.modality == "CT" and len(case.shape) == 3


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_msd_task_with_bad_cases(phantom_corpus, tmp_path):
    src = phantom_corpus.parent / "Dataset001_PhantomLiver"
    task = tmp_path / "Task03_Liver"
    (task / "imagesTr").mkdir(parents=True)
    (task / "labelsTr").mkdir()
    training = []
    for i, image in enumerate(sorted((src / "imagesTr").glob("*.nii.gz"))):
        name = f"liver_{i}.nii.gz"
        shutil.copy(image, task / "imagesTr" / name)
        shutil.copy(src / "labelsTr" / image.name.replace("_0000", ""), task / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    good = nib.load(task / "labelsTr" / "liver_1.nii.gz")
    bad_values = np.asarray(good.dataobj).copy()
    bad_values[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(bad_values, good.affine), task / "labelsTr" / "liver_1.nii.gz")
    blob = (task / "imagesTr" / "liver_2.nii.gz").read_bytes()
    (task / "imagesTr" / "liver_2.nii.gz").write_bytes(blob[: len(blob) // 2])
    training.append({"image": "./imagesTr/missing.nii.gz", "label": "./labelsTr/liver_0.nii.gz"})
    (task / "dataset.json").write_text(json.dumps({"name": "Liver", "modality": {"0": "CT"}, "training": training,
                                                   "labels": {"0": "background", "1": "liver", "2": "cancer"}}))
    before = _digest(task)
    manifest = tmp_path / "m.jsonl"
    out = subprocess.run([sys.executable, "-m", "data_prep.convert", "--source", str(task), "--map",
                          str(REPO / "data_prep" / "maps" / "msd_task03_liver.yaml"), "--manifest", str(manifest)],
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 1, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]  # (stderr has the bar too)
    assert len(errors) == 3
    assert any("liver_1.nii.gz: label values [7] are not declared" in e for e in errors), errors
    assert any("liver_2.nii.gz: truncated or corrupt gzip" in e for e in errors), errors
    assert any("missing.nii.gz: file not found" in e for e in errors)
    assert "1 cases written" in out.stdout and "3 failed" in out.stdout
    cases = read_manifest(manifest)
    assert [c.case_id for c in cases] == ["MSDLiver_liver_0"]
    assert cases[0].classes == {"liver": [1, 2], "liver tumor": [2]}
    assert _digest(task) == before  # raw data is never modified


def test_reconverting_replaces_only_that_dataset(phantom_corpus, tmp_path):
    manifest = tmp_path / "m.jsonl"
    root = phantom_corpus.parent
    convert(root / "Dataset001_PhantomLiver", _map(tmp_path, {"liver": "liver", "liver tumor": "liver tumor"}, "A"),
            manifest, progress=False)
    convert(root / "Dataset002_PhantomKidney",
            _map(tmp_path, {"right kidney": "right kidney", "left kidney": "left kidney"}, "B"), manifest,
            progress=False)
    convert(root / "Dataset001_PhantomLiver", _map(tmp_path, {"liver": "liver"}, "A"), manifest, progress=False)
    cases = read_manifest(manifest)
    assert sorted({c.dataset for c in cases}) == ["A", "B"] and len(cases) == 6
    assert all(c.classes == {"liver": [1, 2]} for c in cases if c.dataset == "A")
    assert all(c.classes["kidney"] == [1, 2] for c in cases if c.dataset == "B")


def test_bad_map_or_folder(tmp_path):
    with pytest.raises(VlsegError, match="nope/dataset.json: not found"):
        convert(tmp_path / "nope", _map(tmp_path, {"a": "liver"}), tmp_path / "m.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VlsegError, match="empty: no case folders with a segmentations/ folder inside"):
        convert(tmp_path / "empty", _map(tmp_path, {"a": "liver"}), tmp_path / "m.jsonl")
    with pytest.raises(VlsegError, match=r"Local.yaml: modality 'PET': unknown; use one of CT, MR"):
        convert(tmp_path, _map(tmp_path, {"a": "liver"}, modality="PET"), tmp_path / "m.jsonl")


def test_per_class_mask_folders(phantom_corpus, tmp_path):
    case = read_manifest(phantom_corpus, split="test")[0]
    img = nib.load(case.image)
    full = np.asarray(nib.load(case.label).dataobj)
    masks = {"liver": np.isin(full, [1, 2]), "liver_tumor": full == 2, "spleen": full == 3}
    src = tmp_path / "totalseg"
    for name, edit in [("good", None), ("overlap", "spleen"), ("nonbinary", "liver"), ("missing", "liver_tumor")]:
        seg = src / name / "segmentations"
        seg.mkdir(parents=True)
        shutil.copy(case.image, src / name / "ct.nii.gz")
        for stem, mask in masks.items():
            data = mask.astype(np.uint8)
            if stem == edit == "spleen":
                data = (masks["spleen"] | masks["liver"]).astype(np.uint8)
            if stem == edit == "liver":
                data = data * 2
            if stem == edit == "liver_tumor":
                continue
            nib.save(nib.Nifti1Image(data, img.affine), seg / f"{stem}.nii.gz")
    mapping = _map(tmp_path, {"liver": "liver", "liver_tumor": "liver tumor", "spleen": "spleen"}, "TS")
    cases, errors, _ = convert(src, mapping, tmp_path / "corpus" / "m.jsonl", val_fraction=0, progress=False)
    assert [c.case_id for c in cases] == ["TS_good", "TS_missing"]
    assert len(errors) == 2
    assert any("overlap/segmentations/spleen.nii.gz: overlaps liver.nii.gz" in e for e in errors), errors
    assert any("nonbinary/segmentations/liver.nii.gz: not a binary mask" in e for e in errors), errors
    good, missing = read_manifest(tmp_path / "corpus" / "m.jsonl")
    assert missing.classes == {"liver": [1], "spleen": [3]}  # a mask the case lacks: that class is not annotated
    assert good.classes == {"liver": [1, 2], "liver tumor": [2], "spleen": [3]}
    assert good.label == (tmp_path / "corpus" / "labels" / "TS" / "good.nii.gz").resolve()
    merged = nib.load(good.label)
    assert np.allclose(merged.affine, img.affine) and merged.shape == img.shape
    label = np.asarray(merged.dataobj)
    for name, mask in [("liver", masks["liver"]), ("liver tumor", masks["liver_tumor"]), ("spleen", masks["spleen"])]:
        assert np.array_equal(good.class_mask(label, name), mask), name  # the tumour survives inside the liver
    assert not (tmp_path / "corpus" / "labels" / "TS" / "overlap.nii.gz").exists()


def test_manifest_carries_boxes_and_the_original_affine(phantom_corpus, tmp_path):
    from vlseg.io.scan import load_label, load_scan

    source = phantom_corpus.parent / "Dataset001_PhantomLiver"
    convert(source, _map(tmp_path, {"liver": "liver", "liver tumor": "liver tumor"}), tmp_path / "m.jsonl",
            progress=False)
    for case in read_manifest(tmp_path / "m.jsonl"):
        scan = load_scan(case.image)
        label = load_label(case.label, like=scan)
        assert np.allclose(case.affine, nib.load(case.image).affine)
        assert set(case.boxes) == {n for n, p in case.present.items() if p}
        x0, y0, z0, x1, y1, z1 = case.boxes["liver"]
        liver = case.class_mask(label, "liver")
        assert liver[x0:x1, y0:y1, z0:z1].sum() == liver.sum()  # the box holds the whole class...
        assert liver[x0, y0:y1, z0:z1].any() and liver[x1 - 1, y0:y1, z0:z1].any()  # ...and is tight
    bad = tmp_path / "bad.jsonl"
    row = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[0])
    row["boxes"] = {"spleen": [0, 0, 0, 1, 1, 1]}
    bad.write_text(json.dumps(row) + "\n")
    with pytest.raises(VlsegError, match="bad.jsonl:1: 'boxes' must map annotated classes"):
        read_manifest(bad)


def _list_csv(source, spec, manifest):
    """A layout of the test's own: ``cases.csv`` rows ``case,image,label`` and ``labels.json`` name → value."""
    rows = [line.split(",") for line in (source / "cases.csv").read_text().splitlines()]
    labels = {name: [value] for name, value in json.loads((source / "labels.json").read_text()).items()}
    return Listing(labels, [(case, source / image, source / label) for case, image, label in rows])


@pytest.fixture
def csv_layout():
    dataset_layout("test-csv", recognises=lambda source: (source / "cases.csv").is_file())(_list_csv)
    yield
    DATASET_LAYOUTS.unregister("test-csv")


def test_a_registered_layout_is_recognised_or_named(phantom_corpus, tmp_path, csv_layout):
    src = phantom_corpus.parent / "Dataset001_PhantomLiver"
    flat = tmp_path / "flat"
    flat.mkdir()
    rows = []
    for i, image in enumerate(sorted((src / "imagesTr").glob("*.nii.gz"))[:2]):
        shutil.copy(image, flat / f"img{i}.nii.gz")
        shutil.copy(src / "labelsTr" / image.name.replace("_0000", ""), flat / f"seg{i}.nii.gz")
        rows.append(f"c{i},img{i}.nii.gz,seg{i}.nii.gz")
    (flat / "cases.csv").write_text("\n".join(rows))
    (flat / "labels.json").write_text(json.dumps({"hepar": 1, "tumour": 2}))
    assert choose_layout(flat).name == "test-csv" and choose_layout(src).name == "nnunet"
    cases, errors, _ = convert(flat, _map(tmp_path, {"hepar": "liver", "tumour": "liver tumor"}, "Flat"),
                            tmp_path / "m.jsonl", val_fraction=0, progress=False)
    assert not errors and [c.case_id for c in cases] == ["Flat_c0", "Flat_c1"]
    assert read_manifest(tmp_path / "m.jsonl")[1].classes == {"liver": [1, 2], "liver tumor": [2]}

    shutil.copy(src / "dataset.json", flat / "dataset.json")  # now nnU-Net's recogniser answers too
    with pytest.raises(VlsegError, match=r"flat: recognised by several dataset layouts \(nnunet, test-csv\); name one"):
        convert(flat, _map(tmp_path, {"hepar": "liver"}, "Flat"), tmp_path / "m.jsonl", progress=False)
    named = _map(tmp_path, {"hepar": "liver"}, "Flat", layout="test-csv")
    assert len(convert(flat, named, tmp_path / "m.jsonl", progress=False)[0]) == 2
    with pytest.raises(VlsegError) as err:
        convert(flat, _map(tmp_path, {"hepar": "liver"}, "Flat", layout="nope"), tmp_path / "m.jsonl")
    assert str(err.value) == (f"{tmp_path / 'Flat.yaml'}: unknown dataset layout 'nope'; available: "
                              f"{', '.join(DATASET_LAYOUTS.names())}")
    assert {"mask_folders", "msd", "nnunet", "pattern", "test-csv"} <= set(DATASET_LAYOUTS.names())


def test_a_map_extends_another_or_takes_its_labels(tmp_path):
    from vlseg.prepare.convert import load_map

    (tmp_path / "base.yaml").write_text("dataset: Base\nmodality: CT\nlayout: msd\ncase_filter: 'a.*'\n"
                                        "labels: {liver: liver, cancer: liver tumor}\n")
    (tmp_path / "mr.yaml").write_text("extends: base.yaml\ndataset: BaseMR\nmodality: MR\nlabels: {spleen: spleen}\n")
    (tmp_path / "own.yaml").write_text("labels_from: base.yaml\ndataset: Own\nmodality: MR\n")
    (tmp_path / "auto.yaml").write_text("extends: base.yaml\nlabels: auto\n")
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    mr = load_map(tmp_path / "mr.yaml")
    assert mr == {"dataset": "BaseMR", "modality": "MR", "layout": "msd", "case_filter": "a.*",
                  "labels": {"liver": "liver", "cancer": "liver tumor", "spleen": "spleen"}}
    own = load_map(tmp_path / "own.yaml")  # labels only: the base's layout and filter stay behind
    assert own == {"dataset": "Own", "modality": "MR", "labels": {"liver": "liver", "cancer": "liver tumor"}}
    assert load_map(tmp_path / "auto.yaml")["labels"] == "auto"
    with pytest.raises(VlsegError, match="refers back to itself"):
        load_map(tmp_path / "loop.yaml")
