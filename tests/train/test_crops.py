"""A zoomed training crop keeps its label on its image: both are resampled at the same sample positions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vlseg.prepare.cache.read import CachedCase
from vlseg.prepare.manifest import Case
from vlseg.train.crops import CropDataset
from vlseg.vocab.vocabulary import Vocabulary

SHAPE = (64, 64, 48)


@pytest.fixture(scope="module")
def mirror_case():
    """A case whose image intensities equal its label: an off-centre ellipsoid 'liver' of value 1 on 0."""
    grid = np.indices(SHAPE, dtype=np.float32)
    centre, radii = (30.3, 33.7, 22.2), (8.0, 7.0, 5.0)
    label = (sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0).astype(np.uint8)
    case = Case("mirror", "Mirror", "CT", Path("image.nii.gz"), Path("label.nii.gz"), {"liver": [1]},
                {"liver": True}, SHAPE, (2.0, 2.0, 2.0), "train")
    return CachedCase(case=case, image=label.astype(np.float16), label=label, spacing=(2.0, 2.0, 2.0),
                      boxes={}, foreground={"liver": np.argwhere(label > 0)}, fill=0.0)


def _samples(case, zoom, n=16):
    vocab = Vocabulary.load("default").subset({"liver"})
    ds = CropDataset([case], vocab, [48, 48, 36], seed=1, foreground_prob=1.0, zoom_range=(zoom, zoom),
                     intensity_scale=(1.0, 1.0), intensity_shift=0.0)
    for i in range(n):
        s = ds[i]
        yield s["image"][0].numpy(), s["target"][s["classes"].index("liver")].numpy()


def _centroid(weights: np.ndarray) -> np.ndarray:
    return np.array([(g * weights).sum() / weights.sum() for g in np.indices(weights.shape)])


@pytest.mark.parametrize("zoom", [0.75, 1.3])
def test_a_zoomed_label_sits_on_its_image(mirror_case, zoom):
    offsets = []
    for image, target in _samples(mirror_case, zoom):
        faces = [np.take(target, i, axis=a) for a in range(3) for i in (0, -1)]
        assert target.any() and not any(f.any() for f in faces)  # the whole ellipsoid lies inside the crop
        # The resampled image is the ellipsoid blurred by interpolation: its centroid is where the label's must be
        # (up to the aliasing of nearest sampling, which averages out; floor-nearest shifted it by ~0.5 voxel).
        offsets.append(_centroid(image) - _centroid(target.astype(np.float64)))
    offsets = np.array(offsets)
    assert np.abs(offsets).max() < 0.2 and np.abs(offsets.mean(axis=0)).max() < 0.15, (zoom, offsets)


def test_without_zoom_the_crop_is_the_cached_region_itself(mirror_case):
    for image, target in _samples(mirror_case, 1.0):
        assert np.array_equal(image, target.astype(np.float32))
