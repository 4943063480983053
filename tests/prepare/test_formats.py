"""Text-prompted corpora as they are shipped: SAT-DS JSONL lines (integer and multi-channel masks, merged classes,
moved data) and CVPR-BiomedSegFM .npz volumes with their prompt JSON (spacing order, pickled prompts read safely)."""

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from vlseg.errors import VlsegError
from vlseg.io.npz import read_npz, read_text_prompts, save_segs, spacing_order
from vlseg.io.scan import load_scan
from vlseg.prepare.convert import convert
from vlseg.prepare.manifest import read_manifest

REPO = Path(__file__).resolve().parents[2]
SATDS = REPO / "data_prep" / "recipes" / "SAT-DS.yaml"
CVPR = REPO / "data_prep" / "recipes" / "CVPR-BiomedSegFM.yaml"
BTCV_NAMES = ["spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
              "inferior vena cava", "portal vein and splenic vein", "pancreas", "right adrenal gland",
              "left adrenal gland", "kidney", "adrenal gland"]
LPS = np.diag([-1.5, -1.5, 3.0, 1.0])  # a flipped grid, so file and canonical layouts differ


def _nifti(path, data, affine=LPS):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), path)
    return path


def _line(image, mask, labels, modality="CT", dataset="BTCV", split="train", pid="p"):
    return {"image": str(image), "mask": str(mask), "label": labels, "modality": modality, "dataset": dataset,
            "official_split": split, "patient_id": pid}


def _jsonl(path, lines):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def _map(tmp_path, **spec):
    path = tmp_path / "map.yaml"
    path.write_text(json.dumps({"dataset": "auto", "modality": "auto", "layout": "satds", "labels": "auto", **spec}))
    return path


def _btcv_case(folder, name, top=13):
    mask = np.zeros((8, 8, 4), np.uint8)
    for value in range(1, top + 1):
        mask.flat[value * 9] = value
    _nifti(folder / f"img{name}.nii.gz", np.random.default_rng(0).normal(size=(8, 8, 4)).astype(np.float32))
    _nifti(folder / f"label{name}.nii.gz", mask)


def test_satds_merged_classes_never_get_a_value(tmp_path):
    data = tmp_path / "SAT-DS" / "data"
    _btcv_case(data / "nii" / "BTCV", "0001")
    _btcv_case(data / "nii" / "BTCV", "0002", top=12)
    lines = [_line(f"data/nii/BTCV/img{n}.nii.gz", f"data/nii/BTCV/label{n}.nii.gz", BTCV_NAMES, split=s,
                   pid=f"img{n}.nii.gz") for n, s in (("0001", "train"), ("0002", "test"))]
    source = _jsonl(data / "jsonl" / "BTCV.jsonl", lines)  # paths relative to the SAT-DS checkout
    cases, errors, _ = convert(source, SATDS, tmp_path / "out" / "m.jsonl", progress=False)
    assert not errors and len(cases) == 2
    read = {c.case_id: c for c in read_manifest(tmp_path / "out" / "m.jsonl")}
    case = read["BTCV_img0001"]
    assert case.dataset == "BTCV" and case.modality == "CT" and case.split == "train"
    assert read["BTCV_img0002"].split == "test"  # official_split kept, no random draw
    assert case.classes["spleen"] == [1] and case.classes["left adrenal gland"] == [13]
    assert case.classes["kidney"] == [2, 3]  # the merged class, through union_of, never value 14
    assert all(v <= 13 for values in case.classes.values() for v in values)
    assert read["BTCV_img0002"].present["left adrenal gland"] is False  # annotated K=13 from the recipe: absent
    report = json.loads((tmp_path / "out" / "convert_report_BTCV.json").read_text())
    assert report["merged_labels"] == ["adrenal gland", "kidney"]


