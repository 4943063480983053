"""The model's frame: the numbers the steps gave when inference and caching each did them, the scan's own grid when
there is no working spacing, label values kept, and the way back equal to what inference thresholds box by box."""

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vlseg.errors import VlsegError
from vlseg.infer.stitching import upsample_box
from vlseg.io.scan import load_scan
from vlseg.transforms.frame import ModelFrame, to_model_frame
from vlseg.transforms.intensity import CT_WINDOW, normalize_intensity
from vlseg.transforms.spatial import resample_to_spacing


@pytest.fixture(scope="module")
def ct_scan(tmp_path_factory):
    """A CT file stored L-P-I with anisotropic voxels: the frame starts from its RAS-canonical form."""
    rng = np.random.default_rng(3)
    hu = rng.normal(40.0, 250.0, size=(30, 26, 12)).astype(np.float32)
    affine = np.array([[-0.8, 0, 0, 20.0], [0, -1.1, 0, 30.0], [0, 0, -3.0, 40.0], [0, 0, 0, 1.0]])
    path = tmp_path_factory.mktemp("frame") / "ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), path)
    return load_scan(path)


def test_intensities_match_the_steps_written_out(ct_scan):
    data, frame = to_model_frame(ct_scan, "ct", (-150.0, 250.0), spacing=[1.5, 1.5, 4.0])
    assert frame.resampled and frame.scan_shape == ct_scan.data.shape == (30, 26, 12)
    assert frame.spacing == (1.5, 1.5, 4.0) and frame.shape == (16, 19, 9)  # round(n * native / working)
    lo, hi = -150.0, 250.0
    windowed = (np.clip(ct_scan.data, lo, hi) - lo) / (hi - lo) * 2.0 - 1.0
    expected = F.interpolate(torch.from_numpy(windowed.astype(np.float32))[None, None], size=frame.shape,
                             mode="trilinear", align_corners=False)[0, 0].numpy()
    assert data.dtype == np.float32 and data.shape == frame.shape
    np.testing.assert_allclose(data, expected, atol=1e-6)
    # exactly what Segmenter.segment and the cache computed before there was one copy of the steps
    before = resample_to_spacing(normalize_intensity(ct_scan.data, "ct", (-150.0, 250.0)), ct_scan.spacing,
                                 [1.5, 1.5, 4.0], order=1)
    assert np.array_equal(data, before)


def test_without_working_spacing_the_scan_grid_is_the_models(ct_scan):
    data, frame = to_model_frame(ct_scan, "CT")
    assert not frame.resampled and frame.shape == frame.scan_shape and frame.spacing == ct_scan.spacing
    assert np.array_equal(data, normalize_intensity(ct_scan.data, "CT", CT_WINDOW))
    assert float(data.min()) == -1.0 and float(data.max()) == 1.0  # the default window clips this noise
    label = np.arange(data.size, dtype=np.int32).reshape(data.shape) % 7
    assert frame.label(label) is label and np.array_equal(frame.to_scan(data), data)


def test_label_keeps_values_and_comes_back_to_the_scan_grid():
    frame = ModelFrame.of((20, 20, 10), (1.0, 1.0, 2.0), (2.0, 2.0, 2.0))
    label = np.zeros((20, 20, 10), np.uint16)
    label[4:12, 6:14, 2:8] = 300
    label[12:16, 6:10, 2:4] = 7
    small = frame.label(label)
    assert small.shape == (10, 10, 10) and small.dtype == np.uint16 and set(np.unique(small)) == {0, 7, 300}
    back = frame.to_scan(small, order=0)
    assert back.shape == label.shape and np.array_equal(back, label)  # whole 2 mm blocks survive the round trip


def test_the_way_back_is_what_inference_thresholds_box_by_box():
    frame = ModelFrame.of((37, 29, 23), (0.9, 1.3, 2.5), (2.0, 2.0, 3.0))
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in frame.shape], indexing="ij")
    prob = np.exp(-((x - 0.2) ** 2 + (y + 0.1) ** 2 + z ** 2) * 4).astype(np.float32)
    full = frame.to_scan(prob) >= 0.5
    offset, crop = upsample_box(prob, frame.scan_shape, 0.5)
    placed = np.zeros(frame.scan_shape, bool)
    placed[tuple(slice(o, o + n) for o, n in zip(offset, crop.shape))] = crop.astype(bool)
    assert full.any() and np.array_equal(full, placed)


@pytest.mark.parametrize("spacing", [(2.0, 0.0, 2.0), (2.0, 2.0), "fine"])
def test_bad_working_spacing_is_one_line(ct_scan, spacing):
    with pytest.raises(VlsegError, match="target_spacing must be 3 positive numbers"):
        to_model_frame(ct_scan, "CT", spacing=spacing)
