"""Geometry: scans are read into RAS-canonical arrays and outputs land voxel for voxel on the input grid.

Every case writes real NIfTI files under ``tmp_path``; all volumes are tiny so the module runs in about a second.
"""

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from vlseg.errors import VlsegError
from vlseg.io.scan import load_label, load_scan
from vlseg.io.writers import save_like
from vlseg.transforms.intensity import normalize_intensity
from vlseg.transforms.spatial import resample_to_shape, resample_to_spacing

SHAPE = (6, 7, 8)


def _affine(columns, origin=(15.0, -7.0, 33.0)):
    """4x4 affine whose voxel axes are the given world-space column vectors (mm per voxel step)."""
    a = np.eye(4)
    a[:3, :3] = np.array(columns, dtype=float).T
    a[:3, 3] = origin
    return a


# Each axis is a signed world direction with its own voxel size (2, 3, 4 mm), so permutations and flips are visible.
ORIENTATIONS = {
    "RAS": _affine([[2, 0, 0], [0, 3, 0], [0, 0, 4]]),
    "LPS": _affine([[-2, 0, 0], [0, -3, 0], [0, 0, 4]]),  # DICOM-style
    "PSL": _affine([[0, -2, 0], [0, 0, 3], [-4, 0, 0]]),  # axis 0 → Posterior, 1 → Superior, 2 → Left
    "ASR_swapped": _affine([[0, 3, 0], [0, 0, 4], [2, 0, 0]]),  # axes swapped, no flips
    "LIA_anisotropic": _affine([[-0.7, 0, 0], [0, 0, -5.0], [0, 1.25, 0]]),
}
EXPECTED_CODES = {"RAS": ("R", "A", "S"), "LPS": ("L", "P", "S"), "PSL": ("P", "S", "L"),
                  "ASR_swapped": ("A", "S", "R"), "LIA_anisotropic": ("L", "I", "A")}


def _save(path, data, affine, **header_fields):
    img = nib.Nifti1Image(data, affine)
    for key, value in header_fields.items():
        img.header[key] = value
    nib.save(img, path)
    return path


