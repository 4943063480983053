"""Synthetic liver tumours: containment, intensity, size, determinism, HU/normalised consistency, counts, config."""

import math
import time

import numpy as np
import pytest
from scipy import ndimage

from vlseg.errors import VlsegError
from vlseg.transforms.intensity import normalize_intensity
from vlseg.transforms.lesions import LesionConfig, maybe_synthesize_lesions, synthesize_case, synthesize_lesions

SPACING = (1.5, 1.5, 3.0)
SHAPE = (72, 72, 40)  # 108 x 108 x 120 mm
WINDOW = (-200.0, 300.0)


def phantom(shape=SHAPE, spacing=SPACING, liver_axes=(38.0, 34.0, 45.0), seed=0):
    """Air around a soft-tissue body with fat, and an ellipsoidal liver (60 HU) with noise; HU, float32."""
    grid = np.indices(shape).astype(np.float64)
    centre = [(n - 1) / 2 for n in shape]
    mm = [(grid[i] - centre[i]) * spacing[i] for i in range(3)]
    body = (mm[0] / 52) ** 2 + (mm[1] / 50) ** 2 < 1
    fat = body & ((mm[0] / 52) ** 2 + (mm[1] / 50) ** 2 > 0.8)
    liver = sum((mm[i] / liver_axes[i]) ** 2 for i in range(3)) < 1
    rng = np.random.default_rng(seed)
    image = np.full(shape, -1000.0)
    image[body] = 35.0
    image[fat] = -100.0
    image[liver] = 60.0
    image[body] += rng.normal(0.0, 8.0, size=int(body.sum()))
    return image.astype(np.float32), liver


@pytest.fixture(scope="module")
def scan():
    return phantom()


def components(mask):
    return ndimage.label(mask)[1]


def test_lesion_inside_organ_and_image_unchanged_outside(scan):
    image, liver = scan
    for seed in range(6):
        out, lesion = synthesize_lesions(image, liver, SPACING, np.random.default_rng(seed), LesionConfig())
        assert out.dtype == np.float32 and lesion.dtype == bool and out.shape == lesion.shape == image.shape
        assert lesion.any()
        assert not (lesion & ~liver).any()
        assert np.array_equal(out[~liver], image[~liver])
        assert not np.array_equal(out, image)
    # A lesion forced against the organ surface (nothing required inside) still never touches the fat beside it.
    edge = (int(np.argwhere(liver)[:, 0].max()), SHAPE[1] // 2, SHAPE[2] // 2)
    cfg = LesionConfig(margin_inside=0.0, radius_mm=(15.0, 15.0), irregularity=0.0)
    out, lesion = synthesize_lesions(image, liver, SPACING, np.random.default_rng(1), cfg, count=1, centre=edge)
    assert lesion[edge] and not (lesion & ~liver).any()
    assert np.array_equal(out[~liver], image[~liver])
    assert np.array_equal(out, synthesize_lesions(image, liver, SPACING, np.random.default_rng(1), cfg, count=1,
                                                  centre=edge)[0])


def test_contrast_and_volume_of_a_sphere(scan):
    image, liver = scan
    cfg = LesionConfig(radius_mm=(10.0, 10.0), contrast_hu=(-60.0, -60.0), elongation=(1.0, 1.0), irregularity=0.0)
    centre = tuple(n // 2 for n in SHAPE)
    out, lesion = synthesize_lesions(image, liver, SPACING, np.random.default_rng(3), cfg, count=1, centre=centre)
    assert lesion[centre] and components(lesion) == 1
    shift = float(out[lesion].mean() - image[lesion].mean())
    assert abs(shift - (-60.0)) < 6.0, shift
    volume = lesion.sum() * np.prod(SPACING)
    sphere = 4.0 / 3.0 * math.pi * 10.0 ** 3
    assert 0.85 * sphere < volume < 1.15 * sphere, (volume, sphere)
    # The texture keeps the lesion from being flat, with roughly the configured spread (plus damped liver noise).
    core = ndimage.binary_erosion(lesion, iterations=2)
    assert 6.0 < float(out[core].std()) < 25.0


def test_volume_within_radius_range(scan):
    image, liver = scan
    cfg = LesionConfig(radius_mm=(7.0, 14.0), margin_inside=0.8)
    lo = cfg.margin_inside * 4 / 3 * math.pi * 7.0 ** 3 * cfg.elongation[0] ** 2 * (1 - cfg.irregularity) ** 3
    hi = 4 / 3 * math.pi * 14.0 ** 3 * (1 + cfg.irregularity) ** 3
    shifts = []
    for seed in range(8):
        out, lesion = synthesize_lesions(image, liver, SPACING, np.random.default_rng(seed), cfg, count=1)
        assert components(lesion) == 1
        volume = lesion.sum() * np.prod(SPACING)
        assert 0.9 * lo <= volume <= 1.1 * hi, (seed, volume, lo, hi)
        shifts.append(float(out[lesion].mean() - image[lesion].mean()))
    # Each lesion's mean shift lies in the configured contrast range (a little pulled to 0 by the soft rim).
    assert all(-90.0 - 8.0 < s < -35.0 + 8.0 for s in shifts), shifts


def test_deterministic_for_a_seed_and_different_for_another(scan):
    image, liver = scan
    cfg = LesionConfig()
    a = synthesize_lesions(image, liver, SPACING, np.random.default_rng(11), cfg)
    b = synthesize_lesions(image, liver, SPACING, np.random.default_rng(11), cfg)
    c = synthesize_lesions(image, liver, SPACING, np.random.default_rng(12), cfg)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1]) and not np.array_equal(a[0], c[0])
    d = synthesize_case(image, liver, SPACING, 11, cfg)
    assert np.array_equal(d[0], a[0]) and np.array_equal(d[1], a[1])
    assert image.dtype == np.float32 and not np.shares_memory(a[0], image)  # input not modified in place
    assert np.array_equal(image, phantom()[0])


