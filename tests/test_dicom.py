"""DICOM series in: geometry identical to the same volume as NIfTI (non-RAS, oblique), outputs in the series' own
geometry, one-line errors for broken series, and the converter's DICOM layout."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from data_prep.convert import convert
from vlseg.data.manifest import read_manifest
from vlseg.errors import VlsegError
from vlseg.io import load_scan, save_like

ROT = 0.3  # radians: an oblique in-plane rotation


def _direction(oblique: bool) -> np.ndarray:
    """Row/column/slice directions in LPS: rows towards patient left, columns posterior, slices inferior (non-RAS)."""
    c, s = np.cos(ROT), np.sin(ROT)
    d = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, -1.0]]) if oblique else np.diag([1.0, 1.0, -1.0])
    return d


def write_series(folder, volume: np.ndarray, spacing=(0.8, 0.9, 2.5), origin=(-40.0, 30.0, 100.0), oblique=True,
                 series_uid="1.2.826.0.1.3680043.8.498.1", skip: int | None = None) -> np.ndarray:
    """``volume`` [z, y, x] int16 → one DICOM file per slice; returns the world (RAS) affine of the [x, y, z] array."""
    folder.mkdir(parents=True, exist_ok=True)
    d = _direction(oblique)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")  # files without an extension: name the DICOM writer
    for k in range(volume.shape[0]):
        if k == skip:
            continue
        pos = np.asarray(origin) + d[:, 2] * spacing[2] * k
        img = sitk.GetImageFromArray(volume[k:k + 1].astype(np.int16))
        img.SetSpacing(spacing)
        img.SetOrigin(tuple(pos))
        img.SetDirection(tuple(d.flatten()))
        tags = {"0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.8.498.9", "0020|000e": series_uid,
                "0020|0032": "\\".join(f"{v:.6f}" for v in pos),
                "0020|0037": "\\".join(f"{v:.6f}" for v in (*d[:, 0], *d[:, 1])),
                "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}", "0018|0050": f"{spacing[2]:.6f}",
                "0020|0013": str(k + 1), "0008|0018": f"{series_uid}.{k + 1}", "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
                "0028|1052": "0", "0028|1053": "1"}
        for key, value in tags.items():
            img.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"CT.{series_uid}.{k:03d}"))  # no extension, like scanner exports
        writer.Execute(img)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = lps_to_ras @ d @ np.diag(spacing)
    affine[:3, 3] = lps_to_ras @ np.asarray(origin)
    return affine


@pytest.fixture
def volume() -> np.ndarray:
    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 1000, size=(6, 14, 12)).astype(np.int16)
    vol[2:4, 4:9, 3:8] = 300  # a bright block to follow through the transforms
    return vol


@pytest.mark.parametrize("oblique", [False, True])
def test_series_geometry_equals_the_same_volume_as_nifti(tmp_path, volume, oblique):
    affine = write_series(tmp_path / "series", volume, oblique=oblique)
    nifti = tmp_path / "same.nii.gz"
    nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0).astype(np.int16), affine), nifti)
    from_dicom, from_nifti = load_scan(tmp_path / "series"), load_scan(nifti)
    assert from_dicom.data.shape == from_nifti.data.shape
    np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-3)
    np.testing.assert_array_equal(from_dicom.data, from_nifti.data)
    # A series has no array order of its own: the reader stacks slices along the normal of the image plane, which
    # here runs opposite to the order the files were written in; the world grid is the same either way.
    assert from_dicom.original_shape == (12, 14, 6)
    np.testing.assert_allclose(from_dicom.original_affine[:3, :2], affine[:3, :2], atol=1e-3)
    # a mask saved for the DICOM input lies on the series' own world grid
    mask = (from_dicom.data >= 300).astype(np.uint8)
    out = save_like(mask, from_dicom, tmp_path / "mask.nii.gz")
    np.testing.assert_allclose(nib.load(out).affine, from_dicom.original_affine, atol=1e-3)
    back = load_scan(out)
    np.testing.assert_allclose(back.affine, from_nifti.affine, atol=1e-3)
    assert np.array_equal(back.data > 0, from_nifti.data >= 300)


def test_broken_series_are_one_line_errors(tmp_path, volume):
    write_series(tmp_path / "two", volume, series_uid="1.2.3.1")
    write_series(tmp_path / "two", volume, series_uid="1.2.3.2", origin=(0.0, 0.0, 300.0))
    write_series(tmp_path / "gap", volume, skip=3)
    write_series(tmp_path / "single", volume[:1])
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not dicom")
    cases = {"two": "holds 2 DICOM series", "gap": "not evenly spaced", "single": "has 1 slice",
             "empty": "no DICOM series found", "junk": "no DICOM series found"}
    for name, problem in cases.items():
        with pytest.raises(VlsegError) as err:
            load_scan(tmp_path / name)
        assert problem in str(err.value) and str(tmp_path / name) in str(err.value)
        assert "\n" not in str(err.value)


def test_converter_takes_dicom_nifti_and_nrrd_cases_and_reports_bad_ones(tmp_path, volume):
    root = tmp_path / "Dataset200_Mixed"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    label = (volume.transpose(2, 1, 0) >= 300).astype(np.uint8)
    affine = write_series(root / "imagesTr" / "dcm_0000", volume)  # DICOM folder case
    nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / "dcm.nii.gz")
    nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0), affine), root / "imagesTr" / "nii_0000.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / "nii.nii.gz")
    nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0), affine), root / "imagesTr" / "bad_0000.nii.gz")
    nib.save(nib.Nifti1Image(label[:-1], affine), root / "labelsTr" / "bad.nii.gz")  # label on another grid
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0,
                                                                                           "liver": 1},
                                                   "file_ending": ".nii.gz"}))
    mapping = tmp_path / "map.yaml"
    mapping.write_text("dataset: Mixed\nmodality: CT\nlabels: {liver: liver}\n")
    manifest = tmp_path / "corpus" / "manifest.jsonl"
    written, errors = convert(root, mapping, manifest, val_fraction=0.0, progress=False, split="test")
    assert sorted(c.case_id for c in written) == ["Mixed_dcm", "Mixed_nii"]
    assert len(errors) == 1 and "bad.nii.gz" in errors[0] and "does not match" in errors[0]
    cases = {c.case_id: c for c in read_manifest(manifest)}
    assert cases["Mixed_dcm"].image.is_dir() and cases["Mixed_dcm"].split == "test"
    assert cases["Mixed_dcm"].boxes == cases["Mixed_nii"].boxes and cases["Mixed_dcm"].present == {"liver": True}
    report = json.loads((manifest.parent / "convert_report_Mixed.json").read_text())
    assert report["converted"] == ["Mixed_dcm", "Mixed_nii"]
    assert report["errors"][0]["case"] == "bad" and report["errors"][0]["file"].endswith("bad.nii.gz")
    # NRRD images and labels through file_ending
    nrrd = tmp_path / "Dataset201_Nrrd"
    (nrrd / "imagesTr").mkdir(parents=True)
    (nrrd / "labelsTr").mkdir()
    img = sitk.GetImageFromArray(volume)
    img.SetSpacing((0.8, 0.9, 2.5))
    lab = sitk.GetImageFromArray((volume >= 300).astype(np.uint8))
    lab.CopyInformation(img)
    sitk.WriteImage(img, str(nrrd / "imagesTr" / "n1_0000.nrrd"))
    sitk.WriteImage(lab, str(nrrd / "labelsTr" / "n1.nrrd"))
    (nrrd / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0,
                                                                                           "liver": 1},
                                                   "file_ending": ".nrrd"}))
    written, errors = convert(nrrd, mapping, manifest, val_fraction=0.0, progress=False, dataset="NrrdSet")
    assert [c.case_id for c in written] == ["NrrdSet_n1"] and not errors
    assert {c.dataset for c in read_manifest(manifest)} == {"Mixed", "NrrdSet"}  # other datasets' lines kept
