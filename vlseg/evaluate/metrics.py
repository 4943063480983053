"""Per-case scores of one binary mask pair, one registered function each (``METRICS``): Dice, NSD and HD95 computed
with MONAI, voxel counts, volumes, presence, false positive and false negative.

A metric is declared once, where it is defined, with what evaluation and its tables need to know about it
(:func:`metric`): whether it is a column of per_case.csv, how a group of rows summarises it (mean ± std, mean, count),
its heading and number format, whether ablation tables show it.  ``score_case``, ``summarise``, evaluate's
per_case.csv, ``format_table`` and the ablation table take the list from the registry, in the order the metrics were
defined: adding a metric is writing one registered function.

MONAI is used for the overlap and distance scores, but wrapped, because its defaults do not fit text-prompted
evaluation:

* Empty masks.  ``compute_dice`` ignores (NaN) an empty ground truth unless ``ignore_empty=False``, and the distance
  metrics return NaN/inf and warn when either mask is empty.  Absent-class prompts are a normal case here, so empty
  masks are scored before MONAI is called (both empty: Dice = NSD = 1, HD95 = NaN; one empty: Dice = NSD = 0,
  HD95 = NaN) and only non-empty pairs reach MONAI.
* Units.  The distance metrics measure in voxels unless ``spacing`` is passed, so the spacing is always passed
  (as a list of floats: MONAI rejects a sequence mixing ints and floats), making HD95 and the NSD tolerance mm.
* Speed.  MONAI makes several full-volume passes, so both masks are first cropped to the bounding box of their
  union plus one voxel; this changes no score (the voxels dropped are background in both masks, and a mask touching
  the border of the crop is treated exactly as one touching the border of the volume, since erosion counts outside
  voxels as background either way).  The metrics run with one torch thread: MONAI's are many small reductions
  for which waking a thread pool costs more than it saves, badly so on a busy machine (10x measured on 2 cores).
  MONAI is imported when first needed, so reading the metric list (``vlseg ablate --emit-commands``) stays light.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from vlseg.errors import VlsegError
from vlseg.registry import METRICS
from vlseg.transforms.boxes import mask_box
from vlseg.transforms.spatial import positive_triple

SUMMARIES = ("mean_std", "mean", "count")
_defined = itertools.count()


@dataclass(frozen=True)
class Metric:
    """A registered metric: its score of a :class:`MaskPair`, and what evaluation and its tables know about it."""

    name: str  # its key in score_case's dict and its per_case.csv column; the stem of its summary keys
    score: Callable[[MaskPair], Any]
    summary: str | None = None  # "mean_std", "mean" (None and NaN left out), "count" (rows where true), or None
    heading: str = ""  # its header in format_table and in the ablation table
    fmt: str = ".3f"  # how its summary numbers print
    column: bool = True  # a column of per_case.csv
    ablation: bool = False  # a table of its own in an ablation study's results (its mean, mean ± std over seeds)
    rank: int = field(default_factory=_defined.__next__)  # definition order: the order of columns and summary keys

    @property
    def summary_keys(self) -> tuple[str, ...]:
        """Its keys in a ``summarise`` group: ``<name>_mean`` and ``<name>_std``, ``<name>_mean``, or ``<name>s``."""
        return {"mean_std": (f"{self.name}_mean", f"{self.name}_std"), "mean": (f"{self.name}_mean",),
                "count": (f"{self.name}s",), None: ()}[self.summary]

    def summarise(self, values: list) -> dict:
        """Its summary of the values a group of rows holds (None where a row lacks it)."""
        if self.summary == "count":
            stats = (sum(bool(v) for v in values),)
        elif self.summary == "mean":
            stats = (_mean(values),)
        else:
            stats = (_mean(values), _std(values))
        return dict(zip(self.summary_keys, stats))


def metric(name: str, *, summary: str | None = None, heading: str = "", fmt: str = ".3f", column: bool = True,
           ablation: bool = False) -> Callable:
    """Register the decorated ``score(pair: MaskPair) -> value`` as metric ``name``, with what is declared about it
    (see :class:`Metric`; the heading defaults to the name)."""
    if summary not in (*SUMMARIES, None):
        raise ValueError(f"metric {name!r}: summary is one of {', '.join(SUMMARIES)} or None, not {summary!r}")
    if ablation and summary not in ("mean_std", "mean"):
        raise ValueError(f"metric {name!r}: an ablation table shows a mean, so the summary is 'mean_std' or 'mean'")

    def decorator(score: Callable[[MaskPair], Any]) -> Callable[[MaskPair], Any]:
        METRICS.register(name)(Metric(name, score, summary, heading or name, fmt, column, ablation))
        return score

    return decorator


def metrics() -> list[Metric]:
    """Every registered metric, in the order they were defined."""
    return sorted((METRICS.get(name) for name in METRICS.names()), key=lambda m: m.rank)


def _as_mask(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype == bool:
        return a
    if a.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected a boolean or 0/1 array, got dtype {a.dtype}")
    mask = a != 0
    if not np.array_equal(mask, a == 1):  # something other than 0 and 1, e.g. probabilities or a label map
        raise ValueError(f"{name}: expected a binary mask (0/1), found other values")
    return mask


def _spacing(spacing) -> list[float]:
    """Three positive floats (MONAI rejects a list mixing ints and floats), else ValueError."""
    try:
        return list(positive_triple(spacing, "spacing", where="score_case"))
    except VlsegError as exc:
        raise ValueError(str(exc)) from None


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _crop_to_union(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks cut to the bounding box of ``pred | gt`` grown by one voxel (clipped to the array)."""
    starts, stops = mask_box(pred | gt)
    box = tuple(slice(max(int(a) - 1, 0), int(b) + 1) for a, b in zip(starts, stops))
    return pred[box], gt[box]


