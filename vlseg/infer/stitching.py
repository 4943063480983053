"""Sliding-window inference for many prompts at once, in memory that does not grow with their number.

MONAI's ``sliding_window_inference`` blends every output channel into one float32 volume, and the masks were then
resampled to the scan's grid as K float32 volumes: 100 prompts on a 512 × 512 × 300 CT would need tens of GB.  Here:

* each window's image features are computed once and every prompt is decoded from them, in chunks of prompts;
* each prompt's blended probability is kept at the working resolution as 16-bit fixed point, and only for prompts that
  reach a probability floor somewhere (an absent target allocates nothing);
* a mask reaches the scan's grid only inside the box where it can be positive (``upsample_box``), as a ``BoxMask``:
  the uint8 crop and where it sits.  A full-size array exists only when a caller asks for one, one at a time.

Windows, their Gaussian weights and the blending follow MONAI (``compute_importance_map``, the same window starts), so
the probabilities match ``sliding_window_inference`` to the fixed-point precision (about 1e-4).

Released models blend as their own code does: ``blend="logit"`` averages logits rather than probabilities (CLIP-
Universal, VoxTell; the sums are then float16 logits, as VoxTell keeps them), ``placement="nnunet"`` spaces
the windows evenly as nnU-Net does, and ``pad_mode="constant"`` pads a short side with zeros as nnU-Net does.  In logit
mode a prompt whose logits stay below -20 in a window is left out there, and that window counts as giving -20 (at
most its own value: a sign can only change where other windows' logits outweigh -20).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from vlseg.transforms.boxes import mask_box

PLACEMENTS = ("monai", "nnunet")
BLENDS = ("probability", "logit")
LOGIT_RANGE, LOGIT_FLOOR = 64.0, -20.0


def window_starts(size: int, roi: int, overlap: float, placement: str = "monai") -> list[int]:
    """Start indices of the windows along one axis: as MONAI places them (steps of ``roi·(1-overlap)``, the last one
    flush with the end), or as nnU-Net does (the fewest windows with steps no longer than that, spread evenly)."""
    if size <= roi:
        return [0]
    if placement == "nnunet":
        count = math.ceil((size - roi) / (roi * (1.0 - overlap))) + 1
        return [int(round((size - roi) / (count - 1) * i)) for i in range(count)]
    step = max(int(roi * (1.0 - overlap)), 1)
    count = math.ceil((size - roi) / step) + 1
    return sorted({min(i * step, size - roi) for i in range(count)})


class BoxMask:
    """A binary mask of ``shape`` stored as the uint8 ``crop`` placed at ``offset``; zero elsewhere.  The crop is kept
    bit-packed (one bit a voxel), so a hundred organ-sized masks of a 512 × 512 × 300 CT fit in tens of MB.

    Behaves as a read-only uint8 array where masks are used: ``np.asarray``, ``astype``, ``any``, ``sum``,
    ``shape``/``dtype``/``ndim``, basic slicing (``m[:, :, z]`` builds only that slice) and ``argwhere``.
    """

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, shape, offset=(0, 0, 0), crop: np.ndarray | None = None):
        self.shape = tuple(int(v) for v in shape)
        self.offset = tuple(int(v) for v in offset)
        crop = np.zeros((0, 0, 0), np.uint8) if crop is None else np.asarray(crop)
        self.crop_shape = tuple(int(v) for v in crop.shape)
        self._bits = np.packbits(crop.astype(bool, copy=False).ravel())
        self._count = int(np.count_nonzero(crop))

    @property
    def crop(self) -> np.ndarray:
        """The uint8 box (unpacked on each access)."""
        n = int(np.prod(self.crop_shape))
        return np.unpackbits(self._bits, count=n).reshape(self.crop_shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        """Where ``crop`` sits in the full array."""
        return tuple(slice(o, o + n) for o, n in zip(self.offset, self.crop_shape))

    def __array__(self, dtype=None, copy=None):
        out = np.zeros(self.shape, np.uint8)
        if self._count:
            out[self.slices] = self.crop
        return out if dtype is None else out.astype(dtype, copy=False)

    def astype(self, dtype, copy=True):
        return np.asarray(self).astype(dtype, copy=False)

    def any(self) -> bool:
        return self._count > 0

    def sum(self) -> int:
        return self._count

    def argwhere(self) -> np.ndarray:
        return np.argwhere(self.crop) + np.asarray(self.offset)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        if len(key) != 3 or not all(isinstance(k, (slice, int, np.integer)) for k in key):
            return np.asarray(self)[key]
        picks = [np.arange(n)[k] for n, k in zip(self.shape, key)]
        out = np.zeros([np.size(p) for p in picks], np.uint8)
        inside = [(np.atleast_1d(p) >= o) & (np.atleast_1d(p) < o + n)
                  for p, o, n in zip(picks, self.offset, self.crop_shape)]
        if self._count and all(i.any() for i in inside):
            src = np.ix_(*[np.atleast_1d(p)[i] - o for p, i, o in zip(picks, inside, self.offset)])
            out[np.ix_(*[np.nonzero(i)[0] for i in inside])] = self.crop[src]
        return out.reshape([np.size(p) for p, k in zip(picks, key) if not isinstance(k, (int, np.integer))])


def _linear_taps(n_in: int, n_out: int):
    """For each output index: the two input indices and the weight of the second, exactly as torch's
    ``interpolate(mode="trilinear", align_corners=False)`` computes them for one axis."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out) + 0.5) * scale - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (src - lo).astype(np.float32)