def test_satds_without_table_reads_k_on_each_mask(tmp_path):
    for n, top in (("a", 2), ("b", 1)):
        mask = np.zeros((6, 6, 3), np.uint8)
        mask[1, 1, 1], mask[3, 3, 1] = 1, top
        _nifti(tmp_path / f"{n}_img.nii.gz", np.ones((6, 6, 3), np.float32))
        _nifti(tmp_path / f"{n}_mask.nii.gz", mask)
    lines = [_line(f"{n}_img.nii.gz", f"{n}_mask.nii.gz", ["liver", "spleen", "kidney"], "MRI T2", "Mine", pid=n)
             for n in ("a", "b")]
    source = _jsonl(tmp_path / "Mine.jsonl", lines)
    cases, errors, _ = convert(source, _map(tmp_path), tmp_path / "m.jsonl", progress=False)
    assert not errors
    by_id = {c.case_id: c for c in cases}
    assert by_id["Mine_a"].classes == {"liver": [1], "spleen": [2]} and by_id["Mine_a"].modality == "MR"
    assert by_id["Mine_b"].classes == {"liver": [1]}  # value 2 never reached: spleen left unannotated, not absent


def test_satds_overlapping_channels_are_exact(tmp_path):
    rng = np.random.default_rng(1)
    channels = rng.random((8, 7, 5, 3)) > 0.6  # (X, Y, Z, C), channels overlapping at random
    _nifti(tmp_path / "img.nii.gz", rng.normal(size=(8, 7, 5)).astype(np.float32))
    _nifti(tmp_path / "mask.nii.gz", channels.astype(np.uint8))
    names = ["right kidney", "left kidney", "spleen", "kidney"]
    source = _jsonl(tmp_path / "Multi.jsonl", [_line("img.nii.gz", "mask.nii.gz", names, dataset="Multi",
                                                     pid="c1")])
    cases, errors, _ = convert(source, _map(tmp_path, annotated={"Multi": 3}), tmp_path / "out" / "m.jsonl",
                            progress=False)
    assert not errors
    case = read_manifest(tmp_path / "out" / "m.jsonl")[0]
    assert case.label == (tmp_path / "out" / "labels" / "Multi" / "c1.nii.gz").resolve()
    label = np.asarray(nib.load(case.label).dataobj)
    for i, name in enumerate(names[:3]):
        assert np.array_equal(np.isin(label, case.classes[name]), channels[..., i]), name
    assert np.array_equal(np.isin(label, case.classes["kidney"]), channels[..., 0] | channels[..., 1])


def test_satds_moved_data_bad_lines_and_modalities(tmp_path):
    moved = tmp_path / "copy"
    _btcv_case(moved / "data" / "nii" / "BTCV", "0001")
    _btcv_case(moved / "data" / "nii" / "BTCV", "0003")
    old = "/mnt/elsewhere/SAT-DS/data/nii/BTCV"
    lines = [_line(f"{old}/img0001.nii.gz", f"{old}/label0001.nii.gz", BTCV_NAMES, pid="one"),
             _line(f"{old}/img0002.nii.gz", f"{old}/label0002.nii.gz", BTCV_NAMES, pid="two"),
             '{"image": "broken',
             _line(f"{old}/img0003.nii.gz", f"{old}/label0003.nii.gz", BTCV_NAMES, "PET", pid="three")]
    source = _jsonl(tmp_path / "lists" / "BTCV.jsonl", lines)
    manifest = tmp_path / "out" / "m.jsonl"
    cases, errors, _ = convert(source, _map(tmp_path, root=str(moved), annotated={"BTCV": 13}), manifest,
                            progress=False)
    assert [c.case_id for c in cases] == ["BTCV_one"] and cases[0].image == moved / "data/nii/BTCV/img0001.nii.gz"
    assert len(errors) == 3
    assert f"{old}/img0002.nii.gz: file not found nor under root {moved} (named by a SAT-DS line)" in errors
    assert any("BTCV.jsonl: line 3 is not JSON" in e for e in errors)
    assert any("'PET'" in e and "CT or MR" in e for e in errors)
    report = json.loads((tmp_path / "out" / "convert_report_BTCV.json").read_text())
    assert {e["case"] for e in report["errors"]} == {"BTCV_two", "BTCV_line3", "BTCV_three"}


