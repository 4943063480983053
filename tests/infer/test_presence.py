"""Presence without a validation split: manufactured targets, fitted rules, their scores."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from vlseg.errors import VlsegError
from vlseg.infer.calibrate import crop_boxes, crop_truth, excluding_box
from vlseg.infer.presence import (
    CalibratedPresence,
    StatisticalTest,
    Target,
    VolumeRule,
    auroc,
    fit_platt,
)
from vlseg.infer.segmenter import Segmenter
from vlseg.io.scan import crop_scan, load_label, load_scan
from vlseg.prepare.manifest import read_manifest
from vlseg.transforms.boxes import mask_box


def test_mean_probability_is_the_mean_over_the_thresholded_voxels(tiny_run, phantom_corpus):
    seg = Segmenter.from_pretrained(tiny_run, calibrated=False)
    case = read_manifest(phantom_corpus, split="test")[0]
    everything = seg.segment(case.image, ["liver"], presence_threshold=0.0, threshold=0.0).results[0]
    assert everything.present and 0.0 < everything.mean_probability < 1.0
    above = seg.segment(case.image, ["liver"], presence_threshold=0.0, threshold=everything.mean_probability)
    kept = above.results[0]
    assert kept.present and kept.mean_probability >= everything.mean_probability  # only the upper voxels are averaged
    assert seg.segment(case.image, ["liver"], presence_threshold=0.0, threshold=1.01).results[0].mean_probability \
        is None
    vetoed = seg.segment(case.image, ["liver"], presence_threshold=1.01).results[0]
    assert not vetoed.present and vetoed.mean_probability is None and not np.isnan(vetoed.presence_probability)
    assert pytest.approx(vetoed.presence_probability) == everything.presence_probability


def test_crops_keep_geometry_and_label_present_absent_and_slivers(phantom_corpus, tmp_path):
    case = next(c for c in read_manifest(phantom_corpus, split="train") if "spleen" in c.classes)
    scan = load_scan(case.image)
    label = load_label(case.label, like=scan)
    masks = {name: case.class_mask(label, name) for name in case.classes}
    lo, hi = np.array([3, 5, 2]), np.array([30, 33, 25])
    crop = crop_scan(scan, lo, hi)
    assert crop.data.shape == (27, 28, 23) and np.array_equal(crop.data, scan.data[3:30, 5:33, 2:25])
    # Every kept voxel keeps its world position, through a NIfTI file and back.
    assert np.allclose(crop.affine @ [0, 0, 0, 1], scan.affine @ [*lo, 1])
    assert np.allclose(crop.affine @ [4, 7, 9, 1], scan.affine @ [*(lo + [4, 7, 9]), 1])
    nib.save(nib.Nifti1Image(crop.data, crop.affine), tmp_path / "crop.nii.gz")
    again = load_scan(tmp_path / "crop.nii.gz")
    assert np.allclose(again.affine, crop.affine) and np.array_equal(again.data, crop.data)
    with pytest.raises(VlsegError, match="not inside its grid"):
        crop_scan(scan, [0, 0, 0], [41, 10, 10])

    voxel_ml = float(np.prod(scan.spacing)) / 1000.0
    spleen_lo, spleen_hi = mask_box(masks["spleen"])
    rng = np.random.default_rng(0)
    for _ in range(5):  # a slab beside the spleen never holds a voxel of it
        box = excluding_box(scan.data.shape, (spleen_lo, spleen_hi), rng)
        assert box is not None and crop_truth(masks, *box, voxel_ml)["spleen"] is False
    whole = crop_truth(masks, spleen_lo, spleen_hi, voxel_ml)
    assert whole["spleen"] is True
    sliver_hi = spleen_hi.copy()
    sliver_hi[0] = spleen_lo[0] + 1  # one plane of the spleen: neither present nor absent, left out
    assert "spleen" not in crop_truth(masks, spleen_lo, sliver_hi, voxel_ml)
    # Both kinds come out of crop_boxes, the same for the same seed.
    boxes = crop_boxes(masks, scan.data.shape, 8, np.random.default_rng(3))
    again = crop_boxes(masks, scan.data.shape, 8, np.random.default_rng(3))
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(boxes, again))
    kinds = {v for box in boxes for v in crop_truth(masks, *box, voxel_ml).values()}
    assert kinds == {True, False}


def synthetic(class_name, present, probabilities, **kw) -> list[Target]:
    return [Target("case", class_name, kw.get("modality", "CT"), present, float(p), kw.get("volume", 10.0),
                   kw.get("mean_probability", 0.8), kw.get("mean_intensity", 60.0)) for p in probabilities]


def test_fitting_recovers_per_class_thresholds_and_the_temperature():
    rng = np.random.default_rng(0)
    targets = (synthetic("liver", True, rng.uniform(0.6, 0.9, 20))
               + synthetic("liver", False, rng.uniform(0.1, 0.4, 20))
               + synthetic("spleen", True, rng.uniform(0.3, 0.45, 10))
               + synthetic("spleen", False, rng.uniform(0.05, 0.25, 10))
               + synthetic("heart", True, [0.9, 0.95]) + synthetic("heart", False, [0.1, 0.2, 0.3]))
    rule = CalibratedPresence.fit(targets)
    assert set(rule.class_thresholds) == {"liver", "spleen"}  # heart: 2 present targets, below MIN_PER_KIND
    assert 0.4 < rule.class_thresholds["liver"] < 0.6 and 0.25 < rule.class_thresholds["spleen"] < 0.3
    assert rule.threshold_for("heart") == rule.global_threshold
    assert all(rule.present(t) == t.present for t in targets if t.class_name != "heart")
    assert CalibratedPresence.from_json(rule.to_json()).class_thresholds == rule.class_thresholds
    # Platt scaling: labels drawn from sigmoid(2·x - 1) with balanced kinds give back a ≈ 2, b ≈ -1
    x = rng.normal(0.5, 2.0, 6000)
    y = rng.random(6000) < 1.0 / (1.0 + np.exp(-(2.0 * x - 1.0)))
    a, b = fit_platt(x, y)
    assert a == pytest.approx(2.0, abs=0.2) and b == pytest.approx(-1.0, abs=0.2)
    # The volume rule's threshold separates by balanced accuracy, in ml (not clipped to a probability)
    volumes = [Target("c", "liver", "CT", v > 5, 0.5, v, None, None) for v in (50.0, 20.0, 8.0, 0.0, 0.0, 3.0)]
    assert VolumeRule.fit(volumes).threshold == pytest.approx(5.5)


def test_statistical_test_rejects_out_of_distribution_and_keeps_in_distribution():
    rng = np.random.default_rng(1)
    fit = [Target("c", "liver", "CT", True, 0.9, 100.0, float(p), float(h))
           for p, h in zip(rng.normal(0.8, 0.04, 30), rng.normal(60.0, 10.0, 30))]
    fit += synthetic("liver", False, [0.9], mean_probability=0.3, mean_intensity=-900.0)  # absent: not fitted on
    test = StatisticalTest.fit(fit, alpha=0.05)
    assert test.stats["CT/liver"]["n"] == 30 and test.stats["CT/liver"]["intensity"][0] == pytest.approx(60, abs=5)
    typical = synthetic("liver", True, [0.9], mean_probability=0.8, mean_intensity=62.0)[0]
    air = synthetic("liver", True, [0.9], mean_probability=0.8, mean_intensity=-800.0)[0]  # wrong tissue
    unsure = synthetic("liver", True, [0.9], mean_probability=0.45, mean_intensity=60.0)[0]  # low confidence
    maskless = synthetic("liver", True, [0.9], volume=0.0, mean_probability=None, mean_intensity=None)[0]
    assert test.present(typical) and test.score(typical) > 0.3
    assert not test.present(air) and not test.present(unsure) and test.score(maskless) == 0.0
    # An MR target of the class: only the probability test, from the class over every modality
    mr = synthetic("liver", True, [0.9], modality="MR", mean_probability=0.8, mean_intensity=5.0)[0]
    assert "MR/liver" not in test.stats and len(test.p_values(mr)) == 1 and test.present(mr)
    assert StatisticalTest.from_json(test.to_json()).score(air) == test.score(air)


def test_auroc_exact_on_a_hand_example():
    scores = [0.9, 0.8, 0.4, 0.4, 0.2]
    present = [True, False, True, False, False]
    # present 0.9 beats all three absent; present 0.4 beats 0.2, ties 0.4 (half), loses to 0.8: (3 + 1.5) / 6
    assert auroc(scores, present) == 0.75
    assert auroc([0.1, 0.9], [False, True]) == 1.0 and auroc([0.9, 0.1], [False, True]) == 0.0
    assert np.isnan(auroc([0.1, 0.9], [True, True]))
