"""Training crops from the preprocessing cache: how a sample is drawn.

One sample = one crop of one case plus the text queries asked about it.  Drawing it:

1. **dataset** — datasets are mixed with temperature-scaled weights ``w_d ∝ n_d^(1/T)`` (``n_d`` = its training
   cases; T = 1 follows the corpus sizes, large T tends to uniform), times an optional per-dataset factor;
2. **case** — uniformly within the dataset;
3. **centre** — with probability ``foreground_prob`` on a voxel of one *class* of the case, the class drawn with
   weights that are equal per class by default (so a small tumour is centred as often as the liver around it, not
   in proportion to its voxels) times optional per-class factors; otherwise anywhere;
4. **crop** — only that region is read from the memory-mapped cache; a random zoom reads a slightly larger or smaller
   region and resamples it to the crop size;
5. **thin-scan simulation** (optional) — a random slab of slices with its edge slices repeated, as inference pads a
   scan thinner than the window;
6. **lesion synthesis** (optional) — inside an annotated organ, synthetic lesions with their own label (e.g. liver
   tumours in real livers whose dataset labels no tumour), see ``vlseg.data.synth``;
7. **queries** — classes present in the crop first, then *in-set negatives* (classes the dataset annotates that are
   absent from the crop, as VISTA3D trains them), ``negative_fraction`` of the queries at most when both exist;
   wording sampled from each class's synonyms.  Classes the dataset does not annotate are never asked (masked
   back-propagation), unless the naive loss asks them as background.

Every sample is a pure function of ``(seed, index)``: a resumed run, or another process, reproduces exactly the crops
an uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from vlseg.config import DataSection
from vlseg.errors import VlsegError
from vlseg.prepare.cache.read import CachedCase
from vlseg.vocab.vocabulary import Vocabulary


@dataclass
class SynthesisPlan:
    """Insert synthetic ``target`` lesions inside ``organ`` for the cases of ``datasets``."""

    organ: str
    target: str
    datasets: set[str]
    lesion: object  # vlseg.data.synth.LesionConfig
    hu_scale: float  # normalised intensity units per HU of the cached CT images


def synthesis_plan(cfg: dict | None, cases: list[CachedCase], vocabulary: Vocabulary,
                   ct_window) -> SynthesisPlan | None:
    """The ``data.synthesis`` config section → a plan (None when disabled).  Without an explicit ``datasets`` list,
    every CT dataset that annotates the organ but not the target takes part."""
    if not cfg or not cfg.get("enabled", False):
        return None
    from vlseg.transforms.lesions import LesionConfig

    organ, target = vocabulary.resolve(str(cfg["organ"])), vocabulary.resolve(str(cfg["target"]))
    if organ is None or target is None:
        raise VlsegError(f"data.synthesis: organ {cfg['organ']!r} and target {cfg['target']!r} must be classes of "
                         f"the model's vocabulary")
    eligible = {c.case.dataset for c in cases
                if c.case.modality == "CT" and organ in c.case.classes and target not in c.case.classes}
    chosen = set(cfg.get("datasets") or eligible)
    unknown = chosen - eligible
    if unknown:
        raise VlsegError(f"data.synthesis.datasets: {sorted(unknown)[0]!r} is not a training CT dataset that "
                         f"annotates {organ!r} without {target!r}")
    lo, hi = (float(v) for v in ct_window)
    return SynthesisPlan(organ, target, chosen, LesionConfig.from_dict(cfg.get("lesion") or {}), 2.0 / (hi - lo))


def dataset_weights(cases: list[CachedCase], temperature: float, factors: dict | None = None) -> dict[str, float]:
    """Sampling probability per dataset: ``n_d^(1/T)`` times ``factors[d]`` (default 1), normalised."""
    if temperature <= 0:
        raise VlsegError(f"data.dataset_temperature must be positive, got {temperature}")
    counts: dict[str, int] = {}
    for c in cases:
        counts[c.case.dataset] = counts.get(c.case.dataset, 0) + 1
    factors = factors or {}
    unknown = set(factors) - set(counts)
    if unknown:
        raise VlsegError(f"data.dataset_weights: {sorted(unknown)[0]!r} is not a training dataset "
                         f"({', '.join(sorted(counts))})")
    raw = {d: n ** (1.0 / temperature) * float(factors.get(d, 1.0)) for d, n in sorted(counts.items())}
    total = sum(raw.values())
    return {d: w / total for d, w in raw.items()}


def _region(shape, size, centre):
    """Start of a ``size`` region centred on ``centre`` and kept inside ``shape`` where it fits."""
    return [min(max(int(c) - s // 2, 0), max(n - s, 0)) for n, s, c in zip(shape, size, centre)]


def _zoom(image: np.ndarray, label: np.ndarray, size) -> tuple[np.ndarray, np.ndarray]:
    """Resample a read region to the crop size: trilinear for the image, nearest for the label, both sampled at the
    same points (voxel centres, ``align_corners=False``).  ``nearest-exact`` takes the source voxel whose centre is
    nearest; plain ``nearest`` floors, which puts the label about half a source voxel off the image."""
    if tuple(image.shape) == tuple(size):
        return image, label
    img = F.interpolate(torch.from_numpy(np.ascontiguousarray(image))[None, None], size=tuple(size),
                        mode="trilinear", align_corners=False)[0, 0].numpy()
    lab = F.interpolate(torch.from_numpy(label.astype(np.float32))[None, None], size=tuple(size),
                        mode="nearest-exact")[0, 0].numpy().astype(label.dtype)
    return img, lab


class CropDataset(Dataset):
    """Index ``i`` → one training sample; sampling is by ``(seed, i)``, so ``len`` is only a bound for samplers."""

    def __init__(self, cases: list[CachedCase], vocabulary: Vocabulary, crop_size, seed: int = 0,
                 foreground_prob: float = 0.67, max_queries: int = 16, synonyms: bool = True,
                 query_unannotated: bool = False, length: int = 10**9, dataset_temperature: float = 1.0,
                 dataset_factors: dict | None = None, class_factors: dict | None = None,
                 negative_fraction: float = 0.25, zoom_range=(1.0, 1.0), synthesis: SynthesisPlan | None = None,
                 thin_prob: float = 0.0, thin_slices=(8, 20), intensity_scale=(0.9, 1.1), intensity_shift=0.1):
        if not cases:
            raise VlsegError("no training cases")
        self.cases, self.vocabulary = cases, vocabulary
        self._order = {n: i for i, n in enumerate(vocabulary.names)}
        self.crop_size = [int(s) for s in crop_size]
        self.seed, self.foreground_prob, self.max_queries = seed, foreground_prob, max_queries
        self.synonyms, self.query_unannotated, self.length = synonyms, query_unannotated, length
        self.negative_fraction, self.zoom_range, self.synthesis = negative_fraction, tuple(zoom_range), synthesis
        self.thin_prob, self.thin_slices = float(thin_prob), tuple(int(v) for v in thin_slices)
        self.intensity_scale, self.intensity_shift = tuple(float(v) for v in intensity_scale), float(intensity_shift)
        self.class_factors = {vocabulary.resolve(k) or k: float(v) for k, v in (class_factors or {}).items()}
        unknown = [k for k in self.class_factors if k not in vocabulary.names]
        if unknown:
            raise VlsegError(f"data.class_weights: {unknown[0]!r} is not a class of the model's vocabulary")
        self.by_dataset: dict[str, list[int]] = {}
        for i, c in enumerate(cases):
            self.by_dataset.setdefault(c.case.dataset, []).append(i)
        weights = dataset_weights(cases, dataset_temperature, dataset_factors)
        self.dataset_names = list(weights)
        self.dataset_probs = np.array([weights[d] for d in self.dataset_names])

    @classmethod
    def from_section(cls, cases: list[CachedCase], vocabulary: Vocabulary, data: DataSection, seed: int,
                     query_unannotated: bool = False) -> CropDataset:
        """The crops the ``data`` section of a config describes, lesion synthesis included."""
        synthesis = synthesis_plan(data.synthesis, cases, vocabulary, data.ct_window)
        return cls(cases, vocabulary, data.crop_size, seed=seed, foreground_prob=data.foreground_prob,
                   max_queries=data.max_queries, synonyms=data.synonyms, query_unannotated=query_unannotated,
                   dataset_temperature=data.dataset_temperature, dataset_factors=data.dataset_weights,
                   class_factors=data.class_weights, negative_fraction=data.negative_fraction,
                   zoom_range=data.zoom_range, synthesis=synthesis, thin_prob=data.thin_prob,
                   thin_slices=data.thin_slices, intensity_scale=data.intensity_scale,
                   intensity_shift=data.intensity_shift)

    def __len__(self) -> int:
        return self.length

    # ------------------------------------------------------------------------------------------------ pieces

    def _in_vocabulary_order(self, names) -> list[str]:
        """The vocabulary's classes among ``names``, in the vocabulary's order (cost: the case's classes, not the
        vocabulary's)."""
        order = self._order
        return sorted((n for n in names if n in order), key=order.__getitem__)

    def annotated(self, cc: CachedCase) -> list[str]:
        """Classes supervised for this case: its dataset's, plus the synthesised target where synthesis applies."""
        names = self._in_vocabulary_order(cc.case.classes)
        if self._synthesises(cc) and self.synthesis.target in self._order:
            names.append(self.synthesis.target)
        return names

    def _synthesises(self, cc: CachedCase) -> bool:
        s = self.synthesis
        return s is not None and cc.case.dataset in s.datasets and s.organ in cc.foreground

    def centre_classes(self, cc: CachedCase) -> tuple[list[str], np.ndarray]:
        """Classes a foreground crop of this case can be centred on, with their probabilities."""
        names = self._in_vocabulary_order(cc.foreground)
        if self._synthesises(cc):
            names.append(self.synthesis.target)  # centred on an organ voxel, where a lesion is then placed
        weights = np.array([self.class_factors.get(n, 1.0) for n in names], dtype=float)
        return names, weights / weights.sum() if len(names) else weights

    def _centre(self, cc: CachedCase, rng: np.random.Generator):
        names, probs = self.centre_classes(cc)
        if names and rng.random() < self.foreground_prob:
            name = names[int(rng.choice(len(names), p=probs))]
            coords = cc.foreground[self.synthesis.organ if name not in cc.foreground else name]
            return coords[int(rng.integers(len(coords)))], name
        return [int(rng.integers(n)) for n in cc.shape], None

    def draw(self, index: int):
        """Steps 1-3 and the read region of sample ``index``: (its generator, advanced past them, the dataset, the
        case, the centre class or None, the region's start and size).  No voxel is read."""
        rng = np.random.default_rng([self.seed, int(index)])
        ds = self.dataset_names[int(rng.choice(len(self.dataset_names), p=self.dataset_probs))]
        cc = self.cases[self.by_dataset[ds][int(rng.integers(len(self.by_dataset[ds])))]]
        centre, centre_class = self._centre(cc, rng)
        lo, hi = self.zoom_range
        read = [max(4, int(round(s * rng.uniform(lo, hi)))) for s in self.crop_size]
        return rng, ds, cc, centre_class, _region(cc.shape, read, centre), read

    def __getitem__(self, index: int) -> dict:
        # Every step draws from one generator seeded by (seed, index), in this order: the sample is a pure function
        # of its index.
        rng, ds, cc, centre_class, starts, read = self.draw(index)
        image, label = cc.crop(starts, read)
        image, label = _zoom(image, label, self.crop_size)
        spacing = tuple(float(sp) * r / c for sp, r, c in zip(cc.spacing, read, self.crop_size))  # after the zoom

        annotated = self.annotated(cc)
        masks = {n: cc.class_mask(label, n) for n in annotated if n in cc.case.classes}
        if self._synthesises(cc):
            image = self._synthesise(image, masks, spacing, centre_class, rng)
        if self.thin_prob and rng.random() < self.thin_prob:
            image, masks = self._thin(image, masks, rng)
        # Intensity: contrast and brightness (a CT's soft tissue shifts by tens of HU between contrast phases); kept
        # within the crop's own range so air and the window's top stay where normalisation put them. No flips (L/R).
        lo_v, hi_v = float(image.min()), float(image.max())
        image = image * rng.uniform(*self.intensity_scale) + rng.uniform(-self.intensity_shift, self.intensity_shift)
        image = np.clip(image, lo_v, hi_v)
        names = self._queries(annotated, masks, rng)
        targets = np.zeros((len(names), *self.crop_size), dtype=np.uint8)
        is_annotated = np.zeros(len(names), dtype=bool)
        for q, name in enumerate(names):
            if name in masks:
                is_annotated[q] = True
                targets[q] = masks[name]
        texts = [self.vocabulary.sample_wording(n, rng, self.synonyms) for n in names]
        return {"image": torch.from_numpy(np.ascontiguousarray(image[None], dtype=np.float32)),
                "target": torch.from_numpy(targets), "annotated": torch.from_numpy(is_annotated),
                "texts": texts, "classes": names, "dataset": ds, "case_id": cc.case.case_id}

    def _synthesise(self, image, masks: dict, spacing, centre_class, rng: np.random.Generator) -> np.ndarray:
        """Paint lesions into the crop's organ (always when the crop is centred on the target class); ``masks`` gains
        the target's mask, and every parent of the target contains it."""
        s = self.synthesis
        lesion = np.zeros(self.crop_size, dtype=bool)
        organ = masks.get(s.organ)
        if organ is not None and organ.any() and (centre_class == s.target or rng.random() < s.lesion.probability):
            from vlseg.transforms.lesions import synthesize_lesions

            middle = tuple(n // 2 for n in self.crop_size)
            image, lesion = synthesize_lesions(
                image, organ, spacing, rng, s.lesion, hu_scale=s.hu_scale,
                centre=middle if centre_class == s.target and organ[middle] else None)
        masks[s.target] = lesion
        for parent in self.vocabulary.parents(s.target):  # a parent's mask contains its lesions
            if parent in masks:
                masks[parent] = masks[parent] | lesion
        return image

    def _thin(self, image, masks: dict, rng: np.random.Generator):
        """A thin scan (a slab of a few slices, like a 4 cm DICOM series) reaches the model padded by repeating its
        edge slices to the window size; training sees the same: a random slab, edge slices repeated."""
        z = self.crop_size[2]
        n = int(rng.integers(min(self.thin_slices[0], z), min(self.thin_slices[1], z) + 1))
        z0 = int(rng.integers(0, z - n + 1))
        index = np.clip(np.arange(z), z0, z0 + n - 1)
        return image[:, :, index], {k: m[:, :, index] for k, m in masks.items()}

    def _queries(self, annotated: list[str], masks: dict, rng: np.random.Generator) -> list[str]:
        """The crop's queries in random order: present classes and in-set negatives (annotated classes absent from the
        crop), and with ``query_unannotated`` classes the dataset does not annotate."""
        present = [n for n in annotated if masks[n].any()]
        absent = [n for n in annotated if n not in present]
        # Negatives get a quota (all slots when nothing is present); positives fill the rest, unused slots go back.
        quota = self.max_queries if not present else max(1, round(self.max_queries * self.negative_fraction))
        pos = [present[i] for i in rng.permutation(len(present))[: self.max_queries - min(quota, len(absent))]]
        neg = [absent[i] for i in rng.permutation(len(absent))[: self.max_queries - len(pos)]]
        names = pos + neg
        if self.query_unannotated:
            names += [n for n in self.vocabulary.names if n not in masks][: max(0, self.max_queries - len(names))]
        return [names[i] for i in rng.permutation(len(names))]


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
            "query_mask": query_mask, "texts": [s["texts"] for s in samples],
            "classes": [s["classes"] for s in samples],
            "dataset": [s["dataset"] for s in samples], "case_id": [s["case_id"] for s in samples]}
