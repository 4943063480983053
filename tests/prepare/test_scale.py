"""The paths that keep a large corpus cheap give what the plain ones gave: a few-hundred-case synthetic corpus (the
SAT-scale benchmark's generator, 16³ stand-in cache entries written by the cache's writer)."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from vlseg.prepare.cache.keys import array_header, cache_jobs
from vlseg.prepare.cache.read import open_cache
from vlseg.prepare.manifest import read_manifest, write_manifest
from vlseg.prepare.tables import Flags, Interner, Rows, SharedTable
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


def test_manifest_bytes_unchanged_after_read_and_write(corpus):
    info, cases, _ = corpus
    again = write_manifest(Path(info["manifest"]).with_name("again.jsonl"), read_manifest(info["manifest"]))
    assert again.read_bytes() == Path(info["manifest"]).read_bytes()
    plain = [dataclasses.replace(c, classes=dict(c.classes), present=dict(c.present), boxes=dict(c.boxes))
             for c in cases]
    assert plain == cases  # compact tables equal the dicts they stand for, values and order alike
    for c, p in zip(cases, plain):
        assert list(c.classes.items()) == list(p.classes.items()) and list(c.boxes) == list(p.boxes)
        assert all(type(v) is bool for v in c.present.values())


def test_class_tables_are_shared_per_dataset(corpus):
    _, cases, cached = corpus
    for dataset in {c.dataset for c in cases}:
        mine = [c for c in cases if c.dataset == dataset]
        distinct = {json.dumps(list(c.classes.items())) for c in mine}
        assert len({id(c.classes._table) for c in mine}) == len(distinct) == 1
        assert len({id(c.present._names) for c in mine}) == 1
    for cc in cached[:60]:  # the cached grid's boxes, voxels and foreground share one name tuple with the manifest
        assert cc.boxes._names is cc.case.boxes._names is cc.voxels._names is cc.foreground.names
        assert cc.foreground.folder is cc.folder


def test_writing_one_cases_table_leaves_the_others_alone(corpus):
    info, _, _ = corpus
    cases = read_manifest(info["manifest"])
    a, b = [c for c in cases if c.dataset == cases[0].dataset][:2]
    assert a.classes._table is b.classes._table
    before = dict(b.classes), dict(b.present), dict(b.boxes)
    a.classes["extra"] = [99]
    a.present["extra"] = False
    name = next(iter(a.boxes))
    a.boxes[name] = [0, 0, 0, 1, 1, 1]
    del a.boxes[next(n for n in a.boxes if n != name)]
    assert (dict(b.classes), dict(b.present), dict(b.boxes)) == before
    assert a.classes["extra"] == [99] and a.present["extra"] is False and a.boxes[name] == [0, 0, 0, 1, 1, 1]
    assert pickle.loads(pickle.dumps(a)) == a and pickle.loads(pickle.dumps(b)) == b
    assert a.classes._table is b.classes._table and "extra" not in b.classes._table


def test_tables_keep_values_that_do_not_fit_small_integers():
    share = Interner()
    big = Rows.of({"a": [0, 0, 0, 70000, 2, 3]}, share, width=6)
    huge = Rows.of({"a": 2**70}, share)
    ragged = Rows.of({"a": [1, 2]}, share, width=6)
    assert big["a"] == [0, 0, 0, 70000, 2, 3] and huge == {"a": 2**70} and ragged == {"a": [1, 2]}
    assert Rows.of({}, share, width=6) == {} and not Rows.of({}, share, width=6)
    with pytest.raises(KeyError):
        big["b"]
    with pytest.raises(KeyError):
        Flags.of({"a": True}, share)["b"]


def _unpickled(obj) -> tuple[int, int]:
    """(pickled bytes of ``obj``, bytes its unpickling leaves allocated): what a spawned data-loader worker receives
    and then holds."""
    blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    pickle.loads(blob)  # once before measuring: the first unpickling also fills the interpreter's own caches
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        back = pickle.loads(blob)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    del back
    return len(blob), held


def _without_tables(cached) -> list:
    """The same cases with empty class tables, flags, boxes and voxel counts."""
    out = []
    for cc in cached:
        cc, share = copy.copy(cc), Interner()
        cc.case = dataclasses.replace(cc.case, classes=SharedTable({}), present=Flags.of({}, share),
                                      boxes=Rows.of({}, share, width=6))
        cc.boxes, cc.voxels = Rows.of({}, share, width=6), Rows.of({}, share)
        out.append(cc)
    return out


def test_index_grows_per_class_by_its_data_not_by_dict_overhead(corpus):
    _, _, cached = corpus
    (blob, held), (bare_blob, bare_held) = _unpickled(cached), _unpickled(_without_tables(cached))
    classes = sum(len(cc.case.classes) for cc in cached)
    # What a class of a case must carry: its box on the manifest's and the cache's grid (6 integers each, of the
    # width their largest value needs), a voxel count (up to 8 bytes) and one reference to its (shared) name.
    width = 2 if max(max(b) for cc in cached for t in (cc.boxes, cc.case.boxes) for b in t.values()) < 2**15 else 4
    needed = 2 * 6 * width + 8 + 8
    assert (blob - bare_blob) / classes < needed
    # Unpickled, the same, allowing twice as much for the allocator's rounding (dicts of lists take ~550 bytes).
    assert (held - bare_held) / classes < 2 * needed, (held - bare_held) / classes