def _data(shape=SHAPE, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _only_files(folder):
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------------------------------- orientation round trip


@pytest.mark.parametrize("name", list(ORIENTATIONS))
def test_canonical_orientation_world_coordinates_and_exact_save(tmp_path, name):
    affine = ORIENTATIONS[name]
    data = _data()
    path = _save(tmp_path / f"{name}.nii.gz", data, affine)
    assert nib.aff2axcodes(nib.load(path).affine) == EXPECTED_CODES[name]

    scan = load_scan(path)
    assert nib.aff2axcodes(scan.affine) == ("R", "A", "S")
    assert scan.data.dtype == np.float32 and scan.data.flags.c_contiguous
    assert scan.path == path and scan.original_shape == SHAPE
    assert np.array_equal(scan.original_affine, nib.load(path).affine)
    assert isinstance(scan.header, nib.Nifti1Header)
    assert sorted(scan.data.shape) == sorted(SHAPE)
    # Spacing belongs to the canonical axes: the voxel size of the file axis that now points L→R, P→A, I→S.
    expected_spacing = [0.0, 0.0, 0.0]
    for col in range(3):
        direction = affine[:3, col]
        expected_spacing[int(np.argmax(np.abs(direction)))] = float(np.linalg.norm(direction))
    assert scan.spacing == pytest.approx(tuple(expected_spacing))
    assert np.allclose(np.linalg.norm(scan.affine[:3, :3], axis=0), scan.spacing)

    # Every voxel keeps its world coordinate: check a few, including corners.
    for ijk in [(0, 0, 0), (1, 2, 3), (5, 6, 7), (5, 0, 7)]:
        world = affine @ [*ijk, 1]
        cijk = np.linalg.solve(scan.affine, world)[:3]
        assert np.allclose(cijk, np.rint(cijk), atol=1e-6)
        assert scan.data[tuple(np.rint(cijk).astype(int))] == data[ijk]

    # A mask computed on the canonical grid is written in the file's own layout, shape and affine, voxel for voxel.
    mask_original = (data > 0.3).astype(np.uint8)
    out = save_like(scan.data > 0.3, scan, tmp_path / "mask.nii.gz")
    written = nib.load(out)
    assert out == tmp_path / "mask.nii.gz"
    assert written.shape == data.shape and np.allclose(written.affine, affine)
    assert np.array_equal(np.asarray(written.dataobj), mask_original)
    assert written.get_data_dtype() == np.uint8
    assert nib.aff2axcodes(written.affine) == EXPECTED_CODES[name]
    assert written.header["qform_code"] == nib.load(path).header["qform_code"]
    assert written.header["sform_code"] == nib.load(path).header["sform_code"]
    slope, inter = written.header.get_slope_inter()
    assert slope in (None, 1.0) and inter in (None, 0.0)
    assert _only_files(tmp_path) == sorted([path.name, "mask.nii.gz"])  # no temporary file left behind

    # to_original / to_canonical invert each other exactly, for 3D and channels-first 4D arrays.
    assert np.array_equal(scan.to_original(scan.data), data)
    assert np.array_equal(scan.to_canonical(data), scan.data)
    stacked = scan.to_original(np.stack([scan.data, -scan.data, 2 * scan.data]))
    assert stacked.shape == (3, *SHAPE)
    assert np.array_equal(stacked[0], data) and np.array_equal(stacked[1], -data)
    assert np.array_equal(stacked[2], 2 * data)


def test_save_like_keeps_other_dtypes_and_uncompressed_output(tmp_path):
    affine = ORIENTATIONS["PSL"]
    labels = np.random.default_rng(1).integers(0, 300, size=SHAPE).astype(np.int16)
    scan = load_scan(_save(tmp_path / "img.nii", labels, affine))
    out = save_like(scan.data.astype(np.int16), scan, tmp_path / "labels.nii", dtype=np.int16)
    written = nib.load(out)
    assert written.get_data_dtype() == np.int16 and not open(out, "rb").read(2) == b"\x1f\x8b"
    assert np.array_equal(np.asarray(written.dataobj), labels)
    probs = save_like(scan.data / 300.0, scan, tmp_path / "p.nii.gz", dtype=np.float32)
    assert np.allclose(nib.load(probs).get_fdata(), labels / 300.0, atol=1e-6)


def test_header_without_qform_or_sform_round_trips(tmp_path):
    # Both codes 0: nibabel falls back to the pixdim-based affine; the output must be read back the same way.
    header = nib.Nifti1Header()
    header.set_data_shape(SHAPE)
    header.set_zooms((1.5, 2.0, 2.5))
    header["qform_code"] = 0
    header["sform_code"] = 0
    img = nib.Nifti1Image(_data(), None, header=header)
    img.header["qform_code"] = img.header["sform_code"] = 0
    path = tmp_path / "nocodes.nii"
    nib.save(img, path)
    original = nib.load(path)
    assert original.header["qform_code"] == 0 and original.header["sform_code"] == 0
    scan = load_scan(path)
    written = nib.load(save_like(scan.data > 0, scan, tmp_path / "m.nii.gz"))
    assert np.allclose(written.affine, original.affine)
    assert np.array_equal(np.asarray(written.dataobj), (original.get_fdata() > 0).astype(np.uint8))


def test_qform_only_file_round_trips(tmp_path):
    affine = ORIENTATIONS["LPS"]
    img = nib.Nifti1Image(_data(), affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=0)
    path = tmp_path / "qform.nii.gz"
    nib.save(img, path)
    scan = load_scan(path)
    written = nib.load(save_like(scan.data > 0, scan, tmp_path / "m.nii.gz"))
    assert (written.header["qform_code"], written.header["sform_code"]) == (1, 0)
    assert np.allclose(written.affine, affine)


def test_in_memory_image_and_scan_inputs():
    affine = ORIENTATIONS["ASR_swapped"]
    data = _data()
    scan = load_scan(nib.Nifti1Image(data, affine))
    assert scan.path is None and nib.aff2axcodes(scan.affine) == ("R", "A", "S")
    assert np.array_equal(scan.to_original(scan.data), data)
    assert load_scan(scan) is scan


def test_singleton_4d_is_squeezed_and_scaling_applied(tmp_path):
    raw = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6, 1)
    img = nib.Nifti1Image(raw, ORIENTATIONS["LPS"])
    img.header.set_slope_inter(2.0, -1.0)
    path = tmp_path / "s.nii.gz"
    nib.save(img, path)
    scan = load_scan(path)
    assert scan.data.shape == (4, 5, 6) and scan.original_shape == (4, 5, 6)
    assert scan.data.dtype == np.float32
    assert np.array_equal(scan.to_original(scan.data), raw[..., 0] * 2.0 - 1.0)
    written = nib.load(save_like(scan.data > 100, scan, tmp_path / "m.nii.gz"))
    assert written.shape == (4, 5, 6) and np.allclose(written.affine, ORIENTATIONS["LPS"])
    assert np.array_equal(np.asarray(written.dataobj), (raw[..., 0] * 2 - 1 > 100).astype(np.uint8))


