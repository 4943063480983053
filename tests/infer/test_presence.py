"""Presence without a validation split: manufactured targets, fitted rules, their scores."""

from __future__ import annotations

import numpy as np
import pytest

from vlseg.infer.segmenter import Segmenter
from vlseg.prepare.manifest import read_manifest


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
