"""How training samples are drawn from the cache: dataset mixing, class-aware centring, in-set negatives, masked
queries, zoom, lesion synthesis, determinism."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from vlseg.errors import VlsegError
from vlseg.prepare.cache.build import preprocess_corpus
from vlseg.prepare.cache.read import open_cache
from vlseg.prepare.manifest import read_manifest
from vlseg.train.crops import CropDataset, dataset_weights, synthesis_plan
from vlseg.vocab.vocabulary import Vocabulary

SETTINGS = {"ct_window": [-200.0, 300.0], "target_spacing": None, "spacing_per_dataset": {}}


@pytest.fixture(scope="module")
def cached(phantom_corpus, tmp_path_factory):
    cases = read_manifest(phantom_corpus, split="train")
    cache = tmp_path_factory.mktemp("sampling-cache")
    report = preprocess_corpus(cases, cache, SETTINGS, workers=0, progress=False)
    assert not report["errors"]
    return open_cache(cases, cache, SETTINGS)


@pytest.fixture(scope="module")
def vocabulary(cached):
    return Vocabulary.load("default").subset({n for c in cached for n in c.case.classes} | {"liver tumor"})


def test_dataset_weights_follow_the_temperature(cached):
    counts = Counter(c.case.dataset for c in cached)
    proportional = dataset_weights(cached, 1.0)
    total = sum(counts.values())
    for name, n in counts.items():
        assert proportional[name] == pytest.approx(n / total)
    flat = dataset_weights(cached, 1e6)
    assert max(flat.values()) - min(flat.values()) < 1e-4
    boosted = dataset_weights(cached, 1e6, {"PhantomKidney": 2.0})
    assert boosted["PhantomKidney"] == pytest.approx(2 * boosted["PhantomSpleen"])
    with pytest.raises(VlsegError, match="NoSuchDataset"):
        dataset_weights(cached, 1.0, {"NoSuchDataset": 2.0})
    with pytest.raises(VlsegError, match="temperature"):
        dataset_weights(cached, 0.0)


def test_drawn_datasets_match_their_weights(cached, vocabulary):
    ds = CropDataset(cached, vocabulary, [16, 16, 16], seed=3, dataset_temperature=1e6,
                     dataset_factors={"PhantomLiver": 3.0})
    drawn = Counter(ds[i]["dataset"] for i in range(300))
    assert drawn["PhantomLiver"] / 300 == pytest.approx(0.6, abs=0.08)  # 3 / (3 + 1 + 1)


def test_samples_are_a_function_of_seed_and_index(cached, vocabulary):
    a = CropDataset(cached, vocabulary, [24, 24, 16], seed=5, zoom_range=(0.8, 1.2))
    b = CropDataset(cached, vocabulary, [24, 24, 16], seed=5, zoom_range=(0.8, 1.2))
    for i in (0, 7, 123):
        x, y = a[i], b[i]
        assert x["texts"] == y["texts"] and x["case_id"] == y["case_id"]
        assert np.array_equal(x["image"].numpy(), y["image"].numpy())
        assert np.array_equal(x["target"].numpy(), y["target"].numpy())
    c = CropDataset(cached, vocabulary, [24, 24, 16], seed=6)
    assert any(not np.array_equal(a[i]["image"].numpy(), c[i]["image"].numpy()) for i in range(5))


def test_only_annotated_classes_are_asked_and_negatives_are_in_set(cached, vocabulary):
    ds = CropDataset(cached, vocabulary, [24, 24, 16], seed=0, max_queries=8, negative_fraction=0.25)
    by_id = {c.case.case_id: c for c in cached}
    negatives = 0
    for i in range(60):
        s = ds[i]
        annotated = set(by_id[s["case_id"]].case.classes)
        assert s["annotated"].all()  # masked loss: every asked class is annotated by the case's dataset
        assert set(s["classes"]) <= annotated
        assert len(s["classes"]) <= 8
        empty = [n for n, t in zip(s["classes"], s["target"]) if not t.any()]
        negatives += len(empty)
        if len(empty) < len(s["classes"]):  # something present: negatives keep to their quota unless slots are free
            present = len(s["classes"]) - len(empty)
            assert len(empty) <= max(2, 8 - present)
    assert negatives > 0


def test_naive_loss_asks_unannotated_classes_as_unsupervised_background(cached, vocabulary):
    ds = CropDataset(cached, vocabulary, [24, 24, 16], seed=0, max_queries=16, query_unannotated=True)
    s = next(ds[i] for i in range(20) if ds[i]["dataset"] == "PhantomKidney")
    unannotated = [n for n, a in zip(s["classes"], s["annotated"]) if not a]
    assert "liver" in unannotated and "spleen" in unannotated


def test_class_aware_centring_gives_rare_classes_their_share(cached, vocabulary):
    """In the liver dataset the tumour is a few percent of the foreground; centring per class gives it half of the
    foreground crops, which shows as the tumour being in most tumour-case crops."""
    liver_cases = [c for c in cached if c.case.dataset == "PhantomLiver" and "liver tumor" in c.foreground]
    ds = CropDataset(liver_cases, vocabulary, [12, 12, 12], seed=1, foreground_prob=1.0)
    names, probs = ds.centre_classes(liver_cases[0])
    assert set(names) == {"liver", "liver tumor"} and np.allclose(probs, 0.5)
    hits = sum(bool(s["target"][s["classes"].index("liver tumor")].any())
               for s in (ds[i] for i in range(80)) if "liver tumor" in s["classes"])
    assert hits >= 30
    weighted = CropDataset(liver_cases, vocabulary, [12, 12, 12], class_factors={"liver tumour": 3.0})
    _, probs = weighted.centre_classes(liver_cases[0])
    assert np.allclose(sorted(probs), [0.25, 0.75])
    with pytest.raises(VlsegError, match="class_weights"):
        CropDataset(liver_cases, vocabulary, [12, 12, 12], class_factors={"appendix": 2.0})


def test_zoom_keeps_the_crop_size_and_label_values(cached, vocabulary):
    ds = CropDataset(cached, vocabulary, [20, 20, 12], seed=2, zoom_range=(0.7, 1.4))
    for i in range(10):
        s = ds[i]
        assert tuple(s["image"].shape) == (1, 20, 20, 12)
        assert set(np.unique(s["target"].numpy())) <= {0, 1}


def test_synthesised_lesions_are_a_supervised_class_inside_the_organ(cached, vocabulary):
    cfg = {"enabled": True, "organ": "liver", "target": "liver tumour", "datasets": [],
           "lesion": {"probability": 1.0, "radius_mm": [6.0, 10.0], "count": [1, 1]}}
    plan = synthesis_plan(cfg, cached, vocabulary, [-200.0, 300.0])
    assert plan.datasets == {"PhantomSpleen"}  # annotates the liver without tumours; PhantomLiver has real ones
    assert plan.target == "liver tumor" and plan.hu_scale == pytest.approx(2 / 500)
    spleen = [c for c in cached if c.case.dataset == "PhantomSpleen"]
    ds = CropDataset(spleen, vocabulary, [24, 24, 16], seed=0, foreground_prob=1.0, synthesis=plan, max_queries=8)
    plain = CropDataset(spleen, vocabulary, [24, 24, 16], seed=0, foreground_prob=1.0, max_queries=8)
    seen = darker = 0
    for i in range(40):
        s = ds[i]
        assert "liver tumor" in s["classes"] or len(s["classes"]) == 8
        if "liver tumor" not in s["classes"]:
            continue
        tumour = s["target"][s["classes"].index("liver tumor")].numpy().astype(bool)
        if tumour.any():
            seen += 1
            if "liver" in s["classes"]:
                liver = s["target"][s["classes"].index("liver")].numpy().astype(bool)
                assert not (tumour & ~liver).any()  # lesions lie inside the liver and the liver contains them
                rest = liver & ~tumour
                if rest.sum() > 50 and tumour.sum() > 20:  # hypodense by default: darker than the liver around it
                    image = s["image"].numpy()[0]
                    assert image[tumour].mean() < image[rest].mean() - 0.05
                    darker += 1
    assert seen >= 5 and darker >= 2
    assert not any("liver tumor" in plain[i]["classes"] for i in range(20))
    with pytest.raises(VlsegError, match="datasets"):
        synthesis_plan({**cfg, "datasets": ["PhantomLiver"]}, cached, vocabulary, [-200.0, 300.0])
    assert synthesis_plan({**cfg, "enabled": False}, cached, vocabulary, [-200.0, 300.0]) is None


def test_thin_scan_simulation_repeats_edge_slices_of_image_and_targets(cached, vocabulary):
    ds = CropDataset(cached, vocabulary, [16, 16, 24], seed=4, thin_prob=1.0, thin_slices=(5, 9), foreground_prob=1.0)
    plain = CropDataset(cached, vocabulary, [16, 16, 24], seed=4, thin_prob=0.0, foreground_prob=1.0)
    for i in range(12):
        s = ds[i]
        image, target = s["image"].numpy()[0], s["target"].numpy()
        distinct = [z for z in range(1, 24) if not np.array_equal(image[:, :, z], image[:, :, z - 1])]
        assert len(distinct) <= 8  # at most 9 different slices, the rest repeat the slab's first or last one
        first, last = distinct[0] - 1 if distinct else 0, distinct[-1] if distinct else 0
        assert (image[:, :, :first + 1] == image[:, :, first:first + 1]).all()
        assert (image[:, :, last:] == image[:, :, last:last + 1]).all()
        assert (target[:, :, :, :first + 1] == target[:, :, :, first:first + 1]).all()
        assert (target[:, :, :, last:] == target[:, :, :, last:last + 1]).all()
    assert any(len({plain[i]["image"].numpy()[0, :, :, z].tobytes() for z in range(24)}) > 9 for i in range(5))
