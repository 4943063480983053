"""The model's frame: a RAS-canonical scan at the working spacing with model-ready intensities, and the way back.

The one copy of these steps, used when a case is cached (``vlseg.prepare.cache.build``) and when ``Segmenter``
predicts.  In this order: intensities normalised on the scan's own grid (``normalize_intensity``: the CT window, the MR
z-score), then resampled to the working spacing (image trilinear, label nearest); with no working spacing the scan's
grid is the model's.  The field of view stays the same, so ``ModelFrame.to_scan`` brings any array on the model's grid
back onto the scan's exactly (inference does the same interpolation box by box: ``vlseg.infer.stitching.upsample_box``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vlseg.transforms.intensity import CT_WINDOW, normalize_intensity
from vlseg.transforms.spatial import positive_triple, resample_to_shape, resampled_shape


@dataclass(frozen=True)
class ModelFrame:
    """Where the model's grid lies over a canonical scan's grid (the same field of view)."""

    scan_shape: tuple[int, int, int]
    scan_spacing: tuple[float, float, float]
    spacing: tuple[float, float, float]  # the model's voxel size (mm): the working spacing, else the scan's own
    shape: tuple[int, int, int]  # the model's grid
    resampled: bool  # False: the model works on the scan's own grid

    @classmethod
    def of(cls, scan_shape, scan_spacing, spacing=None) -> "ModelFrame":
        """The frame of a scan of ``scan_shape`` voxels of ``scan_spacing`` mm at working ``spacing`` (None: its
        own)."""
        scan_shape = tuple(int(n) for n in tuple(scan_shape)[-3:])
        scan_spacing = positive_triple(scan_spacing, "spacing")
        if spacing is None:
            return cls(scan_shape, scan_spacing, scan_spacing, scan_shape, False)
        shape = resampled_shape(scan_shape, scan_spacing, spacing)
        return cls(scan_shape, scan_spacing, positive_triple(spacing, "target_spacing"), shape, True)

    def image(self, data) -> np.ndarray:
        """Intensities on the scan's grid → the model's grid (trilinear, float32)."""
        return resample_to_shape(data, self.shape, order=1) if self.resampled else data

    def label(self, label) -> np.ndarray:
        """A label map on the scan's grid → the model's grid (nearest; values and dtype kept)."""
        return resample_to_shape(label, self.shape, order=0) if self.resampled else label

    def to_scan(self, data, order: int = 1) -> np.ndarray:
        """An array on the model's grid (3D, or channels-first 4D) → the scan's grid; order 1 trilinear, 0 nearest."""
        return resample_to_shape(data, self.scan_shape, order=order) if self.resampled else np.asarray(data)


def to_model_frame(scan, modality: str, ct_window=CT_WINDOW, spacing=None,
                   intensity: str = "vlseg") -> tuple[np.ndarray, ModelFrame]:
    """A RAS-canonical ``Scan``'s intensities in the model's frame (float32 ``[X, Y, Z]``) and that frame.

    ``modality`` "CT" or "MR" (any accepted spelling); ``spacing`` the working spacing in mm (None: the scan's own);
    ``intensity`` the normalisation scheme (``vlseg.transforms.intensity``)."""
    frame = ModelFrame.of(scan.data.shape, scan.spacing, spacing)
    return frame.image(normalize_intensity(scan.data, modality, ct_window, intensity)), frame
