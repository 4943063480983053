"""Bounding boxes: of one mask, and of the classes of a label map.

A box is end exclusive.  ``mask_box`` gives ``(starts, stops)`` index arrays; ``class_boxes`` gives the manifest's and
the cache's ``[x0, y0, z0, x1, y1, z1]`` lists.
"""

from __future__ import annotations

import numpy as np


def mask_box(mask: np.ndarray):
    """``(starts, stops)`` index arrays of the smallest box holding every True voxel of ``mask``, or None when it has
    none; from one projection per axis, not from listing the voxels."""
    mask = np.asarray(mask)
    starts, stops = [], []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        starts.append(hits[0])
        stops.append(hits[-1] + 1)
    return np.asarray(starts), np.asarray(stops)


def class_boxes(label: np.ndarray, classes: dict[str, list[int]]) -> dict[str, list[int]]:
    """Per class present in the integer ``label``, the box of the union of its label values as ``[x0, y0, z0, x1, y1,
    z1]``; absent classes are left out.  Values of 0 or below are background.  One pass over the label whatever the
    number of classes."""
    from scipy import ndimage

    label = np.asarray(label)
    top = int(label.max()) if label.size else 0
    slices = ndimage.find_objects(label) if top > 0 else []  # slices[v - 1]: the box of value v, None when absent
    out = {}
    for name, values in classes.items():
        found = [slices[v - 1] for v in (int(v) for v in values) if 0 < v <= top and slices[v - 1] is not None]
        if found:
            lo = np.min([[s.start for s in box] for box in found], axis=0)
            hi = np.max([[s.stop for s in box] for box in found], axis=0)
            out[name] = [*map(int, lo), *map(int, hi)]
    return out