class MaskPair:
    """One binary 3D prediction and its ground truth on the same voxel grid (checked), as each metric reads them."""

    def __init__(self, pred: np.ndarray, gt: np.ndarray, spacing: list[float], nsd_tolerance_mm: float):
        self.pred, self.gt, self.spacing, self.nsd_tolerance_mm = pred, gt, spacing, nsd_tolerance_mm
        self.n_pred, self.n_gt = int(np.count_nonzero(pred)), int(np.count_nonzero(gt))
        self.ml_per_voxel = spacing[0] * spacing[1] * spacing[2] / 1000.0

    @property
    def one_empty(self) -> bool:
        """Either mask is empty: such a pair is scored here, never by MONAI (see the module docstring)."""
        return self.n_gt == 0 or self.n_pred == 0

    @property
    def empty_agreement(self) -> float:
        """Dice and NSD when a mask is empty: 1 when both are (a correct "absent"), else 0."""
        return 1.0 if self.n_gt == self.n_pred else 0.0

    @cached_property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prediction and ground truth cropped to their union's box, shaped (batch, channel, x, y, z) as MONAI wants."""
        pred, gt = _crop_to_union(self.pred, self.gt)
        return (torch.from_numpy(np.ascontiguousarray(pred))[None, None],
                torch.from_numpy(np.ascontiguousarray(gt))[None, None])


@contextmanager
def _quiet_monai() -> Iterator[None]:
    # MONAI 1.5/1.6 warns (FutureWarning) about a deprecated argument it passes to itself in get_mask_edges.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


@metric("dice", summary="mean_std", heading="Dice", ablation=True)
def dice(pair: MaskPair) -> float:
    """Overlap, 2 |P ∩ G| / (|P| + |G|)."""
    if pair.one_empty:
        return pair.empty_agreement
    from monai.metrics import compute_dice

    y_pred, y = pair.tensors
    # include_background=True: the single channel IS the foreground (MONAI would otherwise drop channel 0).
    # ignore_empty=False is belt and braces: empty masks never get here.
    return float(compute_dice(y_pred.float(), y.float(), include_background=True, ignore_empty=False)[0, 0])


@metric("nsd", summary="mean_std", heading="NSD")
def nsd(pair: MaskPair) -> float:
    """Normalised surface Dice: the share of both surfaces within ``nsd_tolerance_mm`` of the other."""
    if pair.one_empty:
        return pair.empty_agreement
    from monai.metrics import compute_surface_dice

    y_pred, y = pair.tensors
    with _quiet_monai():
        value = compute_surface_dice(y_pred, y, class_thresholds=[pair.nsd_tolerance_mm], include_background=True,
                                     spacing=pair.spacing)
    return float(value[0, 0])


@metric("hd95", summary="mean", heading="HD95 mm", fmt=".2f")
def hd95(pair: MaskPair) -> float:
    """The 95th percentile of the surface distances both ways, in mm; NaN when either mask is empty."""
    if pair.one_empty:
        return float("nan")
    from monai.metrics import compute_hausdorff_distance

    y_pred, y = pair.tensors
    with _quiet_monai():
        value = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=pair.spacing)
    return float(value[0, 0])


@metric("gt_voxels")
def gt_voxels(pair: MaskPair) -> int:
    """Voxels of the ground truth."""
    return pair.n_gt


