"""A corpus at SAT's scale, simulated, against a 100-case corpus, measured side by side in one run:

    python benchmarks/sat_scale.py [--out DIR] [--cases 22186 --datasets 72 --classes 497] [--small 100]
                                   [--workers 2] [--skip-preprocess]

Both corpora come from one generator (the small one is a uniform draw of ``--small`` of the large one's cases, so
the two differ in size, not in their mix of datasets and classes per case): a vocabulary YAML of ``--classes``
synthetic classes, a schema-2 manifest (heavy-tailed case counts per dataset, 1–117 annotated classes per dataset,
CT 512×512×50–1000 and MR shapes and spacings, affines, boxes per present class), empty placeholder source files
(the cache key stats them) and a preprocessing cache whose entries are 16³ stand-in arrays written by the cache's
own writer (``vlseg.prepare.cache.build.entry_meta`` / ``write_case``) under the real keys, so training reads them
as real entries.

Figures, each for both corpora and their ratio:

1. manifest load (``read_manifest``, what training calls): seconds, and the memory the case list holds (tracemalloc);
   beside it the whole corpus load training does (``load_training_cases``: manifest, cache up-to-date check, opening
   every entry);
2. sampler cost per sample: the draw of ``CropDataset`` (dataset with temperature, case, centre class, the centre
   voxel read from the entry's foreground archive, crop box; no image voxel read), and a whole ``CropDataset[i]``
   (crop read from the 16³ stand-ins, masks, queries);
3. cache index memory per data-loader worker: the bytes the DataLoader pickles for a spawn/forkserver worker, and
   the resident-memory growth of a spawned process that unpickles them (a forked worker shares the parent's pages
   until it touches them: that is the heap figure of 1.);
4. ``train.py`` start to the end of its first step (a subprocess, tiny model, one-hot text encoder, ``--workers``
   data-loader workers): seconds until ``metrics.jsonl`` has its first line;
5. unless ``--skip-preprocess``: one synthetic 512×512×300 int16 CT with a label map through the real preprocessing
   (``preprocess_corpus``, configs/real.yaml's data settings, one process): seconds per case, and what N workers
   would need for the large corpus (linear scaling, I/O not limiting).

The printed table and ``benchmarks/results/sat_scale.{json,md}`` carry the goals: load ≤ 5 s, per-sample cost at
the large corpus ≤ 1.2× the small one's, index memory per worker ≤ 200 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# What the largest datasets look like (SAT's corpus has AbdomenAtlas- and TotalSegmentator-sized members): case
# count and annotated classes, CT.  The rest of the datasets share the remaining cases on a heavy tail.
HEAD = [("AtlasLike", 5195, 25), ("TotalSegLike", 1204, 117), ("AbdomenCTLike", 1000, 4), ("BrainMRLike", 1251, 4),
        ("AmosLike", 600, 15), ("FlareLike", 500, 13)]
STANDIN = (16, 16, 16)
GOALS = {"load_s": 5.0, "sample_ratio": 1.2, "worker_mb": 200.0}


# --------------------------------------------------------------------------------------------- corpus generation


def class_names(n: int) -> list[str]:
    return [f"structure {i:03d}" for i in range(n)]


def write_vocabulary(path: Path, n: int) -> Path:
    import yaml

    entries = [{"name": name, "synonyms": [name, f"the {name}"], "modalities": ["CT", "MR"]} for name in class_names(n)]
    path.write_text(yaml.safe_dump({"version": 2, "classes": entries}, sort_keys=False), encoding="utf-8")
    return path


def dataset_plan(n_cases: int, n_datasets: int, n_classes: int, seed: int = 0) -> list[dict]:
    """Per dataset: name, modality, case count (heavy-tailed, summing to ``n_cases``), annotated class names."""
    rng = np.random.default_rng(seed)
    head = [h for h in HEAD if n_cases >= 10 * n_datasets and h[1] < n_cases / 3][: max(0, n_datasets - 1)]
    rest = n_datasets - len(head)
    left = n_cases - sum(h[1] for h in head)
    tail = 1.0 / np.arange(1, rest + 1) ** 0.9
    counts = np.maximum(1, np.floor(tail / tail.sum() * left)).astype(int)
    counts[0] += left - counts.sum()
    names = class_names(n_classes)
    popular = rng.permutation(n_classes)  # some classes (organs) appear in many datasets
    plan = []
    for i in range(n_datasets):
        if i < len(head):
            label, n, k = head[i]
            modality = "MR" if "MR" in label else "CT"
        else:
            label, n = f"Tail{i:02d}", int(counts[i - len(head)])
            k = int(min(117, max(1, round(rng.lognormal(1.6, 0.9)))))
            modality = "MR" if rng.random() < 0.25 else "CT"
        # Cover every class once across the datasets, the rest drawn with a preference for the popular ones.
        own = [int(popular[(i * 7 + j) % n_classes]) for j in range(min(k, 7))]
        p = 1.0 / np.arange(1, n_classes + 1)
        extra = rng.choice(popular, size=k, replace=False, p=p / p.sum())
        chosen = list(dict.fromkeys(own + [int(c) for c in extra]))[:k]
        plan.append({"name": f"Dataset{i + 1:03d}_{label}", "modality": modality, "cases": n,
                     "classes": [names[c] for c in chosen]})
    if sum(len(d["classes"]) for d in plan) >= n_classes:  # a small corpus annotates only part of the vocabulary
        _cover(plan, names, rng)
    return plan


def _cover(plan: list[dict], names: list[str], rng) -> None:
    """Give every class not yet annotated by any dataset to a tail dataset with room (≤ 117 classes)."""
    used = {c for d in plan for c in d["classes"]}
    for name in names:
        if name not in used:
            room = [d for d in plan if len(d["classes"]) < 117]
            room[int(rng.integers(len(room)))]["classes"].append(name)


def _geometry(modality: str, rng):
    if modality == "CT":
        shape = (512, 512, int(np.exp(rng.uniform(np.log(50), np.log(1000)))))
        xy = float(rng.uniform(0.6, 1.0))
        spacing = (xy, xy, float(rng.choice([0.5, 0.625, 0.8, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0])))
    else:
        n = int(rng.choice([256, 320, 384, 448, 512]))
        xy = float(rng.uniform(0.4, 1.0)) * 256 / n * 1.5
        shape, spacing = (n, n, int(rng.integers(20, 201))), (xy, xy, float(rng.uniform(1.0, 6.0)))
    flip = rng.random() < 0.7  # DICOM-converted volumes are often stored LPS: x and y flipped
    sign = (-1.0, -1.0, 1.0) if flip else (1.0, 1.0, 1.0)
    affine = [[0.0] * 4 for _ in range(4)]
    for a in range(3):
        affine[a][a] = sign[a] * spacing[a]
        affine[a][3] = round(-sign[a] * spacing[a] * shape[a] / 2, 3)
    affine[3][3] = 1.0
    return shape, spacing, affine


def _box(shape, rng) -> list[int]:
    lo = [int(rng.integers(0, n - 1)) for n in shape]
    hi = [int(min(n, lo_ + rng.integers(1, max(2, n // 3)))) for lo_, n in zip(lo, shape)]
    return lo + hi


def make_cases(plan: list[dict], root: Path, seed: int = 1) -> list:
    """The manifest's cases (every case in the training split)."""
    from vlseg.prepare.manifest import Case

    rng = np.random.default_rng(seed)
    cases = []
    for d in plan:
        classes = {name: [v + 1] for v, name in enumerate(d["classes"])}
        for j in range(d["cases"]):
            shape, spacing, affine = _geometry(d["modality"], rng)
            present = {name: bool(rng.random() < 0.85) for name in classes}
            if not any(present.values()):
                present[next(iter(classes))] = True
            cid = f"{d['name'].split('_', 1)[1]}_{j:05d}"
            cases.append(Case(cid, d["name"].split("_", 1)[1], d["modality"],
                              root / d["name"] / "imagesTr" / f"{cid}_0000.nii.gz",
                              root / d["name"] / "labelsTr" / f"{cid}.nii.gz", dict(classes), present, shape,
                              spacing, "train", {n: _box(shape, rng) for n, p in present.items() if p}, affine))
    return cases