# ------------------------------------------------------------------------------------------------------------ labels


def test_label_in_other_orientation_on_same_grid_is_accepted(tmp_path):
    affine = ORIENTATIONS["LPS"]
    image = _data()
    labels = (image > 0).astype(np.uint8) + (image > 1).astype(np.uint8)
    scan = load_scan(_save(tmp_path / "img.nii.gz", image, affine))
    # Same voxels stored RAS: flip the first two file axes and adjust the affine to match.
    ras_img = nib.Nifti1Image(labels, affine).as_reoriented(nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt("RAS")))
    lab_path = tmp_path / "lab.nii.gz"
    nib.save(ras_img, lab_path)
    label = load_label(lab_path, like=scan)
    assert label.dtype == np.int32 and label.shape == scan.data.shape
    assert np.array_equal(scan.to_original(label), labels)
    assert set(np.unique(label)) <= {0, 1, 2}


def test_label_mismatches(tmp_path):
    scan = load_scan(_save(tmp_path / "img.nii.gz", _data(), np.eye(4)))
    wrong_shape = _save(tmp_path / "short.nii.gz", np.zeros((6, 7, 7), np.uint8), np.eye(4))
    with pytest.raises(VlsegError) as err:
        load_label(wrong_shape, like=scan)
    msg = str(err.value)
    assert str(wrong_shape) in msg and str(tmp_path / "img.nii.gz") in msg and "6x7x7 vs 6x7x8" in msg
    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    wrong_affine = _save(tmp_path / "shifted.nii.gz", np.zeros(SHAPE, np.uint8), shifted)
    with pytest.raises(VlsegError, match=r"shifted\.nii\.gz: label grid does not match image .*img\.nii\.gz.*0\.5"):
        load_label(wrong_affine, like=scan)
    # A difference below 1e-3 mm is tolerated.
    close = np.eye(4)
    close[0, 3] = 2e-4
    assert load_label(_save(tmp_path / "close.nii.gz", np.ones(SHAPE, np.uint8), close), like=scan).sum() == 336
    fractional = _save(tmp_path / "prob.nii.gz", np.full(SHAPE, 0.5, np.float32), np.eye(4))
    with pytest.raises(VlsegError, match=r"prob\.nii\.gz: not a label map"):
        load_label(fractional)


# ------------------------------------------------------------------------------------------------------- bad input


