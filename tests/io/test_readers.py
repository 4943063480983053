"""The table of scan formats: built-in entries recognised by suffix or kind, and a format added by registering one
reader, which ``load_scan``, ``save_like`` and ``vlseg predict``'s folder listing then take like any other."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from vlseg.cli.predict import case_name, list_inputs
from vlseg.errors import VlsegError
from vlseg.io.readers import find_reader, scan_reader, scan_suffixes
from vlseg.io.scan import load_scan
from vlseg.io.writers import save_like
from vlseg.registry import SCAN_READERS

# Axis 0 runs towards the patient's left (2 mm), 1 towards anterior (3 mm), 2 towards superior (4 mm).
NPY_AFFINE = np.array([[-2.0, 0, 0, 10], [0, 3, 0, -5], [0, 0, 4, 7], [0, 0, 0, 1]])


def _read_npy(path: Path) -> nib.Nifti1Image:
    if not path.is_file():
        raise VlsegError(f"{path}: file not found")
    return nib.Nifti1Image(np.load(path), NPY_AFFINE)


@pytest.fixture
def npy_format():
    """A ``.npy`` format (fixed affine) and a folder format holding ``volume.npy``, registered for one test."""
    scan_reader("test-npy", suffixes=(".NPY",))(_read_npy)
    scan_reader("test-npy-folder", folder=True, claims=lambda p: (p / "volume.npy").is_file())(
        lambda p: _read_npy(p / "volume.npy"))
    yield
    SCAN_READERS.unregister("test-npy")
    SCAN_READERS.unregister("test-npy-folder")


def test_built_in_formats_are_found_by_suffix_and_kind(tmp_path):
    assert {".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".npz"} == set(scan_suffixes())
    assert scan_suffixes().index(".nii.gz") < scan_suffixes().index(".nii")  # longest first
    assert find_reader(tmp_path / "a.nii.gz").name == "nifti" and find_reader(tmp_path / "a.NRRD").name == "itk"
    assert find_reader(tmp_path / "a.img").name == "nifti"  # what no format claims is read as NIfTI...
    assert find_reader(tmp_path).name == "dicom"  # ...and every folder as a DICOM series
    (tmp_path / "b.nrrd").mkdir()
    assert find_reader(tmp_path / "b.nrrd").name == "dicom"  # a suffix speaks only for its kind


def test_a_registered_format_is_read_with_its_geometry(tmp_path, npy_format):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    np.save(tmp_path / "vol.npy", data)
    scan = load_scan(tmp_path / "vol.npy")
    assert scan.spacing == (2.0, 3.0, 4.0) and scan.header is None
    np.testing.assert_array_equal(scan.data, data[::-1].astype(np.float32))  # L → R: axis 0 flipped
    # The canonical first voxel is the file's last along axis 0, at the same place in the world.
    np.testing.assert_allclose(scan.affine @ [0, 0, 0, 1], NPY_AFFINE @ [3, 0, 0, 1])
    out = save_like(scan.data > 100, scan, tmp_path / "mask.nii.gz")
    written = nib.load(out)
    np.testing.assert_allclose(written.affine, NPY_AFFINE)
    np.testing.assert_array_equal(np.asarray(written.dataobj), data > 100)  # voxel for voxel on the file's grid

    with pytest.raises(VlsegError, match=r"missing\.npy: file not found"):
        load_scan(tmp_path / "missing.npy")  # the reader's own message
    np.save(tmp_path / "flat.npy", np.zeros((4, 5), np.float32))
    with pytest.raises(VlsegError, match=r"flat\.npy: not a 3D image \(shape 4x5\)"):
        load_scan(tmp_path / "flat.npy")  # the common checks apply to every format


def test_a_registered_folder_format_is_claimed_before_the_dicom_fallback(tmp_path, npy_format):
    data = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
    (tmp_path / "case").mkdir()
    np.save(tmp_path / "case" / "volume.npy", data)
    np.testing.assert_array_equal(load_scan(tmp_path / "case").data, data[::-1])
    (tmp_path / "other").mkdir()
    with pytest.raises(VlsegError, match="other: no DICOM series found in this folder"):
        load_scan(tmp_path / "other")


def test_predict_lists_files_of_a_registered_format(tmp_path, npy_format):
    for name in ("a.npy", "b.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_inputs(tmp_path)] == ["a.npy", "b.nii.gz"]
    assert case_name(Path("x/a.npy")) == "a" and ".npy" in scan_suffixes()


def test_two_formats_claiming_one_suffix_is_a_one_line_error(tmp_path, npy_format):
    scan_reader("test-npy-twin", suffixes=(".npy",))(_read_npy)
    try:
        with pytest.raises(VlsegError, match=r"a\.npy: several scan formats claim this file \(test-npy, test-npy-tw"):
            load_scan(tmp_path / "a.npy")
    finally:
        SCAN_READERS.unregister("test-npy-twin")


def test_a_reader_returning_no_image_is_a_one_line_error(tmp_path):
    scan_reader("test-broken", suffixes=(".broken",))(lambda path: np.zeros((2, 2, 2)))
    try:
        with pytest.raises(VlsegError, match=r"x\.broken: unusable image \("):
            load_scan(tmp_path / "x.broken")
    finally:
        SCAN_READERS.unregister("test-broken")