def _standin(case, rng) -> tuple[np.ndarray, np.ndarray]:
    """A 16³ float16 image and a label with each present class on a few voxels."""
    label = np.zeros(STANDIN, dtype=np.uint8 if len(case.classes) < 255 else np.uint16)
    for name, there in case.present.items():
        if there:
            idx = tuple(rng.integers(0, n, size=3) for n in STANDIN)
            label[idx] = case.classes[name][0]
    image = (rng.standard_normal(STANDIN) * 0.3).astype(np.float16)
    return image, label


def write_standin_cache(cases: list, cache: Path, settings: dict, seed: int = 2) -> None:
    """One cache entry per case through the cache's own writer, under the real key (placeholder sources first)."""
    from vlseg.prepare.cache.build import entry_meta, write_case
    from vlseg.prepare.cache.keys import cache_jobs, case_key, relevant_settings

    for c in cases:
        for p in (c.image, c.label):
            p.parent.mkdir(parents=True, exist_ok=True)
            p.touch()
    rng = np.random.default_rng(seed)
    _, jobs = cache_jobs(cases, cache, settings)
    for case, folder, spacing, _ in jobs:
        image, label = _standin(case, rng)
        relevant = relevant_settings(case, spacing)
        foreground, meta = entry_meta(case, relevant, image, label, spacing or case.spacing, case.spacing)
        meta["key"] = case_key(case, spacing, settings)
        write_case(folder, image, label, foreground, meta)