@pytest.mark.parametrize("contrast", [(-90.0, -35.0), (150.0, 300.0)])
def test_hu_scale_matches_normalising_afterwards(scan, contrast):
    image, liver = scan
    cfg = LesionConfig(contrast_hu=contrast)
    lo, hi = WINDOW
    scale = 2.0 / (hi - lo)
    out_hu, lesion_hu = synthesize_lesions(image, liver, SPACING, np.random.default_rng(5), cfg)
    normalised = normalize_intensity(image, "CT", WINDOW)
    out_n, lesion_n = synthesize_lesions(normalised, liver, SPACING, np.random.default_rng(5), cfg, hu_scale=scale)
    assert np.array_equal(lesion_hu, lesion_n)
    np.testing.assert_allclose(out_n, normalize_intensity(out_hu, "CT", WINDOW), atol=1e-4)
    # The normalised result never leaves the input's range (hyperdense lesions saturate at the input maximum).
    assert out_n.min() >= normalised.min() and out_n.max() <= normalised.max()
    if contrast[0] > 0:
        assert np.isclose(out_n[lesion_n].max(), normalised.max())


def test_empty_or_tiny_organ_leaves_image_unchanged(scan):
    image, liver = scan
    for organ in (np.zeros_like(liver), np.zeros(liver.shape, dtype=np.uint8)):
        out, lesion = synthesize_lesions(image, organ, SPACING, np.random.default_rng(0), LesionConfig())
        assert np.array_equal(out, image) and not lesion.any()
    tiny = np.zeros_like(liver)
    tiny[30:32, 30:32, 20] = True  # 4 voxels = 27 mm³, far below a 6 mm sphere
    out, lesion = synthesize_lesions(image, tiny, SPACING, np.random.default_rng(0), LesionConfig())
    assert np.array_equal(out, image) and not lesion.any()
    out, lesion = synthesize_lesions(image, liver, SPACING, np.random.default_rng(0), LesionConfig(), count=0)
    assert np.array_equal(out, image) and not lesion.any()


def test_count_respected(scan):
    image, liver = scan
    cfg = LesionConfig(radius_mm=(6.0, 12.0))
    for seed in range(5):
        for n in (1, 2, 3):
            _, lesion = synthesize_lesions(image, liver, SPACING, np.random.default_rng(seed), cfg, count=n)
            assert 1 <= components(lesion) <= n
    seen = set()
    for seed in range(12):
        _, lesion = synthesize_case(image, liver, SPACING, seed, LesionConfig(count=(2, 3), radius_mm=(6.0, 10.0)))
        seen.add(components(lesion))
    assert seen <= {1, 2, 3} and max(seen) >= 2