def upsample_box(prob: np.ndarray, out_shape, threshold: float, slab: int = 16) -> tuple[tuple[int, int, int],
                                                                                        np.ndarray]:
    """Threshold the trilinear resampling of ``prob`` to ``out_shape`` without building the full volume.

    A resampled value is a convex combination of at most 8 neighbours, so it can reach ``threshold`` only where one of
    them does: only the output box over the input's above-threshold box is interpolated.  Returns ``(offset, uint8
    crop)`` trimmed to the positive voxels; equal to thresholding the full ``interpolate`` result.  Works through
    ``slab`` output planes at a time, so its temporaries are a few slabs of float32 whatever the box's size.
    """
    box = mask_box(prob >= threshold)
    if box is None:
        return (0, 0, 0), np.zeros((0, 0, 0), np.uint8)
    w_lo, w_hi = box[0], box[1] - 1
    taps, offset = [], []
    for axis, (n_in, n_out) in enumerate(zip(prob.shape, out_shape)):
        lo, hi, frac = _linear_taps(n_in, int(n_out))
        keep = np.nonzero((hi >= w_lo[axis]) & (lo <= w_hi[axis]))[0]
        first, last = int(keep[0]), int(keep[-1]) + 1
        taps.append((lo[first:last], hi[first:last], frac[first:last]))
        offset.append(first)
    source = torch.from_numpy(np.ascontiguousarray(prob, dtype=np.float32))
    mask = np.zeros([len(t[0]) for t in taps], bool)
    # Slabs of output planes along x, so the float temporaries stay a slab's worth whatever the box's size.
    for start in range(0, mask.shape[0], slab):
        lo_x, hi_x, frac_x = (v[start:start + slab] for v in taps[0])
        first = int(lo_x.min())
        result = source[first:int(hi_x.max()) + 1]
        for axis, (lo, hi, frac) in enumerate([(lo_x - first, hi_x - first, frac_x), taps[1], taps[2]]):
            lo, hi, frac = torch.from_numpy(lo), torch.from_numpy(hi), torch.from_numpy(frac)
            # The axis being resampled is always the leading one, so each gather copies whole contiguous planes;
            # the axes are rotated after each pass ((x, y, z) → (y, z, x)), three rotations bringing them back.
            result = torch.lerp(result.index_select(0, lo), result.index_select(0, hi), frac.view(-1, 1, 1))
            result = result >= threshold if axis == 2 else result
            result = result.permute(1, 2, 0).contiguous()
        mask[start:start + slab] = result.numpy()
    box = mask_box(mask)
    if box is None:
        return (0, 0, 0), np.zeros((0, 0, 0), np.uint8)
    a, b = box
    crop = mask[a[0]:b[0], a[1]:b[1], a[2]:b[2]].view(np.uint8).copy()
    return tuple(int(o + v) for o, v in zip(offset, a)), crop


