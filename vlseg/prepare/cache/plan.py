"""The spacing plan: which spacing each dataset's cases are cached at, and the checks of the settings that shape a case.

From ``settings["target_spacing"]``:

* ``None`` — every case keeps its native (canonical) spacing; the plan holds ``None`` for the dataset;
* ``[x, y, z]`` — that spacing for every dataset;
* ``"auto"`` — per dataset, nnU-Net's rule (``plan_spacing``) over that dataset's training-split cases among those
  given (all its given cases when none is in the training split);

``settings["spacing_per_dataset"]`` (dataset → ``[x, y, z]``) overrides single datasets; entries naming a dataset
that has no case in the list are ignored, so one config serves every split.  The spacing recorded for a resampled
case is the planned one (the grid has ``round(n * native / planned)`` voxels over the same field of view).
"""

from __future__ import annotations

import numpy as np

from vlseg.errors import VlsegError
from vlseg.prepare.manifest import Case
from vlseg.transforms.intensity import CT_WINDOW, intensity_window
from vlseg.transforms.spatial import positive_triple

ANISOTROPY = 3.0  # nnU-Net: anisotropic when the coarsest median spacing exceeds 3x the finest
COARSE_PERCENTILE = 10.0


def ct_window(settings: dict) -> tuple[float, float]:
    """The CT window (HU) of the preprocessing settings: ``settings["ct_window"]``, else ``CT_WINDOW``."""
    return intensity_window(settings.get("ct_window", CT_WINDOW), "data.ct_window")


def _spacing(value, what: str) -> list[float]:
    return list(positive_triple(value, f"{what} (mm)", where=""))


def plan_spacing(spacings: list[tuple[float, float, float]]) -> tuple[float, float, float]:
    """nnU-Net's target spacing for one dataset.

    The per-axis median of the cases' spacings.  When the dataset is anisotropic — the largest of the three medians
    is more than ``ANISOTROPY`` (3) times the smallest — the coarse axis (the one with the largest median) takes the
    10th percentile of its spacings instead of the median: a finer grid along that axis, so that the cases with thin
    slices do not lose most of their resolution there to the thick-slice majority (nnU-Net's rationale).  Example:
    medians (0.7, 0.7, 5.0) are anisotropic (5.0 / 0.7 > 3), so z becomes the 10th percentile of the z spacings.
    """
    rows = [_spacing(s, "plan_spacing: each spacing") for s in spacings]
    if not rows:
        raise VlsegError("plan_spacing: no spacings to plan from (no cases)")
    arr = np.asarray(rows, dtype=np.float64)
    target = np.median(arr, axis=0)
    if target.max() / target.min() > ANISOTROPY:
        coarse = int(np.argmax(target))
        target[coarse] = np.percentile(arr[:, coarse], COARSE_PERCENTILE)
    return tuple(float(v) for v in target)


def check_settings(settings: dict) -> None:
    """A one-line error for preprocessing settings that cannot be used (CT window, per-dataset spacings)."""
    if not isinstance(settings, dict):
        raise VlsegError(f"preprocessing settings must be a mapping, got {type(settings).__name__}")
    ct_window(settings)
    per_dataset = settings.get("spacing_per_dataset") or {}
    if not isinstance(per_dataset, dict):
        raise VlsegError(f"data.spacing_per_dataset must map dataset names to [x, y, z], got {per_dataset!r}")
    for name, value in per_dataset.items():
        _spacing(value, f"data.spacing_per_dataset.{name}")


def plan_corpus(cases: list[Case], settings: dict) -> dict[str, list[float] | None]:
    """Dataset → the spacing its cases are cached at, ``None`` meaning each case's own native spacing.

    See the module docstring for ``target_spacing`` (None / [x, y, z] / "auto") and ``spacing_per_dataset``."""
    check_settings(settings)
    target = settings.get("target_spacing")
    per_dataset = settings.get("spacing_per_dataset") or {}
    if isinstance(target, str) and target.strip().lower() != "auto":
        raise VlsegError(f"data.target_spacing must be null, \"auto\" or three numbers (mm), got {target!r}")
    fixed = None if target is None or isinstance(target, str) else _spacing(target, "data.target_spacing")
    plan: dict[str, list[float] | None] = {}
    for dataset in sorted({c.dataset for c in cases}):
        if dataset in per_dataset:
            plan[dataset] = _spacing(per_dataset[dataset], f"data.spacing_per_dataset.{dataset}")
        elif target is None:
            plan[dataset] = None
        elif fixed is not None:
            plan[dataset] = list(fixed)
        else:
            mine = [c for c in cases if c.dataset == dataset]
            train = [c for c in mine if c.split == "train"]
            plan[dataset] = list(plan_spacing([c.spacing for c in (train or mine)]))
    return plan


def settings_record(settings: dict) -> dict:
    """The settings as ``plan.json`` records them."""
    return {"ct_window": list(ct_window(settings)),
            "target_spacing": settings.get("target_spacing"),
            "spacing_per_dataset": {str(k): [float(v) for v in s]
                                    for k, s in (settings.get("spacing_per_dataset") or {}).items()}}
