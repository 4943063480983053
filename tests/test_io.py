"""Geometry: scans are read into RAS-canonical arrays and outputs land voxel for voxel on the input grid."""

import nibabel as nib
import numpy as np
import pytest

from vlseg.errors import VlsegError
from vlseg.io import load_scan, normalize_intensity, resample_to_shape, resample_to_spacing, save_like


def _write(tmp_path, name, data, affine):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


ORIENTATIONS = {
    "RAS": np.diag([2.0, 3.0, 4.0, 1.0]),
    "LPS": np.diag([-2.0, -3.0, 4.0, 1.0]),
    "PSL": np.array([[0, 0, -4.0, 0], [-2.0, 0, 0, 0], [0, 3.0, 0, 0], [0, 0, 0, 1]]),
}


@pytest.mark.parametrize("name", list(ORIENTATIONS))
def test_canonical_orientation_and_exact_round_trip(tmp_path, name):
    affine = ORIENTATIONS[name].copy()
    affine[:3, 3] = [15.0, -7.0, 33.0]
    rng = np.random.default_rng(0)
    data = rng.normal(size=(6, 7, 8)).astype(np.float32)
    path = _write(tmp_path, f"{name}.nii.gz", data, affine)
    scan = load_scan(path)
    assert nib.aff2axcodes(scan.affine) == ("R", "A", "S")
    # A voxel keeps its world coordinate through canonicalisation.
    ijk = np.array([1, 2, 3])
    world = affine @ [*ijk, 1]
    cijk = np.rint(np.linalg.inv(scan.affine) @ world)[:3].astype(int)
    assert scan.data[tuple(cijk)] == pytest.approx(data[tuple(ijk)])
    assert sorted(scan.spacing) == [2.0, 3.0, 4.0]
    # A mask computed on the canonical grid is written in the file's own layout and affine.
    out = save_like((scan.data > 0).astype(np.uint8), scan, tmp_path / "mask.nii.gz")
    written = nib.load(out)
    assert written.shape == data.shape and np.allclose(written.affine, affine)
    assert np.array_equal(np.asarray(written.dataobj), (data > 0).astype(np.uint8))
    assert written.get_data_dtype() == np.uint8
    assert not list(tmp_path.glob(".tmp-*"))
    stacked = scan.to_original(np.stack([scan.data, -scan.data]))
    assert np.array_equal(stacked[1], -data)


def test_singleton_4d_is_squeezed_and_scaling_applied(tmp_path):
    img = nib.Nifti1Image(np.ones((4, 5, 6, 1), np.int16), np.eye(4))
    img.header.set_slope_inter(2.0, -1.0)
    path = tmp_path / "s.nii.gz"
    nib.save(img, path)
    scan = load_scan(path)
    assert scan.data.shape == (4, 5, 6) and np.all(scan.data == 1.0)


def test_degenerate_affine(tmp_path):
    header = nib.Nifti1Header()  # an sform whose y column is zero: nibabel reads it back as is
    header.set_data_shape((4, 4, 4))
    header["sform_code"] = 1
    header["srow_x"], header["srow_y"], header["srow_z"] = [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]
    path = tmp_path / "deg.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), None, header=header), path)
    with pytest.raises(VlsegError, match="deg.nii: degenerate affine"):
        load_scan(path)


def test_resampling():
    vol = np.zeros((10, 10, 10), np.float32)
    vol[2:5, 2:5, 2:5] = 3
    assert resample_to_spacing(vol, (1, 1, 1), (2, 2, 2)).shape == (5, 5, 5)
    labels = resample_to_spacing(vol.astype(np.int32), (1, 1, 1), (0.5, 0.5, 2.0), order=0)
    assert labels.shape == (20, 20, 5) and set(np.unique(labels)) == {0, 3}
    probs = resample_to_shape(np.stack([vol, vol]), (5, 5, 5))
    assert probs.shape == (2, 5, 5, 5) and probs.max() <= 3 + 1e-6


def test_intensity_normalisation():
    ct = normalize_intensity(np.array([-1000.0, -200.0, 50.0, 300.0, 2000.0]), "ct")
    assert ct.tolist() == pytest.approx([-1.0, -1.0, 0.0, 1.0, 1.0])
    mr = normalize_intensity(np.random.default_rng(0).uniform(1, 100, size=(8, 8, 8)), "MRI")
    assert abs(mr.mean()) < 1e-3 and abs(mr.std() - 1) < 1e-2
    with pytest.raises(VlsegError, match="modality 'PET': unknown"):
        normalize_intensity(np.zeros(3), "PET")