def build_corpus(folder: Path, n_cases: int, n_datasets: int, n_classes: int, settings: dict,
                 keep: int | None = None) -> dict:
    """Vocabulary, manifest and stand-in cache in ``folder``; → paths and counts.  ``keep``: only that many of the
    cases, drawn uniformly (the same mix of datasets and class counts per case, at another corpus size)."""
    from vlseg.prepare.manifest import write_manifest

    folder.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    plan = dataset_plan(n_cases, n_datasets, n_classes)
    cases = make_cases(plan, folder / "raw")
    if keep is not None:
        cases = [cases[i] for i in sorted(np.random.default_rng(4).choice(len(cases), keep, replace=False))]
        kept = {c.dataset for c in cases}
        plan = [d for d in plan if d["name"].split("_", 1)[1] in kept]
    manifest = write_manifest(folder / "manifest.jsonl", cases)
    vocab = write_vocabulary(folder / "vocabulary.yaml", n_classes)
    write_standin_cache(cases, folder / "cache", settings)
    sizes = sorted((d["cases"] for d in plan), reverse=True)
    return {"manifest": str(manifest), "vocabulary": str(vocab), "cache": str(folder / "cache"),
            "cases": len(cases), "datasets": len(plan), "classes": len({c for d in plan for c in d["classes"]}),
            "largest_datasets": sizes[:5], "median_dataset": int(np.median(sizes)),
            "annotated_per_dataset": [min(len(d["classes"]) for d in plan), max(len(d["classes"]) for d in plan)],
            "manifest_file_mb": round(manifest.stat().st_size / 2**20, 1), "build_s": round(time.perf_counter() - t, 1)}


# ------------------------------------------------------------------------------------------------------ measuring


