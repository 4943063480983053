"""Every nnU-Net raw dataset vlseg writes passes nnU-Net v2's own ``verify_dataset_integrity``: the phantom corpus and
each kind of dataset the real-corpus builder lays out (NIfTI, NRRD, a DICOM series written as NIfTI, masks renumbered
onto the image, patient B with its synthetic lesion); and the check does reject what nnU-Net cannot take."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from data_prep.verify_nnunet import dataset_folders, verify
from vlseg.io.scan import load_label, load_scan
from vlseg.prepare.phantoms import generate_corpus
from vlseg.prepare.samples import lesion_case, relabelled, write_dataset
from vlseg.transforms.lesions import LesionConfig

pytest.importorskip("nnunetv2.experiment_planning.verify_dataset_integrity",
                    reason="nnunetv2 (the dev extra) is needed to run nnU-Net's own dataset check")

PATIENT_B = Path(__file__).resolve().parents[1] / "data" / "real" / "patient_b"  # 4 real DICOM slices + label
TOTAL = json.loads((PATIENT_B / "labels.json").read_text())  # TotalSegmentator "total": name → 1..117


def assert_passes(folder: Path) -> None:
    passed, note = verify(folder)
    assert passed and note == "", f"{folder.name}: {note}"


def _nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def test_the_phantom_corpus_passes(tmp_path):
    manifest = generate_corpus(tmp_path / "phantoms", n_train=2, n_test=1, shape=(24, 24, 24), progress=False)
    folders = dataset_folders(manifest.parent)
    assert [f.name for f in folders] == ["Dataset001_PhantomLiver", "Dataset002_PhantomKidney",
                                         "Dataset003_PhantomSpleen", "Dataset004_PhantomTest"]
    for folder in folders:
        assert_passes(folder)


def test_a_dicom_series_is_written_as_nifti_in_its_own_geometry_and_passes(tmp_path):
    folder = write_dataset(tmp_path / "raw", "Dataset907_Series", "CT", TOTAL,
                           [("B", PATIENT_B / "dicom", PATIENT_B / "label.nii.gz")])
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == ["B_0000.nii.gz"]
    series, written = load_scan(PATIENT_B / "dicom"), load_scan(folder / "imagesTr" / "B_0000.nii.gz")
    assert np.allclose(written.original_affine, series.original_affine)  # the series' axis order, not the label's
    np.testing.assert_array_equal(written.data, np.rint(series.data))
    # the label file is stored in another axis order; rewritten on the series' grid it holds the same world voxels
    assert np.allclose(nib.load(folder / "labelsTr" / "B.nii.gz").affine, series.original_affine)
    np.testing.assert_array_equal(load_label(folder / "labelsTr" / "B.nii.gz", like=written),
                                  load_label(PATIENT_B / "label.nii.gz", like=series))
    assert_passes(folder)

    kept = write_dataset(tmp_path / "series", "Dataset907_Series", "CT", TOTAL,
                         [("B", PATIENT_B / "dicom", PATIENT_B / "label.nii.gz")], keep_series=True)
    assert (kept / "imagesTr" / "B_0000").is_dir()  # vlseg's own layout: nnU-Net cannot read it, and says so
    passed, note = verify(kept)
    assert not passed and "expected number of training cases" in note


def test_the_synthetic_lesion_takes_the_next_value_and_passes(tmp_path):
    value = max(TOTAL.values()) + 1
    image, label = tmp_path / "L_0000.nii.gz", tmp_path / "L.nii.gz"
    made = lesion_case(PATIENT_B / "dicom", PATIENT_B / "label.nii.gz", image, label, value,
                       LesionConfig(count=(1, 1), radius_mm=(3.0, 3.5)))
    assert made["voxels"] > 0 and value in np.unique(np.asarray(nib.load(label).dataobj))
    folder = write_dataset(tmp_path / "raw", "Dataset908_Lesion", "CT", {**TOTAL, "liver_tumor_synthetic": value},
                           [("B", image, label)])
    assert_passes(folder)


def test_nrrd_and_renumbered_masks_pass(tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    image = sitk.GetImageFromArray(np.arange(6 * 7 * 8, dtype=np.int16).reshape(8, 7, 6))
    image.SetSpacing((0.8, 0.8, 6.5))
    image.SetOrigin((-99.6, 99.6, -78.0))
    label = sitk.GetImageFromArray((np.arange(6 * 7 * 8).reshape(8, 7, 6) % 5 == 0).astype(np.int32))
    label.CopyInformation(image)
    sitk.WriteImage(image, str(tmp_path / "img.nrrd"))
    sitk.WriteImage(label, str(tmp_path / "lab.nrrd"))
    assert_passes(write_dataset(tmp_path / "raw", "Dataset909_Nrrd", "MR", {"tumor": 1},
                                [("Brain", tmp_path / "img.nrrd", tmp_path / "lab.nrrd")], ".nrrd"))

    affine = np.array([[0, 0, 1.5, -78.0], [-1.5, 0, 0, -135.0], [0, -1.5, 0, -34.2], [0, 0, 0, 1]])  # P, I, R
    ct = _nifti(tmp_path / "ct.nii.gz", np.zeros((6, 5, 4), np.int16), affine)
    vert = np.zeros((6, 5, 4), np.uint8)
    vert[1, :, :], vert[3, :, :], vert[4, 1, 1] = 21, 23, 221  # two vertebrae and one endplate
    masks = _nifti(tmp_path / "vert.nii.gz", vert, affine)
    labels = {"vertebra_L2": 1, "vertebra_L4": 2}
    cases = [("Spine", ct, relabelled(ct, [(masks, {"vertebra_L2": {21, 221}, "vertebra_L4": {23}})], labels))]
    folder = write_dataset(tmp_path / "raw", "Dataset912_Spine", "CT", labels, cases)
    assert set(np.unique(np.asarray(nib.load(folder / "labelsTr" / "Spine.nii.gz").dataobj))) == {0, 1, 2}
    assert_passes(folder)


def test_the_check_rejects_label_values_with_a_gap(tmp_path):
    """The negative control: what the old builder wrote for patient B's lesion (value 250 after 1..117) fails."""
    data = np.zeros((4, 4, 4), np.uint8)
    data[1, 1, 1], data[2, 2, 2] = 1, 3
    image = _nifti(tmp_path / "img.nii.gz", np.zeros((4, 4, 4), np.int16), np.eye(4))
    label = _nifti(tmp_path / "lab.nii.gz", data, np.eye(4))
    folder = write_dataset(tmp_path / "raw", "Dataset999_Gap", "CT", {"liver": 1, "liver_tumor": 3},
                           [("A", image, label)])
    passed, note = verify(folder)
    assert not passed and "consecutive" in note
