"""DICOM series in: geometry identical to the same volume as NIfTI (non-RAS, oblique), outputs in the series' own
geometry, one-line errors for broken series, the converter's DICOM and NRRD layouts, and a cut of a real CT series
whose label map is stored in another axis order (``tests/data/real``)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from data_prep.cut_test_data import locale_kept
from vlseg.cli.prepare import convert_main
from vlseg.errors import VlsegError
from vlseg.io.itk import is_dicom_series
from vlseg.io.scan import load_label, load_scan
from vlseg.io.writers import save_like
from vlseg.prepare.convert import convert
from vlseg.prepare.manifest import read_manifest

REPO = Path(__file__).resolve().parents[2]
REAL = Path(__file__).resolve().parents[1] / "data" / "real" / "patient_b"
ROT = 0.3  # radians: an oblique in-plane rotation
LIVER, SPLEEN = 5, 1  # TotalSegmentator "total" label values


def _direction(oblique: bool) -> np.ndarray:
    """Row/column/slice directions in LPS: rows towards patient left, columns posterior, slices inferior (non-RAS)."""
    c, s = np.cos(ROT), np.sin(ROT)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, -1.0]]) if oblique else np.diag([1.0, 1.0, -1.0])


def write_series(folder, volume: np.ndarray, spacing=(0.8, 0.9, 2.5), origin=(-40.0, 30.0, 100.0), oblique=True,
                 series_uid="1.2.826.0.1.3680043.8.498.1", skip: int | None = None,
                 tilt_mm: float = 0.0) -> np.ndarray:
    """``volume`` [z, y, x] int16 → one DICOM file per slice; returns the world (RAS) affine of the [x, y, z] array.

    ``skip`` leaves one slice out; ``tilt_mm`` shifts each slice that far along the columns (a gantry tilt)."""
    folder.mkdir(parents=True, exist_ok=True)
    d = _direction(oblique)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")  # files without an extension: name the DICOM writer
    # GDCM's writer leaves the C library's locale at "C"; later tests in the session decode subprocess output with
    # the locale's encoding, so it is put back.
    with locale_kept():
        for k in range(volume.shape[0]):
            if k == skip:
                continue
            pos = np.asarray(origin) + d[:, 2] * spacing[2] * k + d[:, 1] * tilt_mm * k
            img = sitk.GetImageFromArray(volume[k:k + 1].astype(np.int16))
            img.SetSpacing(spacing)
            img.SetOrigin(tuple(pos))
            img.SetDirection(tuple(d.flatten()))
            tags = {"0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.8.498.9", "0020|000e": series_uid,
                    "0020|0032": "\\".join(f"{v:.6f}" for v in pos),
                    "0020|0037": "\\".join(f"{v:.6f}" for v in (*d[:, 0], *d[:, 1])),
                    "0028|0030": f"{spacing[1]:.6f}\\{spacing[0]:.6f}", "0018|0050": f"{spacing[2]:.6f}",
                    "0020|0013": str(k + 1), "0008|0018": f"{series_uid}.{k + 1}",
                    "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0028|1052": "0", "0028|1053": "1"}
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


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------- synthetic series


@pytest.mark.parametrize("oblique", [False, True])
def test_series_geometry_equals_the_same_volume_as_nifti(tmp_path, volume, oblique):
    affine = write_series(tmp_path / "series", volume, oblique=oblique)
    assert nib.aff2axcodes(affine)[2] == "I"  # slices run inferior: the series is not stored RAS
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
    assert from_dicom.header is None and from_dicom.path == tmp_path / "series"
    # a mask saved for the DICOM input lies on the series' own world grid, with both qform and sform set
    mask = (from_dicom.data >= 300).astype(np.uint8)
    out = nib.load(save_like(mask, from_dicom, tmp_path / "mask.nii.gz"))
    np.testing.assert_allclose(out.affine, from_dicom.original_affine, atol=1e-3)
    assert out.header["qform_code"] > 0 and out.header["sform_code"] > 0
    np.testing.assert_allclose(out.header.get_qform(), from_dicom.original_affine, atol=1e-3)
    back = load_scan(tmp_path / "mask.nii.gz")
    np.testing.assert_allclose(back.affine, from_nifti.affine, atol=1e-3)
    assert np.array_equal(back.data > 0, from_nifti.data >= 300)


def test_is_dicom_series(tmp_path, volume):
    write_series(tmp_path / "series", volume)
    (tmp_path / "empty").mkdir()
    assert is_dicom_series(tmp_path / "series") and is_dicom_series(str(tmp_path / "series"))
    assert not is_dicom_series(tmp_path / "empty") and not is_dicom_series(tmp_path / "missing")
    assert not is_dicom_series(next((tmp_path / "series").iterdir()))  # one slice file is not a series folder


def test_broken_series_are_one_line_errors(tmp_path, volume):
    write_series(tmp_path / "two", volume, series_uid="1.2.3.1")
    write_series(tmp_path / "two", volume, series_uid="1.2.3.2", origin=(0.0, 0.0, 300.0))
    write_series(tmp_path / "gap", volume, skip=3)
    write_series(tmp_path / "single", volume[:1])
    write_series(tmp_path / "tilted", volume, oblique=False, tilt_mm=0.6)
    write_series(tmp_path / "parent" / "series", volume)
    write_series(tmp_path / "dup", volume)
    shutil.copyfile(sorted((tmp_path / "dup").iterdir())[2], tmp_path / "dup" / "copy of slice 3")
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not dicom")
    cases = {"two": "holds 2 DICOM series (1.2.3.1, 1.2.3.2); point at a folder holding one series",
             "gap": "not evenly spaced", "single": "has 1 slice", "tilted": "not stacked along the normal",
             "dup": "two DICOM slices at the same position",
             "empty": "no DICOM series found", "junk": "no DICOM series found",
             "parent": "it has 1 subfolder(s): point at the one holding the slices"}
    for name, problem in cases.items():
        with pytest.raises(VlsegError) as err:
            load_scan(tmp_path / name)
        assert str(err.value).startswith(f"{tmp_path / name}: ") and problem in str(err.value), str(err.value)
        assert "\n" not in str(err.value)
    one_file = next((tmp_path / "gap").iterdir())
    with pytest.raises(VlsegError, match="a single DICOM file; pass the folder holding the whole series"):
        load_scan(one_file)


# ------------------------------------------------------------------------------------------------------ converter


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
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"},
                                                   "labels": {"background": 0, "liver": 1},
                                                   "file_ending": ".nii.gz"}))
    mapping = tmp_path / "map.yaml"
    mapping.write_text("dataset: Mixed\nmodality: CT\nlabels: {liver: liver}\n")
    manifest = tmp_path / "corpus" / "manifest.jsonl"
    before = _digest(root)
    code = convert_main(["--source", str(root), "--map", str(mapping), "--manifest", str(manifest),
                         "--split", "test"])
    assert code == 1  # one case failed: reported, the others written
    assert _digest(root) == before  # raw data is only read
    cases = {c.case_id: c for c in read_manifest(manifest)}
    assert sorted(cases) == ["Mixed_dcm", "Mixed_nii"]
    assert cases["Mixed_dcm"].image.is_dir() and cases["Mixed_dcm"].split == "test"
    assert cases["Mixed_dcm"].boxes == cases["Mixed_nii"].boxes and cases["Mixed_dcm"].present == {"liver": True}
    np.testing.assert_allclose(cases["Mixed_dcm"].affine, load_scan(root / "imagesTr" / "dcm_0000").original_affine)
    report = json.loads((manifest.parent / "convert_report_Mixed.json").read_text())
    assert report["dataset"] == "Mixed" and report["converted"] == ["Mixed_dcm", "Mixed_nii"]
    [error] = report["errors"]
    assert error["case"] == "Mixed_bad" and error["file"] == str(root / "labelsTr" / "bad.nii.gz")
    assert error["problem"].startswith("label grid does not match image")

    # NRRD images and labels through file_ending; a 3D Slicer <case>.seg.nrrd label map belongs to <case>
    nrrd = tmp_path / "Dataset201_Nrrd"
    (nrrd / "imagesTr").mkdir(parents=True)
    (nrrd / "labelsTr").mkdir()
    img = sitk.GetImageFromArray(volume)
    img.SetSpacing((0.8, 0.9, 2.5))
    img.SetDirection(tuple(_direction(True).flatten()))
    lab = sitk.GetImageFromArray((volume >= 300).astype(np.uint8))
    lab.CopyInformation(img)
    for case in ("n1", "n2"):
        sitk.WriteImage(img, str(nrrd / "imagesTr" / f"{case}_0000.nrrd"))
    sitk.WriteImage(lab, str(nrrd / "labelsTr" / "n1.nrrd"))
    sitk.WriteImage(lab, str(nrrd / "labelsTr" / "n2.seg.nrrd"))
    (nrrd / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"},
                                                   "labels": {"background": 0, "liver": 1},
                                                   "file_ending": ".nrrd"}))
    written, errors, _ = convert(nrrd, mapping, manifest, val_fraction=0.0, progress=False, dataset="NrrdSet")
    assert sorted(c.case_id for c in written) == ["NrrdSet_n1", "NrrdSet_n2"] and not errors
    assert all(c.boxes == cases["Mixed_dcm"].boxes for c in written)  # the same volume and mask as the DICOM case
    assert {c.dataset for c in read_manifest(manifest)} == {"Mixed", "NrrdSet"}  # other datasets' lines kept
    report = json.loads((manifest.parent / "convert_report_NrrdSet.json").read_text())
    assert report["converted"] == ["NrrdSet_n1", "NrrdSet_n2"] and report["errors"] == []


# -------------------------------------------------------------------------------------------- real series (patient B)


def anatomy_problems(scan, label) -> list[str]:
    """What is wrong, anatomically, with ``label`` on ``scan`` (a contrast CT through liver and spleen): both organs
    are soft tissue (nearly all voxels 0..250 HU) and far from the mean of everything else (air, fat, bone)."""
    problems = []
    outside = float(scan.data[label == 0].mean())
    for name, value in (("liver", LIVER), ("spleen", SPLEEN)):
        hu = scan.data[label == value]
        if hu.size == 0:
            problems.append(f"no {name} voxels")
            continue
        soft = float(((hu >= 0) & (hu <= 250)).mean())
        if not (0 <= hu.mean() <= 250 and soft >= 0.95 and abs(hu.mean() - outside) > 150):
            problems.append(f"{name}: mean {hu.mean():.0f} HU, {soft:.0%} of voxels in 0..250 HU, "
                            f"outside mean {outside:.0f} HU")
    return problems


def test_real_patient_b_keeps_its_label_on_the_right_voxels_through_the_converter(tmp_path):
    assert sum(p.stat().st_size for p in REAL.rglob("*") if p.is_file()) < 600_000
    label_file = nib.load(REAL / "label.nii.gz")
    series = load_scan(REAL / "dicom")
    # the label file really is stored in another axis order than the series: only world space matches them up
    assert nib.aff2axcodes(label_file.affine) == ("L", "A", "S")
    assert nib.aff2axcodes(series.original_affine) == ("L", "P", "S")
    assert series.original_shape == (160, 128, 4)
    np.testing.assert_allclose(series.spacing, (1.953125, 1.953125, 2.0))

    root = tmp_path / "Dataset107_PatientB"
    shutil.copytree(REAL / "dicom", root / "imagesTr" / "B_0000")
    (root / "labelsTr").mkdir()
    shutil.copyfile(REAL / "label.nii.gz", root / "labelsTr" / "B.nii.gz")
    names = json.loads((REAL / "labels.json").read_text())
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"},
                                                   "labels": {"background": 0, **names}, "file_ending": ".nii.gz"}))
    manifest = tmp_path / "corpus" / "manifest.jsonl"
    written, errors, _ = convert(root, REPO / "vlseg" / "prepare" / "sample_maps" / "totalseg_total.yaml", manifest,
                              progress=False, dataset="PatientB", split="test")
    assert not errors and [c.case_id for c in written] == ["PatientB_B"]
    [case] = read_manifest(manifest)
    assert case.present["liver"] and case.present["spleen"] and case.classes["liver"] == [LIVER]
    scan = load_scan(case.image)
    label = load_label(case.label, like=scan)
    assert anatomy_problems(scan, label) == []
    liver = scan.data[case.class_mask(label, "liver")]
    assert 60 < liver.mean() < 120  # contrast-enhanced liver parenchyma
    # the liver lies on the patient's right, the spleen on the left: RAS-canonical axis 0 runs towards the right
    x_liver = np.argwhere(label == LIVER)[:, 0].mean()
    x_spleen = np.argwhere(label == SPLEEN)[:, 0].mean()
    assert x_spleen < label.shape[0] / 2 < x_liver


def test_real_patient_b_check_fails_for_a_misordered_label():
    """The same label array read as if it were stored in the series' own axis order (the series' affine): the grid
    check passes, but anterior and posterior are swapped, and the anatomy check must say so."""
    scan = load_scan(REAL / "dicom")
    right = load_label(REAL / "label.nii.gz", like=scan)
    misordered = nib.Nifti1Image(np.asarray(nib.load(REAL / "label.nii.gz").dataobj), scan.original_affine)
    wrong = load_label(misordered, like=scan)  # same grid, so load_label cannot notice
    assert not np.array_equal(right, wrong)
    problems = anatomy_problems(scan, wrong)
    assert any(p.startswith("liver:") for p in problems) and any(p.startswith("spleen:") for p in problems), problems