def corpus_config(corpus: dict, out: Path, workers: int) -> dict:
    """A tiny model on ``corpus``: one-hot prompts, 16³ crops, the stand-in cache, ``workers`` loader workers."""
    from vlseg.config import load_config

    overrides = {"output_root": str(out / "runs"), "run_name": "first-step", "vocabulary": corpus["vocabulary"],
                 "data.manifest": corpus["manifest"], "data.cache": corpus["cache"], "data.target_spacing": "auto",
                 "data.crop_size": "[16, 16, 16]", "data.max_queries": 4, "data.num_workers": workers,
                 "data.preprocess_workers": 0, "text_encoder.name": "onehot", "text_encoder.dim": 16,
                 "image_encoder.widths": "[8, 16, 32]", "image_encoder.strides": "[1, 2, 2]",
                 "image_encoder.embed_dim": 8, "fusion.dim": 32, "fusion.layers": 1, "fusion.heads": 2,
                 "train.steps": 1, "train.warmup_steps": 1, "train.checkpoint_every": 1000, "train.log_every": 1}
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def _traced(fn):
    """(fn's result, the bytes it still holds once returned, per tracemalloc)."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        result = fn()
        return result, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def measure_load(cfg: dict) -> dict:
    """Manifest read and the whole corpus load training does: seconds (untraced) and held memory (traced)."""
    from vlseg.config import DataSection
    from vlseg.prepare.manifest import read_manifest
    from vlseg.train.corpus import load_training_cases

    data = DataSection.from_config(cfg)
    t = time.perf_counter()
    read_manifest(data.manifest, split="train")
    manifest_s = time.perf_counter() - t
    _, manifest_bytes = _traced(lambda: read_manifest(data.manifest, split="train"))
    t = time.perf_counter()
    cached = load_training_cases(data, "train", progress=False)
    corpus_s = time.perf_counter() - t
    _, corpus_bytes = _traced(lambda: load_training_cases(data, "train", progress=False))
    return {"manifest_s": manifest_s, "manifest_mb": manifest_bytes / 2**20, "corpus_s": corpus_s,
            "corpus_mb": corpus_bytes / 2**20, "cached": cached}


def measure_sampler(cfg: dict, cached: list, samples: int) -> tuple[dict, object]:
    """Microseconds per draw (dataset, case, centre, region; no voxel read) and per whole sample."""
    from vlseg.config import DataSection
    from vlseg.train.corpus import model_vocabulary
    from vlseg.train.crops import CropDataset

    data = DataSection.from_config(cfg)
    vocabulary = model_vocabulary(data, cfg["vocabulary"], cached)
    dataset = CropDataset.from_section(cached, vocabulary, data, seed=0)
    for i in range(50):  # warm up
        dataset[i]
    t = time.perf_counter()
    for i in range(samples):
        dataset.draw(i)
    draw_us = (time.perf_counter() - t) / samples * 1e6
    t = time.perf_counter()
    for i in range(samples):
        dataset[i]
    sample_us = (time.perf_counter() - t) / samples * 1e6
    return {"draw_us": draw_us, "sample_us": sample_us, "vocabulary": len(vocabulary.names)}, dataset


_WORKER = """
import pickle, sys
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) * 1024
import torch, vlseg.train.crops  # what a data-loader worker has imported before its dataset arrives
blob = open(sys.argv[1], 'rb').read()
before = rss()
dataset = pickle.loads(blob)
print(rss() - before)
"""


def measure_worker(dataset, out: Path) -> dict:
    """What a spawn/forkserver data-loader worker receives (pickled bytes) and the memory it then holds (RSS growth of
    a fresh process unpickling it; the pickle's own bytes are read before the first RSS reading)."""
    blob = pickle.dumps(dataset, protocol=pickle.HIGHEST_PROTOCOL)
    path = out / "dataset.pickle"
    path.write_bytes(blob)
    res = subprocess.run([sys.executable, "-c", _WORKER, str(path)], capture_output=True, text=True, cwd=REPO)
    if res.returncode:
        raise RuntimeError(f"worker probe failed: {res.stderr[-2000:]}")
    path.unlink()
    return {"pickle_mb": len(blob) / 2**20, "worker_rss_mb": int(res.stdout.strip()) / 2**20}


def measure_first_step(cfg: dict, out: Path) -> dict:
    """``python train.py --config <cfg> train.steps=1``: seconds from start until metrics.jsonl has its first line."""
    from vlseg.config import save_config

    path = out / "config.yaml"
    save_config(cfg, path)
    metrics = Path(cfg["output_root"]) / cfg["run_name"] / "metrics.jsonl"
    cmd = [sys.executable, str(REPO / "train.py"), "--config", str(path), "train.steps=1", "--overwrite",
           "--no-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    while proc.poll() is None:
        if first is None and metrics.is_file() and metrics.read_text().strip():
            first = time.perf_counter() - t
        time.sleep(0.05)
    err = proc.stderr.read()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    return {"first_step_s": first if first is not None else time.perf_counter() - t, "command": " ".join(cmd)}


def synthetic_ct(folder: Path, shape=(512, 512, 300), spacing=(0.78, 0.78, 1.5)):
    """A real-size int16 CT (air, a body of fat and soft tissue, lungs, spine, liver, spleen, kidneys; noise) and its
    label map, as NIfTI; → (image path, label path, classes)."""
    import nibabel as nib

    rng = np.random.default_rng(3)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    z = np.linspace(-1, 1, shape[2])
    body2d = (x / 0.85) ** 2 + (y / 0.65) ** 2 <= 1
    image = np.full(shape, -1000, dtype=np.int16)
    image[body2d] = -90  # fat
    image[(x / 0.75) ** 2 + (y / 0.55) ** 2 <= 1] = 40  # soft tissue
    label = np.zeros(shape, dtype=np.uint8)
    organs = [("liver", (-0.35, -0.1, 0.1), (0.3, 0.3, 0.35), 60),
              ("spleen", (0.45, 0.15, 0.15), (0.12, 0.12, 0.2), 50),
              ("right kidney", (-0.3, 0.35, -0.2), (0.1, 0.1, 0.2), 150),
              ("left kidney", (0.3, 0.35, -0.2), (0.1, 0.1, 0.2), 150)]
    for value, (_, c, r, hu) in enumerate(organs, 1):
        inside = ((x[..., None] - c[0]) / r[0]) ** 2 + ((y[..., None] - c[1]) / r[1]) ** 2 \
            + ((z[None, None] - c[2]) / r[2]) ** 2 <= 1
        image[inside], label[inside] = hu, value
    lungs = (((np.abs(x) - 0.4) / 0.25) ** 2 + (y / 0.4) ** 2 <= 1)[..., None] & (z > 0.45)[None, None]
    image[lungs] = -850
    image[((x / 0.08) ** 2 + ((y - 0.45) / 0.08) ** 2 <= 1)[..., None].repeat(shape[2], 2)] = 700  # spine
    image += rng.normal(0, 12, size=shape).astype(np.int16)
    affine = np.diag([*spacing, 1.0])
    folder.mkdir(parents=True, exist_ok=True)
    img_path, lab_path = folder / "ct_0000.nii.gz", folder / "ct.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), img_path)
    nib.save(nib.Nifti1Image(label, affine), lab_path)
    return img_path, lab_path, {name: [v] for v, (name, *_) in enumerate(organs, 1)}


def measure_preprocess(out: Path, n_cases: int) -> dict:
    """One real-size CT through ``preprocess_corpus`` with configs/real.yaml's data settings, one process."""
    from vlseg.config import DataSection, load_config
    from vlseg.prepare.cache.build import preprocess_corpus
    from vlseg.prepare.cache.keys import cache_settings
    from vlseg.prepare.manifest import Case

    shape, spacing = (512, 512, 300), (0.78, 0.78, 1.5)
    t = time.perf_counter()
    img, lab, classes = synthetic_ct(out / "ct", shape, spacing)
    make_s = time.perf_counter() - t
    case = Case("ct", "CT", "CT", img, lab, classes, {n: True for n in classes}, shape, spacing, "train")
    settings = cache_settings(DataSection.from_config(load_config(str(REPO / "configs" / "real.yaml"))))
    t = time.perf_counter()
    report = preprocess_corpus([case], out / "ct" / "cache", settings, workers=0, progress=False)
    per_case = time.perf_counter() - t
    if report["errors"]:
        raise RuntimeError(f"preprocessing failed: {report['errors']}")
    estimate = {n: n_cases * per_case / n / 3600 for n in (1, 16, 64, 256, 1024)}
    return {"shape": list(shape), "spacing": list(spacing), "settings": settings, "make_s": make_s,
            "seconds_per_case": per_case, "hours_for_corpus": estimate,
            "source_mb": (img.stat().st_size + lab.stat().st_size) / 2**20}


# ------------------------------------------------------------------------------------------------------ reporting


def _rows(small: dict, big: dict) -> list[tuple]:
    """(figure, small, big, ratio, goal, met) per measured figure."""
    def row(name, key, unit, goal=None, ratio_goal=None):
        a, b = small[key], big[key]
        ratio = b / a if a else float("nan")
        met = "" if goal is None and ratio_goal is None else (
            "yes" if (goal is None or b <= goal) and (ratio_goal is None or ratio <= ratio_goal) else "NO")
        want = f"≤ {goal:g} {unit}" if goal is not None else (f"ratio ≤ {ratio_goal:g}" if ratio_goal else "")
        return (f"{name} ({unit})", a, b, ratio, want, met)

    return [row("manifest load", "manifest_s", "s", goal=GOALS["load_s"]),
            row("manifest memory", "manifest_mb", "MB"),
            row("corpus load (manifest + cache check + open)", "corpus_s", "s"),
            row("corpus index memory", "corpus_mb", "MB"),
            row("sampler draw per sample, no voxel read", "draw_us", "µs", ratio_goal=GOALS["sample_ratio"]),
            row("whole sample incl. 16³ crop read", "sample_us", "µs", ratio_goal=GOALS["sample_ratio"]),
            row("pickled dataset per spawned worker", "pickle_mb", "MB", goal=GOALS["worker_mb"]),
            row("spawned worker RSS growth", "worker_rss_mb", "MB", goal=GOALS["worker_mb"]),
            row("train.py start to first step", "first_step_s", "s")]


def format_table(rows: list[tuple], small_n: int, big_n: int) -> str:
    head = f"| figure | {small_n} cases | {big_n} cases | ratio | goal | met |\n|---|---:|---:|---:|---|---|\n"
    return head + "".join(f"| {f} | {a:.4g} | {b:.4g} | {r:.2f} | {g} | {m} |\n" for f, a, b, r, g, m in rows)


def format_preprocess(p: dict, n_cases: int) -> str:
    lines = [f"Preprocessing one {'×'.join(map(str, p['shape']))} int16 CT ({p['source_mb']:.0f} MB gzip NIfTI, "
             f"configs/real.yaml data settings, 1 process): {p['seconds_per_case']:.1f} s per case.",
             f"Estimate for {n_cases} cases, assuming linear scaling with workers and I/O not limiting:", "",
             "| workers | hours |", "|---:|---:|"]
    lines += [f"| {n} | {h:.2f} |" for n, h in p["hours_for_corpus"].items()]
    return "\n".join(lines) + "\n"


def measure_corpus(folder: Path, n_cases, n_datasets, n_classes, workers, samples, keep=None) -> dict:
    from vlseg.config import DataSection
    from vlseg.prepare.cache.keys import cache_settings

    probe = corpus_config({"vocabulary": "default", "manifest": str(folder / "manifest.jsonl"), "cache": ""},
                          folder, workers)
    corpus = build_corpus(folder, n_cases, n_datasets, n_classes, cache_settings(DataSection.from_config(probe)),
                          keep)
    cfg = corpus_config(corpus, folder, workers)
    load = measure_load(cfg)
    sampler, dataset = measure_sampler(cfg, load.pop("cached"), samples)
    figures = {**corpus, **load, **sampler, **measure_worker(dataset, folder)}
    del dataset
    figures.update(measure_first_step(cfg, folder))
    floats = {k: round(v, 3) for k, v in figures.items() if isinstance(v, float)}
    print(f"  {corpus['cases']} cases: {json.dumps(floats)}", flush=True)
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for the generated corpora (default: a temporary folder)")
    parser.add_argument("--cases", type=int, default=22186)
    parser.add_argument("--datasets", type=int, default=72)
    parser.add_argument("--classes", type=int, default=497)
    parser.add_argument("--small", type=int, default=100, help="cases of the comparison corpus: a uniform draw "
                        "from the large one's cases (same mix of datasets and classes per case)")
    parser.add_argument("--workers", type=int, default=2, help="data-loader workers of the train.py run")
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--skip-preprocess", action="store_true")
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results"), help="where sat_scale.* go")
    args = parser.parse_args(argv)

    out = Path(args.out or tempfile.mkdtemp(prefix="vlseg-sat-scale-"))
    t0 = time.perf_counter()
    print(f"corpora in {out}", flush=True)
    small = measure_corpus(out / "small", args.cases, args.datasets, args.classes, args.workers, args.samples,
                           keep=args.small)
    big = measure_corpus(out / "large", args.cases, args.datasets, args.classes, args.workers, args.samples)
    table = format_table(_rows(small, big), args.small, args.cases)
    pre = None if args.skip_preprocess else measure_preprocess(out, args.cases)
    text = table + ("\n" + format_preprocess(pre, args.cases) if pre else "")
    print("\n" + text)
    result = {"command": "python benchmarks/sat_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, "goals": GOALS,
              "small": small, "large": big, "preprocess": pre, "seconds": round(time.perf_counter() - t0, 1)}
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = "sat_scale" if args.cases == 22186 else f"sat_scale_{args.cases}"
    (results / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    (results / f"{stem}.md").write_text(f"# SAT-scale corpus, simulated\n\n`{result['command']}` "
                                        f"({result['seconds']} s)\n\n{text}", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