class PromptStitcher:
    """Blends per-window probabilities of K prompts over a grid (see the module docstring).

    ``add(corner, probs)`` takes one window's ``[K, *roi]`` probabilities (``blend="logit"``: logits);
    ``probability(k)`` the blended float32 probability grid of prompt k, or None when it never reached ``floor`` (its
    probability is then below ``floor`` everywhere).
    """

    def __init__(self, grid_shape, roi, overlap: float, n_prompts: int, floor: float = 1e-3, valid=None,
                 region=None, blend: str = "probability", placement: str = "monai"):
        from monai.data.utils import compute_importance_map

        if blend not in BLENDS or placement not in PLACEMENTS:
            raise ValueError(f"blend {blend!r} / placement {placement!r}: use {BLENDS} / {PLACEMENTS}")
        self.blend = blend
        self.grid_shape, self.roi = tuple(grid_shape), tuple(roi)
        # the part of the grid that is image, as slices (the rest pads a side shorter than the window)
        self.valid = tuple(valid) if valid is not None else tuple(slice(0, n) for n in self.grid_shape)
        self.corners = [(a, b, c) for a in window_starts(self.grid_shape[0], self.roi[0], overlap, placement)
                        for b in window_starts(self.grid_shape[1], self.roi[1], overlap, placement)
                        for c in window_starts(self.grid_shape[2], self.roi[2], overlap, placement)]
        if region is not None:  # only the windows that overlap the box [lo, hi) (coarse-to-fine); zero elsewhere
            lo, hi = region
            self.corners = [c for c in self.corners
                            if all(s < h and s + r > a for s, r, a, h in zip(c, self.roi, lo, hi))]
        weight = compute_importance_map(self.roi, mode="gaussian", sigma_scale=0.125, device="cpu").float()
        self.weight = torch.clamp(weight, min=max(float(weight.min()), 1e-3))  # (as MONAI: no zero weights)
        self.weight_sum = np.zeros(self.grid_shape, np.float32)
        for corner in self.corners:
            self.weight_sum[self._box(corner)] += self.weight.numpy()
        # Each window's contribution is divided by the final weight sum as it is added (the windows are known in
        # advance), so a prompt's sum is its blended probability in [0, 1], kept with 1/65000 resolution everywhere,
        # including the weakly weighted borders.
        self.scale = 65000.0
        self.floor = float(floor) if blend == "probability" else LOGIT_FLOOR
        self.sums: list[np.ndarray | None] = [None] * n_prompts

    def _box(self, corner):
        return tuple(slice(c, c + r) for c, r in zip(corner, self.roi))

    @property
    def allocated(self) -> int:
        """How many prompts hold an accumulator (the others never reached the floor)."""
        return sum(s is not None for s in self.sums)

    def add(self, corner, probs: torch.Tensor, first_prompt: int = 0) -> None:
        if self.blend == "logit":
            return self._add_logits(corner, probs, first_prompt)
        box = self._box(corner)
        peaks = probs.flatten(1).amax(1).tolist()
        share = None
        for k, peak in enumerate(peaks, first_prompt):
            if peak < self.floor:
                continue  # contributes less than the floor anywhere: leaving it out changes nothing above it
            if share is None:  # this window's weight as a share of every window's at each voxel, in fixed point
                share = self.weight * torch.from_numpy(self.scale / np.maximum(self.weight_sum[box], 1e-12))
            fixed = torch.round(probs[k - first_prompt].float() * share).to(torch.int32)
            if self.sums[k] is None:
                self.sums[k] = np.zeros(self.grid_shape, np.uint16)
            self.sums[k][box] += fixed.numpy().astype(np.uint16)

    def _add_logits(self, corner, logits: torch.Tensor, first_prompt: int) -> None:
        """Logit mode: float16 sums of share-weighted logits, as VoxTell accumulates them (its sign stays exact near
        zero, where the mask's edge is).  A prompt first allocated at a later window starts from the floor logit times
        the share of the windows before it, and a window where an allocated prompt stays below the floor adds the
        floor: a window left out counts as -20, at most its own value."""
        box = self._box(corner)
        share = None
        for k, peak in enumerate(logits.flatten(1).amax(1).tolist(), first_prompt):
            if peak < self.floor and self.sums[k] is None:
                continue
            if share is None:
                share = (self.weight.numpy() / np.maximum(self.weight_sum[box], 1e-12)).astype(np.float32)
            if self.sums[k] is None:
                self.sums[k] = (LOGIT_FLOOR * self._share_before(corner)).astype(np.float16)
            value = np.float32(LOGIT_FLOOR) if peak < self.floor else \
                logits[k - first_prompt].float().clamp(-LOGIT_RANGE, LOGIT_RANGE).numpy()
            self.sums[k][box] = (self.sums[k][box].astype(np.float32) + value * share).astype(np.float16)

    def _share_before(self, corner) -> np.ndarray:
        """Each voxel's share of weight from the windows before ``corner``."""
        out = np.zeros(self.grid_shape, np.float32)
        for earlier in self.corners[:self.corners.index(corner)]:
            box = self._box(earlier)
            out[box] += self.weight.numpy() / np.maximum(self.weight_sum[box], 1e-12)
        return out

    def probability(self, k: int) -> np.ndarray | None:
        if self.sums[k] is None:
            return None
        if self.blend == "logit":
            return 1.0 / (1.0 + np.exp(-self.sums[k][self.valid].astype(np.float32)))
        return self.sums[k][self.valid].astype(np.float32) / self.scale


