"""Intensities the model reads: the CT window and the MR z-score, or a released model's own scheme.

``data.intensity`` chooses among ``INTENSITY_MODES``:

* ``vlseg``: CT clipped to the window and scaled to [-1, 1]; MR percentile-clipped and z-scored (this codebase's own);
* ``window_unit``: CT clipped to the window and scaled to [0, 1] (CLIP-Universal); MR as ``vlseg``;
* ``window_zscore``: CT clipped to the window, then z-scored over the volume; other modalities clipped to their
  0.5–99.5 percentiles and z-scored, both over every voxel, zeros included (SAT);
* ``zscore``: every modality z-scored over the whole volume, nothing clipped (nnU-Net's default, VoxTell).
"""

from __future__ import annotations

import math

import numpy as np

from vlseg.errors import VlsegError
from vlseg.io.scan import canonical_modality

CT_WINDOW = (-200.0, 300.0)  # HU mapped to [-1, 1] for CT unless a config says otherwise (data.ct_window)
INTENSITY_MODES = ("vlseg", "window_unit", "window_zscore", "zscore")


def intensity_window(window, what: str) -> tuple[float, float]:
    """``(low, high)`` as two finite floats with low < high, or a one-line error naming ``what``."""
    try:
        lo, hi = (float(v) for v in window)
    except (TypeError, ValueError):
        lo = hi = float("nan")
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise VlsegError(f"{what} must be two finite numbers (low, high) with low < high, got {window!r}")
    return lo, hi


def _zscore(data: np.ndarray) -> np.ndarray:
    values = data.astype(np.float64)
    return ((data - values.mean()) / max(float(values.std()), 1e-8)).astype(np.float32)


def normalize_intensity(data, modality: str, ct_window=CT_WINDOW, mode: str = "vlseg") -> np.ndarray:
    """Model-ready float32 intensities.

    CT: clip to ``ct_window`` (HU) and scale linearly to [-1, 1].  MR: clip to the 0.5–99.5 percentiles of the
    non-zero voxels, then z-score with the mean and standard deviation of those voxels (an all-zero image stays 0).
    ``modality`` is "CT" or "MR" in any case; "MRI" means MR.  ``mode``: see the module docstring.
    """
    if mode not in INTENSITY_MODES:
        raise VlsegError(f"data.intensity={mode!r}: use one of {', '.join(INTENSITY_MODES)}")
    kind = canonical_modality(modality)
    data = np.asarray(data, dtype=np.float32)
    if mode == "zscore":
        return _zscore(data)
    if mode == "window_zscore" and kind != "CT":
        lo, hi = np.percentile(data, [0.5, 99.5])
        return _zscore(np.clip(data, lo, hi))
    if kind == "CT" and mode != "vlseg":
        lo, hi = intensity_window(ct_window, "ct_window")
        clipped = np.clip(data, lo, hi)
        return _zscore(clipped) if mode == "window_zscore" else ((clipped - lo) / (hi - lo)).astype(np.float32)
    if kind == "CT":
        lo, hi = intensity_window(ct_window, "ct_window")
        return ((np.clip(data, lo, hi) - lo) * (2.0 / (hi - lo)) - 1.0).astype(np.float32)
    foreground = data != 0
    values = data[foreground]
    if values.size == 0:
        return np.zeros_like(data, dtype=np.float32)
    lo, hi = np.percentile(values, [0.5, 99.5])
    clipped = np.clip(data, lo, hi)
    values = clipped[foreground].astype(np.float64)
    mean, std = float(values.mean()), float(values.std())
    return ((clipped - mean) / max(std, 1e-6)).astype(np.float32)