@metric("pred_voxels")
def pred_voxels(pair: MaskPair) -> int:
    """Voxels of the prediction."""
    return pair.n_pred


@metric("gt_volume_ml")
def gt_volume_ml(pair: MaskPair) -> float:
    """The ground truth's volume in millilitres."""
    return pair.n_gt * pair.ml_per_voxel


@metric("pred_volume_ml")
def pred_volume_ml(pair: MaskPair) -> float:
    """The prediction's volume in millilitres."""
    return pair.n_pred * pair.ml_per_voxel


@metric("false_positive", summary="count", heading="FP")
def false_positive(pair: MaskPair) -> bool:
    """Nothing there, but a mask was drawn."""
    return pair.n_gt == 0 and pair.n_pred > 0


@metric("false_negative", summary="count", heading="FN")
def false_negative(pair: MaskPair) -> bool:
    """Something there, but nothing drawn."""
    return pair.n_gt > 0 and pair.n_pred == 0


@metric("gt_present", column=False)
def gt_present(pair: MaskPair) -> bool:
    """The ground truth is not empty."""
    return pair.n_gt > 0


@metric("pred_present", column=False)
def pred_present(pair: MaskPair) -> bool:
    """The prediction is not empty."""
    return pair.n_pred > 0


def score_case(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float],
               nsd_tolerance_mm: float = 2.0) -> dict:
    """Every registered metric of one binary 3D prediction against its ground truth on the same voxel grid.

    ``spacing`` is the voxel size in mm along the three array axes.  Returns ``{metric name: value}``: ``dice``,
    ``nsd`` (normalised surface Dice at ``nsd_tolerance_mm``), ``hd95`` (mm; NaN when either mask is empty),
    ``gt_voxels``/``pred_voxels``, ``gt_volume_ml``/``pred_volume_ml``, ``false_positive`` (nothing there but a mask
    was drawn), ``false_negative`` (something there but nothing drawn), ``gt_present``/``pred_present``, and those of
    any metric registered since.  Raises ``ValueError`` for masks of different shapes, non-3D or non-binary masks, or
    a bad spacing/tolerance.
    """
    pred, gt = _as_mask(pred, "prediction"), _as_mask(gt, "ground truth")
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    if pred.ndim != 3:
        raise ValueError(f"expected 3D masks, got shape {pred.shape}")
    sp = _spacing(spacing)
    tol = float(nsd_tolerance_mm)
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"nsd_tolerance_mm must be a non-negative number, got {nsd_tolerance_mm!r}")
    pair = MaskPair(pred, gt, sp, tol)
    with _one_torch_thread():
        return {m.name: m.score(pair) for m in metrics()}


def _finite(values) -> list[float]:
    out = []
    for v in values:
        if v is None:
            continue
        v = float(v)
        if not math.isnan(v):
            out.append(v)
    return out


def _mean(values) -> float:
    vals = _finite(values)
    return float(np.mean(vals)) if vals else float("nan")


def _std(values) -> float:
    vals = _finite(values)
    return float(np.std(vals)) if vals else float("nan")  # population std (ddof=0): 0.0 for a single row


def _sort_key(key: tuple) -> tuple:
    # Group keys may mix types (e.g. None next to strings); order by type name first so sorting never fails.
    return tuple((type(k).__name__, k) if k is not None else ("", "") for k in key)


def summarise(rows: list[dict], by: tuple[str, ...]) -> list[dict]:
    """One dict per group of ``rows`` (grouped on the keys in ``by``; ``()`` gives a single overall group).

    Each holds the group keys, ``n`` and every summarised metric's keys (``Metric.summary_keys``): ``dice_mean``/
    ``dice_std``, ``nsd_mean``/``nsd_std`` (population std), ``hd95_mean`` (NaN rows ignored; NaN if none is finite),
    ``false_positives`` and ``false_negatives`` (counts).  A row without a metric is left out of its mean (and not
    counted).  Groups come out sorted by their keys.  No rows gives an empty list.
    """
    by = tuple(by)
    groups: dict[tuple, list[dict]] = {}
    for i, row in enumerate(rows):
        missing = [k for k in by if k not in row]
        if missing:
            raise ValueError(f"row {i} lacks grouping key(s) {missing}")
        groups.setdefault(tuple(row[k] for k in by), []).append(row)
    summarised = [m for m in metrics() if m.summary]
    out = []
    for key in sorted(groups, key=_sort_key):
        members = groups[key]
        group = {**dict(zip(by, key)), "n": len(members)}
        for m in summarised:
            group.update(m.summarise([r.get(m.name) for r in members]))
        out.append(group)
    return out
