"""Training crops from a manifest: foreground-aware, class-aware sampling and per-sample queries with annotation flags.

Every sample is a pure function of ``(seed, index)``: a resumed run, or another process, reproduces exactly the crops
an uninterrupted run would have seen.  Volumes are small here (phantoms); the memory-mapped cache of issue #3 replaces
the in-memory copy for real corpora.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from vlseg.data.manifest import Case
from vlseg.io import load_label, load_scan, normalize_intensity, resample_to_spacing
from vlseg.vocab import Vocabulary


@dataclass
class LoadedCase:
    case: Case
    image: np.ndarray  # normalised, canonical orientation, [X, Y, Z] float32
    masks: dict[str, np.ndarray]  # annotated canonical class → bool mask
    foreground: dict[str, np.ndarray] = field(default_factory=dict)  # present class → its voxel coordinates [N, 3]

    def __post_init__(self):
        # Found once here rather than scanning the whole mask for every foreground-centred crop.
        if not self.foreground:
            self.foreground = {n: np.argwhere(m) for n, m in self.masks.items() if m.any()}


def load_case(case: Case, ct_window=(-200.0, 300.0), target_spacing=None) -> LoadedCase:
    scan = load_scan(case.image)
    label = load_label(case.label, like=scan)
    image = normalize_intensity(scan.data, case.modality, tuple(ct_window))
    if target_spacing is not None:
        image = resample_to_spacing(image, scan.spacing, target_spacing, order=1)
        label = resample_to_spacing(label, scan.spacing, target_spacing, order=0)
    masks = {name: case.class_mask(label, name) for name in case.classes}
    return LoadedCase(case, image.astype(np.float32), masks)


def _crop_bounds(shape, size, centre):
    starts = []
    for n, s, c in zip(shape, size, centre):
        start = int(c) - s // 2
        starts.append(min(max(start, 0), max(n - s, 0)))
    return starts


def _crop(arr: np.ndarray, starts, size, fill) -> np.ndarray:
    region = arr[tuple(slice(st, st + s) for st, s in zip(starts, size))]
    if region.shape == tuple(size):
        return region
    pad = [(0, s - r) for s, r in zip(size, region.shape)]
    return np.pad(region, pad, constant_values=fill)


class CropDataset(Dataset):
    """Index ``i`` → one training sample; sampling is by ``(seed, i)``, so ``len`` is only a bound for samplers."""

    def __init__(self, cases: list[LoadedCase], vocabulary: Vocabulary, crop_size, seed: int = 0,
                 foreground_prob: float = 0.67, max_queries: int = 16, synonyms: bool = True,
                 query_unannotated: bool = False, length: int = 10**9):
        if not cases:
            raise ValueError("no training cases")
        self.cases, self.vocabulary = cases, vocabulary
        self.crop_size = [int(s) for s in crop_size]
        self.seed, self.foreground_prob, self.max_queries = seed, foreground_prob, max_queries
        self.synonyms, self.query_unannotated, self.length = synonyms, query_unannotated, length
        # Datasets are mixed uniformly (not by case count), then a case uniformly within its dataset.
        self.by_dataset: dict[str, list[int]] = {}
        for i, lc in enumerate(cases):
            self.by_dataset.setdefault(lc.case.dataset, []).append(i)
        self.dataset_names = sorted(self.by_dataset)

    def __len__(self) -> int:
        return self.length

    def _centre(self, lc: LoadedCase, rng: np.random.Generator):
        present = list(lc.foreground)
        if present and rng.random() < self.foreground_prob:
            # Class-aware: pick the class first, so a small tumour is centred as often as the liver around it.
            coords = lc.foreground[present[int(rng.integers(len(present)))]]
            return coords[int(rng.integers(len(coords)))]
        return [int(rng.integers(n)) for n in lc.image.shape]

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, int(index)])
        ds = self.dataset_names[int(rng.integers(len(self.dataset_names)))]
        lc = self.cases[self.by_dataset[ds][int(rng.integers(len(self.by_dataset[ds])))]]
        starts = _crop_bounds(lc.image.shape, self.crop_size, self._centre(lc, rng))
        image = _crop(lc.image, starts, self.crop_size, fill=float(lc.image.min()))
        image = image * rng.uniform(0.9, 1.1) + rng.uniform(-0.1, 0.1)  # mild intensity augmentation; no flips (L/R)

        names = [n for n in self.vocabulary.names if n in lc.masks]
        if self.query_unannotated:
            names += [n for n in self.vocabulary.names if n not in lc.masks]
        order = rng.permutation(len(names))[: self.max_queries]
        names = [names[i] for i in order]
        targets = np.zeros((len(names), *self.crop_size), dtype=np.uint8)
        annotated = np.zeros(len(names), dtype=bool)
        for q, name in enumerate(names):
            if name in lc.masks:
                annotated[q] = True
                targets[q] = _crop(lc.masks[name], starts, self.crop_size, fill=False)
        texts = [self.vocabulary.sample_wording(n, rng, self.synonyms) for n in names]
        return {"image": torch.from_numpy(np.ascontiguousarray(image[None], dtype=np.float32)),
                "target": torch.from_numpy(targets), "annotated": torch.from_numpy(annotated),
                "texts": texts, "classes": names, "dataset": ds, "case_id": lc.case.case_id}


def collate(samples: list[dict]) -> dict:
    """Pad the per-sample query lists to the batch maximum; ``query_mask`` marks the real queries."""
    b, q = len(samples), max(len(s["texts"]) for s in samples)
    spatial = samples[0]["image"].shape[1:]
    target = torch.zeros((b, q, *spatial), dtype=torch.uint8)
    annotated = torch.zeros((b, q), dtype=torch.bool)
    query_mask = torch.zeros((b, q), dtype=torch.bool)
    for i, s in enumerate(samples):
        n = len(s["texts"])
        target[i, :n] = s["target"]
        annotated[i, :n] = s["annotated"]
        query_mask[i, :n] = True
    return {"image": torch.stack([s["image"] for s in samples]), "target": target, "annotated": annotated,
            "query_mask": query_mask, "texts": [s["texts"] for s in samples], "classes": [s["classes"] for s in samples],
            "dataset": [s["dataset"] for s in samples], "case_id": [s["case_id"] for s in samples]}