def _expect(path, *fragments):
    with pytest.raises(VlsegError) as err:
        load_scan(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg, msg
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def test_missing_file_and_directory(tmp_path):
    _expect(tmp_path / "missing.nii.gz", "file not found")
    folder = tmp_path / "folder.nii.gz"
    folder.mkdir()  # a folder is read as a DICOM series
    _expect(folder, "no DICOM series found")


def test_garbage_and_truncated_files(tmp_path):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"definitely not an image " * 40)
    _expect(garbage, "not a NIfTI image")
    zipped_text = tmp_path / "text.nii.gz"
    zipped_text.write_bytes(gzip.compress(b"hello " * 200))
    _expect(zipped_text, "not a NIfTI image")
    empty = tmp_path / "empty.nii"
    empty.write_bytes(b"")
    _expect(empty, "empty file")

    good = _save(tmp_path / "good.nii.gz", _data((20, 20, 20)), np.eye(4))
    blob = good.read_bytes()
    half = tmp_path / "half.nii.gz"
    half.write_bytes(blob[: len(blob) // 2])
    _expect(half, "truncated or corrupt gzip stream")
    head_only = tmp_path / "head.nii.gz"  # cut inside the header
    head_only.write_bytes(blob[:60])
    _expect(head_only, "truncated or corrupt gzip stream")
    bad_crc = tmp_path / "crc.nii.gz"  # every data byte present, checksum wrong: nibabel alone would not notice
    bad_crc.write_bytes(blob[:-8] + bytes(8))
    _expect(bad_crc, "truncated or corrupt gzip stream")

    plain = _save(tmp_path / "plain.nii", _data((20, 20, 20)), np.eye(4))
    cut = tmp_path / "cut.nii"
    cut.write_bytes(plain.read_bytes()[:5000])
    _expect(cut, "truncated file")


def test_wrong_dimensionality(tmp_path):
    flat = _save(tmp_path / "flat.nii.gz", np.zeros((20, 20), np.int16), np.eye(4))
    _expect(flat, "not a 3D image (shape 20x20)")
    four_d = _save(tmp_path / "four_d.nii.gz", np.zeros((10, 10, 8, 3), np.int16), np.eye(4))
    _expect(four_d, "not a 3D image (shape 10x10x8x3)")
    with pytest.raises(VlsegError, match="not a 3D image"):
        load_scan(nib.Nifti1Image(np.zeros((4, 4, 4, 2), np.float32), np.eye(4)))


def test_non_finite_voxels(tmp_path):
    data = np.zeros((10, 10, 8), np.float32)
    data[1, 2, 3] = np.nan
    data[4, 4, 4] = np.nan
    data[5, 5, 5] = np.inf
    _expect(_save(tmp_path / "nan.nii.gz", data, np.eye(4)), "3 voxels are NaN or infinite")


def test_degenerate_affines(tmp_path):
    header = nib.Nifti1Header()  # an sform whose y column is zero: nibabel reads it back as is
    header.set_data_shape((4, 4, 4))
    header["sform_code"] = 1
    header["srow_x"], header["srow_y"], header["srow_z"] = [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]
    path = tmp_path / "deg.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), None, header=header), path)
    _expect(path, "degenerate affine")
    # Two voxel axes pointing the same way: non-zero sizes, but a flat grid.
    header["srow_x"], header["srow_y"], header["srow_z"] = [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0]
    collinear = tmp_path / "collinear.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), None, header=header), collinear)
    _expect(collinear, "degenerate affine")


def test_bad_source_type():
    with pytest.raises(VlsegError, match="load_scan: expected"):
        load_scan(42)


def test_save_like_rejections_leave_nothing_behind(tmp_path):
    scan = load_scan(_save(tmp_path / "img.nii.gz", _data(), ORIENTATIONS["PSL"]))
    before = _only_files(tmp_path)
    with pytest.raises(VlsegError, match=r"out\.png: output name must end in \.nii or \.nii\.gz"):
        save_like(scan.data > 0, scan, tmp_path / "out.png")
    with pytest.raises(VlsegError, match=r"m\.nii\.gz: .*not on the scan's canonical grid"):
        save_like(np.zeros(SHAPE, np.uint8), scan, tmp_path / "m.nii.gz")  # file layout, not canonical
    with pytest.raises(VlsegError, match=r"m\.nii\.gz: values 0\.\.300 do not fit in uint8"):
        save_like(np.where(scan.data > 0, 300, 0), scan, tmp_path / "m.nii.gz")
    # The target name is taken by a folder: the write fails after the temporary file exists; it must be cleaned up.
    (tmp_path / "taken.nii.gz").mkdir()
    with pytest.raises(VlsegError, match=r"taken\.nii\.gz: cannot write"):
        save_like(scan.data > 0, scan, tmp_path / "taken.nii.gz")
    assert _only_files(tmp_path) == sorted(before + ["taken.nii.gz"])
    assert _only_files(tmp_path / "taken.nii.gz") == []
    with pytest.raises(VlsegError, match="not on the scan's canonical grid"):
        scan.to_original(np.zeros((2, 3, 4)))


def test_save_like_replaces_existing_file_and_creates_folders(tmp_path):
    scan = load_scan(_save(tmp_path / "img.nii.gz", _data(), np.eye(4)))
    target = tmp_path / "deep" / "er" / "mask.nii.gz"
    save_like(np.zeros(scan.data.shape, np.uint8), scan, target)
    save_like(np.ones(scan.data.shape, np.uint8), scan, target)
    assert np.asarray(nib.load(target).dataobj).min() == 1
    assert _only_files(target.parent) == ["mask.nii.gz"]
    assert oct(os.stat(target).st_mode & 0o777) != oct(0o600)  # not left private like a temporary file


# ------------------------------------------------------------------------------------------------------ resampling


def test_resampling_shapes_and_labels():
    vol = np.zeros((10, 10, 10), np.float32)
    vol[2:5, 2:5, 2:5] = 3
    down = resample_to_spacing(vol, (1, 1, 1), (2, 2, 2))
    assert down.shape == (5, 5, 5) and down.dtype == np.float32
    assert resample_to_spacing(vol, (0.8, 1.0, 3.0), (1.6, 0.5, 1.5)).shape == (5, 20, 20)

    labels = np.zeros((10, 10, 10), np.int32)
    labels[2:5, 2:5, 2:5] = 3
    labels[6:9, 1:4, 5:9] = 7
    up = resample_to_spacing(labels, (1, 1, 1), (0.5, 0.5, 2.0), order=0)
    assert up.shape == (20, 20, 5) and up.dtype == np.int32 and set(np.unique(up)) == {0, 3, 7}
    # Nearest neighbour up by 2 then back is the identity (centre-based, no half-voxel shift).
    assert np.array_equal(resample_to_shape(resample_to_shape(labels, (20, 20, 20), order=0), (10, 10, 10),
                                            order=0), labels)

    probs = resample_to_shape(np.stack([vol, vol / 3]), (5, 7, 9))
    assert probs.shape == (2, 5, 7, 9) and probs.max() <= 3 + 1e-6 and probs.min() >= 0
    assert np.allclose(probs[0], 3 * probs[1], atol=1e-5)
    # Same spacing: an independent float32 copy.
    same = resample_to_spacing(labels, (1, 1, 1), (1, 1, 1))
    assert same.dtype == np.float32 and np.array_equal(same, labels)
    # Trilinear keeps a constant field constant.
    assert np.allclose(resample_to_shape(np.full((4, 6, 8), 2.5, np.float32), (9, 3, 5)), 2.5)


def test_resampling_rejects_bad_arguments():
    vol = np.zeros((4, 4, 4), np.float32)
    with pytest.raises(VlsegError, match="order"):
        resample_to_shape(vol, (2, 2, 2), order=3)
    with pytest.raises(VlsegError, match="target_spacing"):
        resample_to_spacing(vol, (1, 1, 1), (1, 0, 1))
    with pytest.raises(VlsegError, match="expected a 3D"):
        resample_to_shape(np.zeros((4, 4)), (2, 2, 2))


# --------------------------------------------------------------------------------------------------- normalisation


def test_ct_normalisation():
    ct = normalize_intensity(np.array([-1000.0, -200.0, 50.0, 300.0, 2000.0]), "ct")
    assert ct.dtype == np.float32 and ct.tolist() == pytest.approx([-1.0, -1.0, 0.0, 1.0, 1.0])
    wide = normalize_intensity(np.linspace(-3000, 3000, 1000), "CT", ct_window=(-1000, 1000))
    assert wide.min() == -1.0 and wide.max() == 1.0
    with pytest.raises(VlsegError, match="ct_window"):
        normalize_intensity(np.zeros(3), "CT", ct_window=(10, 10))


def test_mr_normalisation():
    rng = np.random.default_rng(0)
    mr = normalize_intensity(rng.uniform(1, 100, size=(8, 8, 8)), "MRI")
    assert abs(mr.mean()) < 1e-3 and abs(mr.std() - 1) < 1e-2
    # Outliers are clipped to the 0.5/99.5 percentiles of the non-zero voxels before the z-score.
    body = rng.normal(500, 50, size=(20, 20, 20))
    body[:5] = 0  # background
    body[10, 10, 10] = 1e6
    out = normalize_intensity(body, "mr")
    fg = out[body != 0]
    assert abs(fg.mean()) < 1e-2 and abs(fg.std() - 1) < 2e-2 and fg.max() < 4
    assert np.all(out[:5] == out[0, 0, 0])  # background maps to one value
    assert np.array_equal(normalize_intensity(np.zeros((3, 3, 3)), "MR"), np.zeros((3, 3, 3), np.float32))
    assert normalize_intensity(body, "Mr").dtype == np.float32


def test_unknown_modality():
    with pytest.raises(VlsegError) as err:
        normalize_intensity(np.zeros(3), "PET")
    assert "'PET'" in str(err.value) and "CT" in str(err.value) and "MR" in str(err.value)


def test_nrrd_and_metaimage_read_on_the_same_world_grid(tmp_path):
    import SimpleITK as sitk

    affine = np.array([[0, 0, -4.0, 30], [-2.0, 0, 0, -12], [0, 3.0, 0, 7], [0, 0, 0, 1]])  # oblique-free, permuted
    data = np.random.default_rng(1).integers(-100, 100, size=(6, 7, 8)).astype(np.int16)
    nii = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), nii)
    reference = load_scan(nii)
    for suffix in (".nrrd", ".mha"):
        other = tmp_path / f"scan{suffix}"
        sitk.WriteImage(sitk.ReadImage(str(nii)), str(other))  # ITK converts to its LPS convention on the way
        scan = load_scan(other)
        assert np.array_equal(scan.data, reference.data) and np.allclose(scan.affine, reference.affine), suffix
        out = save_like((scan.data > 0).astype(np.uint8), scan, tmp_path / f"mask{suffix}.nii.gz")
        assert np.allclose(nib.load(out).affine, load_scan(other).original_affine)
    with pytest.raises(VlsegError, match="missing.nrrd: file not found"):
        load_scan(tmp_path / "missing.nrrd")
    (tmp_path / "bad.nrrd").write_bytes(b"NRRD0004\ngarbage")
    with pytest.raises(VlsegError, match="bad.nrrd: unreadable image"):
        load_scan(tmp_path / "bad.nrrd")
