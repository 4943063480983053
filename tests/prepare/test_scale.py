"""The paths that keep a large corpus cheap give what the plain ones gave: a few-hundred-case synthetic corpus (the
SAT-scale benchmark's generator, 16³ stand-in cache entries written by the cache's writer)."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

from vlseg.prepare.cache.keys import array_header, cache_jobs
from vlseg.prepare.cache.read import open_cache
from vlseg.prepare.manifest import read_manifest
from vlseg.train.crops import CropDataset
from vlseg.vocab.vocabulary import Vocabulary

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import sat_scale  # noqa: E402

SETTINGS = {"ct_window": [-1000.0, 1000.0], "target_spacing": "auto", "spacing_per_dataset": {}, "intensity": "vlseg"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scale")
    info = sat_scale.build_corpus(folder, 300, 12, 60, SETTINGS)
    cases = read_manifest(info["manifest"])
    return info, cases, open_cache(cases, info["cache"], SETTINGS)


def test_manifest_round_trips_and_shares_names(corpus):
    info, cases, _ = corpus
    assert len(cases) == 300 and len({c.dataset for c in cases}) == 12
    a, b = [c for c in cases if c.dataset == cases[0].dataset][:2]
    assert next(iter(a.classes)) is next(iter(b.classes))  # interned: one copy per name, however many cases
    assert all(c.image.is_absolute() and c.image.is_file() for c in cases)


def test_class_mask_fast_path_equals_isin(corpus):
    _, cases, cached = corpus
    rng = np.random.default_rng(0)
    for cc in cached[:40]:
        label = np.asarray(cc.label)
        noisy = label.copy()
        noisy[rng.random(label.shape) < 0.05] = 7
        for name, values in cc.case.classes.items():
            for arr in (label, noisy):
                assert np.array_equal(cc.case.class_mask(arr, name), np.isin(arr, values))


def test_lazy_foreground_equals_the_archive(corpus):
    _, _, cached = corpus
    for cc in cached[:60]:
        meta = json.loads((cc.folder / "meta.json").read_text())
        with np.load(cc.folder / "foreground.npz") as fg:
            eager = {name: fg[key] for name, key in meta["foreground"].items()}
        assert list(cc.foreground) == list(eager) and len(cc.foreground) == len(eager)
        for name, coords in eager.items():
            assert name in cc.foreground and np.array_equal(cc.foreground[name], coords)
        assert "no such class" not in cc.foreground
        with pytest.raises(KeyError):
            cc.foreground["no such class"]


def test_header_check_equals_a_memory_map(corpus, tmp_path):
    info, cases, _ = corpus
    _, jobs = cache_jobs(cases[:20], info["cache"], SETTINGS)
    for _, folder, _, _ in jobs:
        for name in ("image.npy", "label.npy"):
            arr = np.load(folder / name, mmap_mode="r")
            assert array_header(folder / name) == (arr.shape, arr.dtype)
    whole = (jobs[0][1] / "image.npy").read_bytes()
    (tmp_path / "short.npy").write_bytes(whole[:-1])  # a truncated array cannot be mapped: not complete
    (tmp_path / "junk.npy").write_bytes(b"junk")
    assert array_header(tmp_path / "short.npy") is None and array_header(tmp_path / "junk.npy") is None


def test_pickled_cases_map_their_arrays_again(corpus):
    _, _, cached = corpus
    blob = pickle.dumps(cached[:50])
    assert len(blob) < 50 * 16**3  # far less than the voxels (16³ float16 + uint8 each)
    for before, after in zip(cached[:50], pickle.loads(blob)):
        assert isinstance(after.image, np.memmap) and isinstance(after.label, np.memmap)
        assert np.array_equal(after.image, before.image) and np.array_equal(after.label, before.label)
        assert after.case.case_id == before.case.case_id and list(after.foreground) == list(before.foreground)


def _reference_lists(ds: CropDataset, cc):
    """The O(vocabulary) scans the dataset used to make."""
    return ([n for n in ds.vocabulary.names if n in cc.case.classes],
            [n for n in ds.vocabulary.names if n in cc.foreground])


def test_samples_are_those_of_the_plain_path(corpus):
    info, _, cached = corpus
    vocab = Vocabulary.load(info["vocabulary"])
    ds = CropDataset(cached, vocab.subset({n for cc in cached for n in cc.case.classes}), [12, 12, 12], seed=3,
                     max_queries=6)
    for cc in cached[:80]:
        annotated, centres = _reference_lists(ds, cc)
        assert ds.annotated(cc) == annotated and ds.centre_classes(cc)[0] == centres
    again = pickle.loads(pickle.dumps(ds))  # what a spawned data-loader worker gets
    for i in range(40):
        a, b = ds[i], again[i]
        assert a["case_id"] == b["case_id"] and a["classes"] == b["classes"] and a["texts"] == b["texts"]
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["target"], b["target"])