# ------------------------------------------------------------------------------------------------- CVPR-BiomedSegFM

PROMPTS = {"CT_Demo": {"1": ["Liver", "liver", "hepatic parenchyma"], "2": ["Spleen", "splenic tissue"],
                       "instance_label": 0},
           "MR_Lesions": {"1": ["Liver tumor", "hepatic lesion"], "instance_label": 1},
           "PET_Demo": {"1": ["Liver", "liver"], "instance_label": 0}}


def _npz(path, spacing, gts=True, values=(1, 2, 7), **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    imgs = np.random.default_rng(2).integers(0, 256, (4, 6, 5), dtype=np.uint8)  # (D, H, W)
    arrays = {"imgs": imgs, "spacing": np.asarray(spacing, np.float64), **extra}
    if gts:
        labels = np.zeros_like(imgs)
        for k, value in enumerate(values):
            labels[k, 1:3, k] = value
        arrays["gts"] = labels
    np.savez_compressed(path, **arrays)
    return path


def _cvpr_tree(root):
    (root / "CVPR25_TextSegFMData_with_class.json").parent.mkdir(parents=True, exist_ok=True)
    (root / "CVPR25_TextSegFMData_with_class.json").write_text(json.dumps(PROMPTS))
    train = root / "3D_train_npz_all"
    _npz(train / "CT" / "CT_Demo" / "CT_Demo_0001.npz", [2.5, 0.8, 0.8])  # zyx on the data
    _npz(train / "CT" / "CT_Demo" / "CT_Demo_0002.npz", [0.8, 0.8, 2.5])  # xyz on the data
    _npz(train / "MR" / "MR_Lesions" / "MR_Lesions_0001.npz", [3.0, 1.0, 1.0], values=(1, 2, 3))
    _npz(train / "PET" / "PET_Demo" / "PET_Demo_0001.npz", [3.0, 2.0, 2.0])
    _npz(train / "CT" / "CT_Demo" / "CT_Demo_0003.npz", [1.0, 0.8, 0.6])  # spacing that tells no order
    return train


def test_cvpr_npz_converts_with_prompts_and_spacing(tmp_path):
    train = _cvpr_tree(tmp_path / "CVPR-BiomedSegFM")
    manifest = tmp_path / "out" / "m.jsonl"
    cases, errors, _ = convert(train, CVPR, manifest, progress=False)
    by_id = {c.case_id.split("_", 1)[1]: c for c in read_manifest(manifest)}
    assert set(by_id) == {"CT_Demo_0001", "CT_Demo_0002", "MR_Lesions_0001"}
    for name in ("CT_Demo_0001", "CT_Demo_0002"):
        case = by_id[name]
        assert case.shape == (5, 6, 4) and case.spacing == pytest.approx((0.8, 0.8, 2.5)) and case.modality == "CT"
        assert case.classes == {"liver": [1], "spleen": [2]} and case.image.suffix == ".npz"
        label = np.asarray(nib.load(case.label).dataobj)
        gts = np.load(case.image, allow_pickle=False)["gts"].transpose(2, 1, 0)
        assert np.array_equal(label, np.where(gts == 7, 0, gts))  # same voxels; the unprompted value dropped
        assert load_scan(case.image).data.shape == (5, 6, 4)
    assert by_id["MR_Lesions_0001"].classes["liver tumor"] == [1, 2, 3]  # instances: every value is the class
    assert by_id["MR_Lesions_0001"].modality == "MR"
    assert len(errors) == 2 and any("'PET'" in e for e in errors)
    assert any("CT_Demo_0003.npz" in e and "spacing_order" in e for e in errors)
    report = json.loads((tmp_path / "out" / "convert_report_CVPR-BiomedSegFM.json").read_text())
    assert report["prompts"]["CT_Demo"]["labels"]["1"] == {"name": "Liver",
                                                          "synonyms": ["liver", "hepatic parenchyma"]}
    assert report["prompts"]["MR_Lesions"]["instance_label"] == 1
    assert report["unprompted_values"]["CT_Demo_0001"] == [7]


def test_cvpr_spacing_order_from_the_map_and_validation_inputs(tmp_path):
    root = tmp_path / "CVPR-BiomedSegFM"
    _cvpr_tree(root)
    source = root / "3D_train_npz_all" / "CT" / "CT_Demo"
    _npz(source / "CT_Demo_val.npz", [2.5, 0.8, 0.8], gts=False, text_prompts=np.array({"1": "liver"}, object))
    spec = {"dataset": "Demo", "modality": "auto", "layout": "cvpr_npz", "labels": "auto", "spacing_order": "zyx"}
    (tmp_path / "map.yaml").write_text(json.dumps(spec))
    cases, errors, _ = convert(source, tmp_path / "map.yaml", tmp_path / "out" / "m.jsonl", progress=False)
    assert not errors and len(cases) == 3
    odd = next(c for c in cases if c.case_id == "Demo_CT_Demo_0003")
    assert odd.spacing == pytest.approx((0.6, 0.8, 1.0))  # zyx as the map says: W is x
    assert odd.image == (tmp_path / "out" / "images" / "Demo" / "CT_Demo_0003.nii.gz").resolve()
    report = json.loads((tmp_path / "out" / "convert_report_Demo.json").read_text())
    assert report["without_gts"] == 1


def test_spacing_order_is_read_on_data():
    assert spacing_order([3.0, 0.7, 0.7], "f") == "zyx" and spacing_order([0.7, 0.7, 3.0], "f") == "xyz"
    assert spacing_order([1.0, 1.0, 1.0], "f") == "zyx"
    assert spacing_order([1.0, 0.8, 0.6], "f", "xyz") == "xyz"
    with pytest.raises(VlsegError, match="f: spacing .* does not tell its axis order"):
        spacing_order([1.0, 0.8, 0.6], "f")
    with pytest.raises(VlsegError, match="not three positive"):
        spacing_order([1.0, 0.0, 1.0], "f")


def test_text_prompts_read_without_allow_pickle(tmp_path):
    prompts = {"1": "liver", "2": "spleen in the left upper abdomen", "instance_label": 0}
    path = _npz(tmp_path / "CT_Demo_val.npz", [2.5, 0.8, 0.8], gts=False,
                text_prompts=np.array(prompts, dtype=object))  # as the challenge writes it
    assert read_text_prompts(path) == prompts
    assert read_npz(path).shape == (5, 6, 4)


class _Payload:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_malicious_pickle_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    payload = np.empty((), dtype=object)
    payload[()] = {"1": _Payload()}
    path = _npz(tmp_path / "evil.npz", [1, 1, 1], gts=False, text_prompts=payload)
    with pytest.raises(VlsegError, match=r"evil.npz: text_prompts: refused, unpickling it would call .*system"):
        read_text_prompts(path)
    assert not (tmp_path / "pwned").exists()
    np.savez(tmp_path / "objects.npz", imgs=payload, spacing=np.ones(3))
    with pytest.raises(VlsegError, match="'imgs' holds pickled Python objects"):
        read_npz(tmp_path / "objects.npz")
    assert not (tmp_path / "pwned").exists()


def test_save_segs_in_the_challenge_format(tmp_path):
    segs = np.zeros((4, 6, 5), np.int64)
    segs[1, 2, 3] = 2
    path = save_segs(tmp_path / "pred" / "CT_Demo_val.npz", segs)
    with np.load(path, allow_pickle=False) as npz:
        assert list(npz.files) == ["segs"] and npz["segs"].dtype == np.uint8 and npz["segs"][1, 2, 3] == 2
    with pytest.raises(VlsegError, match="non-negative prompt ids"):
        save_segs(tmp_path / "bad.npz", segs - 1)


def test_cvpr_recipe_from_the_command_line(tmp_path, capsys):
    """``vlseg prepare --recipe CVPR-BiomedSegFM``: the prompt JSON named on the command line, a progress bar on
    stderr, one error line per bad case (the PET volume; the file whose spacing tells no order) and exit status 1."""
    from vlseg.cli.prepare import main as prepare_main

    root = tmp_path / "CVPR-BiomedSegFM"
    _cvpr_tree(root)
    prompts = tmp_path / "elsewhere" / "prompts.json"
    prompts.parent.mkdir()
    (root / "CVPR25_TextSegFMData_with_class.json").rename(prompts)
    manifest = tmp_path / "out" / "manifest.jsonl"
    code = prepare_main(["--recipe", "cvpr-biomedsegfm", "--source", str(root / "3D_train_npz_all"),
                         "--manifest", str(manifest), f"prompts={prompts}"])
    out, err = capsys.readouterr()
    assert code == 1 and "3 cases written" in out and "converting CVPR-BiomedSegFM" in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and any("PET_Demo_0001.npz" in e for e in errors)
    assert {c.modality for c in read_manifest(manifest)} == {"CT", "MR"}


def test_satds_recipe_from_the_command_line_with_moved_data(tmp_path, capsys):
    """``vlseg prepare --recipe SAT-DS ... root=DIR``: SAT-DS data copied to another machine, found under ``root``;
    the recipe's own table says BTCV's 13 names are mask values (the last two are merged classes)."""
    from vlseg.cli.prepare import main as prepare_main

    moved = tmp_path / "copy"
    _btcv_case(moved / "data" / "nii" / "BTCV", "0001")
    old = "/mnt/elsewhere/SAT-DS/data/nii/BTCV"
    source = _jsonl(tmp_path / "lists" / "BTCV.jsonl",
                    [_line(f"{old}/img0001.nii.gz", f"{old}/label0001.nii.gz", BTCV_NAMES, pid="one")])
    manifest = tmp_path / "out" / "manifest.jsonl"
    args = ["--recipe", "SAT-DS", "--source", str(source), "--manifest", str(manifest)]
    assert prepare_main(args) == 1
    assert "file not found" in capsys.readouterr().err
    assert prepare_main([*args, f"root={moved}"]) == 0, capsys.readouterr().err
    (case,) = read_manifest(manifest)
    assert case.case_id == "BTCV_one" and case.classes["kidney"] == [2, 3] and case.classes["spleen"] == [1]


def test_satds_names_the_vocabulary_does_not_know_are_warned_about(tmp_path, capsys):
    """``dataset: auto`` takes the JSONL's own dataset name; the warning about unknown label names still finds it."""
    from vlseg.cli.prepare import main as prepare_main

    data = tmp_path / "SAT-DS" / "data"
    _btcv_case(data / "nii" / "BTCV", "0001")
    names = ["mysterious blob", *BTCV_NAMES[1:]]
    source = _jsonl(data / "jsonl" / "BTCV.jsonl",
                    [_line("data/nii/BTCV/img0001.nii.gz", "data/nii/BTCV/label0001.nii.gz", names, pid="one")])
    manifest = tmp_path / "out" / "manifest.jsonl"
    assert prepare_main(["--recipe", "SAT-DS", "--source", str(source), "--manifest", str(manifest)]) == 0
    err = capsys.readouterr().err
    assert "labels not in the vocabulary, left unannotated: mysterious blob" in err
    assert "convert_report_BTCV.json" in err
    (case,) = read_manifest(manifest)
    assert 1 not in {v for values in case.classes.values() for v in values}
