"""The real-scan corpus builder's own pieces: safe extraction, label tables read as data, derived labels, layout."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import nibabel as nib
import numpy as np
import pytest

from vlseg.errors import VlsegError
from vlseg.prepare.samples import brain_labels, extract, totalsegmentator_class_map, write_dataset


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
