"""The training corpus read through the typed data section: cases from the cache, the classes a new model learns,
and the crops the section describes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vlseg.config import DataSection, load_config
from vlseg.errors import VlsegError
from vlseg.prepare.cache.keys import cache_location
from vlseg.train.corpus import load_training_cases, model_vocabulary
from vlseg.train.crops import CropDataset


@pytest.fixture(scope="module")
def section(phantom_corpus, tmp_path_factory):
    cache = tmp_path_factory.mktemp("corpus-cache")
    return DataSection.from_config(load_config(None, [f"data.manifest={phantom_corpus}", f"data.cache={cache}",
                                                      "data.preprocess_workers=0"]))


@pytest.fixture(scope="module")
def cases(section):
    return load_training_cases(section, section.train_split, progress=False)


def test_cases_come_from_the_configured_cache(section, cases):
    assert cache_location(section).is_dir() and (cache_location(section) / "report.json").is_file()
    assert {c.case.dataset for c in cases} == {"PhantomLiver", "PhantomKidney", "PhantomSpleen"}
    with pytest.raises(VlsegError, match="split 'holdout'"):
        load_training_cases(section, "holdout", progress=False)


def test_a_new_model_learns_the_classes_its_cases_annotate(section, cases):
    annotated = {n for c in cases for n in c.case.classes}
    assert set(model_vocabulary(section, "default", cases).names) == annotated
    chosen = dataclasses.replace(section, classes=("liver", "Spleen"))  # names as users write them
    assert set(model_vocabulary(chosen, "default", cases).names) == {"liver", "spleen"}
    with pytest.raises(VlsegError, match="data.classes"):
        model_vocabulary(dataclasses.replace(section, classes=("no such organ",)), "default", cases)


def test_crops_from_the_section_are_those_its_settings_ask_for(phantom_corpus, section, cases):
    settings = {"crop_size": "[16, 16, 12]", "foreground_prob": 0.9, "max_queries": 3, "synonyms": "false",
                "dataset_temperature": 2.0, "dataset_weights": "{PhantomKidney: 2}", "class_weights": "{liver: 3}",
                "negative_fraction": 0.5, "zoom_range": "[0.8, 1.25]", "intensity_scale": "[0.8, 1.2]",
                "intensity_shift": 0.2, "thin_prob": 0.5, "thin_slices": "[3, 6]"}
    changed = DataSection.from_config(load_config(None, [f"data.{k}={v}" for k, v in settings.items()]))
    vocabulary = model_vocabulary(section, "default", cases)
    built = CropDataset.from_section(cases, vocabulary, changed, seed=7)
    by_hand = CropDataset(cases, vocabulary, [16, 16, 12], seed=7, foreground_prob=0.9, max_queries=3, synonyms=False,
                          dataset_temperature=2.0, dataset_factors={"PhantomKidney": 2}, class_factors={"liver": 3},
                          negative_fraction=0.5, zoom_range=(0.8, 1.25), intensity_scale=(0.8, 1.2),
                          intensity_shift=0.2, thin_prob=0.5, thin_slices=(3, 6))
    plain = CropDataset.from_section(cases, vocabulary, section, seed=7)
    for i in range(8):
        a, b = built[i], by_hand[i]
        assert a["texts"] == b["texts"] and torch.equal(a["image"], b["image"]) and torch.equal(a["target"],
                                                                                              b["target"])
    assert built[0]["image"].shape[1:] == (16, 16, 12) and plain[0]["image"].shape[1:] == tuple(section.crop_size)
