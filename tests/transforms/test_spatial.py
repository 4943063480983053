"""The one spacing check and the grid a spacing gives."""

import numpy as np
import pytest

from vlseg.errors import VlsegError
from vlseg.transforms.spatial import positive_triple, resample_to_spacing, resampled_shape


def test_positive_triple_accepts_numbers_and_says_where_and_what():
    assert positive_triple([1, "2.5", np.float32(3)], "spacing") == (1.0, 2.5, 3.0)
    with pytest.raises(VlsegError, match=r"^overlay: spacing must be 3 positive numbers, got \(1, 0, 1\)$"):
        positive_triple((1, 0, 1), "spacing", where="overlay")
    with pytest.raises(VlsegError, match=r"^data.target_spacing \(mm\) must be 3 positive numbers, got \[1, 1\]$"):
        positive_triple([1, 1], "data.target_spacing (mm)", where="")
    for bad in (None, 3.0, [1, float("nan"), 1], [1, float("inf"), 1], ["a", 1, 1], [1, -2, 1]):
        with pytest.raises(VlsegError):
            positive_triple(bad, "spacing")


def test_resampled_shape_is_the_grid_resampling_makes():
    vol = np.zeros((15, 7, 40), np.float32)
    for spacing, target in [((0.8, 1.0, 3.0), (1.6, 0.5, 1.5)), ((1, 1, 1), (100, 100, 100)), ((2, 2, 2), (2, 2, 2))]:
        shape = resampled_shape(vol.shape, spacing, target)
        assert resample_to_spacing(vol, spacing, target).shape == shape
    assert resampled_shape((15, 7, 40), (0.8, 1.0, 3.0), (1.6, 0.5, 1.5)) == (8, 14, 80)
    assert resampled_shape((2, 5, 15, 7, 40), (1, 1, 1), (100, 100, 100)) == (1, 1, 1)  # spatial axes last, >= 1