def stitch(image: torch.Tensor, roi, overlap: float, n_prompts: int, encode: Callable, decode: Callable,
           batch_size: int = 2, prompt_chunk: int = 16, floor: float = 1e-3, region=None, blend: str = "probability",
           placement: str = "monai", pad_mode: str = "replicate"):
    """Run ``encode`` once per window of ``image`` ``[1, C, X, Y, Z]`` and ``decode(features, start, stop)`` for each
    chunk of prompts (→ ``probs [B, k, *roi]`` (logits when ``blend="logit"``), ``presence [B, k]``); return the
    ``PromptStitcher`` (on the image's grid, padded by edge replication, or zeros with ``pad_mode="constant"``, where a
    side is shorter than the window) and each prompt's highest presence.

    A short axis is padded on both sides, half each, as MONAI does: a thin scan then sits in the middle of its
    windows, as thin slabs sit in training crops (padding at one end only puts it at a window's edge, and a model
    trained on centred slabs answers much worse there).  ``region`` ``(lo, hi)``, in the image's own indices, limits the
    work to the windows overlapping that box."""
    shape = tuple(image.shape[2:])
    before = [max(0, r - s) // 2 for r, s in zip(roi, shape)]
    after = [max(0, r - s) - b for r, s, b in zip(roi, shape, before)]
    if any(before) or any(after):
        image = torch.nn.functional.pad(image, [v for b, a in zip(reversed(before), reversed(after)) for v in (b, a)],
                                        mode="constant" if pad_mode == "constant" else "replicate")
    if region is not None:
        region = tuple(np.asarray(v) + np.asarray(before) for v in region)
    valid = tuple(slice(b, b + n) for b, n in zip(before, shape))
    stitcher = PromptStitcher(image.shape[2:], roi, overlap, n_prompts, floor, valid=valid, region=region,
                              blend=blend, placement=placement)
    presence = torch.zeros(n_prompts)
    for b in range(0, len(stitcher.corners), batch_size):
        corners = stitcher.corners[b:b + batch_size]
        windows = torch.cat([image[(slice(None), slice(None), *stitcher._box(c))] for c in corners])
        features = encode(windows)
        for start in range(0, n_prompts, prompt_chunk):
            stop = min(start + prompt_chunk, n_prompts)
            probs, pres = decode(features, start, stop)
            presence[start:stop] = torch.maximum(presence[start:stop], pres.float().amax(0).cpu())
            probs = probs.float().cpu()
            for i, corner in enumerate(corners):
                stitcher.add(corner, probs[i], start)
    return stitcher, presence