def test_hyperdense_brightens(scan):
    image, liver = scan
    cfg = LesionConfig(contrast_hu=(40.0, 60.0))
    out, lesion = synthesize_lesions(image, liver, SPACING, np.random.default_rng(2), cfg, count=1)
    shift = float(out[lesion].mean() - image[lesion].mean())
    assert 30.0 < shift < 65.0, shift
    assert (out[liver] >= image[liver] - 40.0).all()  # nothing darkened beyond texture noise


def test_probability_helper(scan):
    image, liver = scan
    out, lesion = maybe_synthesize_lesions(image, liver, SPACING, np.random.default_rng(0),
                                           LesionConfig(probability=0.0))
    assert np.array_equal(out, image) and not lesion.any()
    out, lesion = maybe_synthesize_lesions(image, liver, SPACING, np.random.default_rng(0),
                                           LesionConfig(probability=1.0))
    assert lesion.any()


def test_from_dict_accepts_yaml_style_values():
    cfg = LesionConfig.from_dict({"count": [2, 4], "radius_mm": [5, 9], "contrast_hu": [20, 40], "texture_hu": 0})
    assert cfg.count == (2, 4) and cfg.radius_mm == (5.0, 9.0) and cfg.contrast_hu == (20.0, 40.0)
    assert LesionConfig.from_dict(None) == LesionConfig() == LesionConfig.from_dict({})


@pytest.mark.parametrize("data", [
    {"radius": [5, 9]},
    {"probability": 1.5},
    {"probability": "high"},
    {"count": [3, 1]},
    {"count": [0, 0]},
    {"count": [1.5, 3]},
    {"count": 2},
    {"radius_mm": [0, 5]},
    {"radius_mm": [5, float("nan")]},
    {"contrast_hu": -50},
    {"texture_hu": -1},
    {"boundary_mm": -0.5},
    {"irregularity": 1.2},
    {"irregularity": True},
    {"elongation": [0.5, 1.2]},
    {"elongation": [0.0, 1.0]},
    {"margin_inside": -0.1},
    ["count", 2],
])
def test_bad_config_is_one_line_error(data):
    with pytest.raises(VlsegError) as info:
        LesionConfig.from_dict(data, source="configs/train.yaml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("configs/train.yaml: ")


def test_bad_arguments(scan):
    image, liver = scan
    rng = np.random.default_rng(0)
    with pytest.raises(VlsegError):
        synthesize_lesions(image, liver[:-1], SPACING, rng)
    with pytest.raises(VlsegError):
        synthesize_lesions(image, liver, (1.5, 0.0, 3.0), rng)
    with pytest.raises(VlsegError):
        synthesize_lesions(image, liver, SPACING, rng, hu_scale=0.0)
    with pytest.raises(VlsegError):
        synthesize_lesions(image, liver, SPACING, rng, centre=(0, 0, 99))
    # A centre outside the organ falls back to a drawn one.
    _, lesion = synthesize_lesions(image, liver, SPACING, rng, count=1, centre=(0, 0, 0))
    assert lesion.any() and not lesion[0, 0, 0]


def test_crop_timing(capsys):
    shape = (64, 64, 48)
    image, liver = phantom(shape=shape, liver_axes=(45.0, 40.0, 60.0))
    normalised = normalize_intensity(image, "CT", WINDOW)
    cfg = LesionConfig()
    synthesize_lesions(normalised, liver, SPACING, np.random.default_rng(0), cfg, hu_scale=2 / 500)  # warm-up
    times = []
    for seed in range(10):
        start = time.perf_counter()
        _, lesion = synthesize_lesions(normalised, liver, SPACING, np.random.default_rng(seed), cfg, hu_scale=2 / 500)
        times.append(time.perf_counter() - start)
        assert lesion.any()
    with capsys.disabled():
        print(f"\nsynthesize_lesions on a {shape} crop: median {1000 * np.median(times):.1f} ms, "
              f"max {1000 * max(times):.1f} ms")
