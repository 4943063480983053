"""Synthetic liver tumours inserted into the real liver of real CT scans.

Our real-scan corpus has liver masks but no liver-tumour labels, so lesions are painted into the liver and carry their
own exact label: as a training-time augmentation (``synthesize_lesions`` on a crop or volume, applied with
``LesionConfig.probability`` by the caller) and once, with a seed of its own, into a held-out scan for evaluation
(``synthesize_case``).

What is modelled, per lesion:

* **Shape** — an ellipsoid in millimetres (anisotropic voxel spacing respected) with semi-axes
  ``radius * (1, e1, e2)`` (``e1, e2`` drawn from ``elongation``), a uniformly random orientation, and a smooth
  low-frequency radial perturbation of the boundary (``irregularity``: the boundary radius along each direction is
  scaled by a factor in ``[1 - irregularity, 1 + irregularity]``) for lobulated outlines.  Every lesion is star-shaped
  around its centre and its label is one connected component.
* **Placement** — centres are drawn uniformly among the organ's voxels; a candidate is redrawn (with a progressively
  smaller radius) unless at least ``margin_inside`` of its in-volume mask lies inside the organ, its label is one
  connected component, and its soft footprint does not touch an earlier lesion.  Voxels beyond the array's edge (a
  crop's border) count neither for nor against the lesion.  A lesion that finds no place is skipped.
* **Appearance** — ``new = old + w * (contrast + texture) * hu_scale`` where ``w`` in [0, 1] is a soft profile
  (1 inside, falling smoothly to 0 across a band ``boundary_mm`` wide centred on the boundary), ``contrast`` is the
  lesion's mean minus the local liver mean (negative: hypodense, the usual case; positive: hyperdense), and
  ``texture`` is Gaussian-smoothed noise with standard deviation ``texture_hu``.  The liver's own fine texture under
  the lesion is damped slightly (towards its local organ-only mean) so the lesion does not inherit the parenchyma's
  grain at full strength.  The profile is cut at the organ surface: nothing outside the organ changes, so
  surrounding fat, bowel or vessels outside the mask are never darkened.  The result is clipped to the input's
  [min, max] range, which keeps a windowed/normalised image inside its valid range.
* **Label** — ``w >= 0.5`` inside the organ; always a subset of the organ.

Limits: no internal vascular structure, capsule, necrotic core, calcification or enhancement phases (one
homogeneous-plus-noise intensity per lesion); no mass effect (surrounding anatomy is not displaced, the organ outline
is unchanged); a lesion at the organ surface is flattened against it rather than bulging; intensities are additive
in HU, so partial-volume and noise properties of the scanner are only approximated; texture correlation and the
boundary band are isotropic in millimetres, which on very thick slices is coarser than in-plane.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import numpy as np
from scipy import ndimage

from vlseg.errors import VlsegError
from vlseg.transforms.spatial import positive_triple

_MAX_ATTEMPTS = 24  # candidate placements per lesion before it is skipped
_PERTURBATION_TERMS = 6  # low-frequency terms of the radial boundary perturbation
_TEXTURE_CORRELATION_MM = 2.0  # Gaussian sigma (mm) of the lesion texture noise and of the local liver mean
_TEXTURE_DAMPING = 0.3  # fraction of the liver's fine texture removed where w == 1


def _fibonacci_sphere(n: int) -> np.ndarray:
    i = np.arange(n) + 0.5
    z = 1.0 - 2.0 * i / n
    phi = i * math.pi * (3.0 - math.sqrt(5.0))
    r = np.sqrt(1.0 - z * z)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


_SPHERE = _fibonacci_sphere(256)  # directions on which the radial perturbation is normalised


# --- configuration ------------------------------------------------------------------------------------------------

def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise VlsegError(f"{where}={value!r}: expected a number")
    value = float(value)
    if not math.isfinite(value):
        raise VlsegError(f"{where}={value!r}: expected a finite number")
    return value


def _integer(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
            return int(value)
        raise VlsegError(f"{where}={value!r}: expected an integer")
    return int(value)


def _pair(value: Any, where: str, integer: bool = False) -> tuple:
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__len__") or len(value) != 2:
        raise VlsegError(f"{where}={value!r}: expected a [low, high] pair")
    convert = _integer if integer else _number
    lo, hi = convert(value[0], where), convert(value[1], where)
    if lo > hi:
        raise VlsegError(f"{where}={list(value)!r}: low is greater than high")
    return lo, hi


@dataclass
class LesionConfig:
    """How synthetic lesions look.  Millimetres and HU throughout; ranges are inclusive ``(low, high)`` pairs."""

    probability: float = 0.5  # chance a crop/volume receives lesions (applied by callers)
    count: tuple[int, int] = (1, 3)  # number of lesions, inclusive range
    radius_mm: tuple[float, float] = (6.0, 20.0)  # largest semi-axis
    contrast_hu: tuple[float, float] = (-90.0, -35.0)  # lesion mean minus local liver mean; negative = hypodense
    texture_hu: float = 12.0  # std of the smooth noise texture inside the lesion
    boundary_mm: float = 2.0  # width of the soft transition band at the lesion boundary
    irregularity: float = 0.35  # 0 = ellipsoid; higher = lobulated (boundary radius scaled by 1 ± irregularity)
    elongation: tuple[float, float] = (0.7, 1.0)  # ratios of the two other semi-axes to the largest
    margin_inside: float = 0.8  # fraction of the lesion mask that must lie inside the organ (else redrawn)

    def __post_init__(self):
        where = "lesions.{}".format
        self.probability = _number(self.probability, where("probability"))
        if not 0.0 <= self.probability <= 1.0:
            raise VlsegError(f"lesions.probability={self.probability!r}: must lie in [0, 1]")
        self.count = _pair(self.count, where("count"), integer=True)
        if self.count[0] < 0 or self.count[1] < 1:
            raise VlsegError(f"lesions.count={list(self.count)!r}: need 0 <= low <= high and high >= 1")
        self.radius_mm = _pair(self.radius_mm, where("radius_mm"))
        if self.radius_mm[0] <= 0:
            raise VlsegError(f"lesions.radius_mm={list(self.radius_mm)!r}: radii must be positive")
        self.contrast_hu = _pair(self.contrast_hu, where("contrast_hu"))
        self.texture_hu = _number(self.texture_hu, where("texture_hu"))
        if self.texture_hu < 0:
            raise VlsegError(f"lesions.texture_hu={self.texture_hu!r}: must be >= 0")
        self.boundary_mm = _number(self.boundary_mm, where("boundary_mm"))
        if self.boundary_mm < 0:
            raise VlsegError(f"lesions.boundary_mm={self.boundary_mm!r}: must be >= 0")
        self.irregularity = _number(self.irregularity, where("irregularity"))
        if not 0.0 <= self.irregularity <= 0.9:
            raise VlsegError(f"lesions.irregularity={self.irregularity!r}: must lie in [0, 0.9]")
        self.elongation = _pair(self.elongation, where("elongation"))
        if not 0.0 < self.elongation[0] <= self.elongation[1] <= 1.0:
            raise VlsegError(f"lesions.elongation={list(self.elongation)!r}: need 0 < low <= high <= 1")
        self.margin_inside = _number(self.margin_inside, where("margin_inside"))
        if not 0.0 <= self.margin_inside <= 1.0:
            raise VlsegError(f"lesions.margin_inside={self.margin_inside!r}: must lie in [0, 1]")

    @classmethod
    def from_dict(cls, data: dict | None, source: str | None = None) -> "LesionConfig":
        """Build from a mapping (e.g. a YAML section); unknown keys or bad values raise a one-line ``VlsegError``
        (prefixed with ``source`` when given)."""
        try:
            if data is None:
                data = {}
            if not isinstance(data, dict):
                raise VlsegError(f"lesions: expected a mapping of settings, got {type(data).__name__}")
            known = [f.name for f in fields(cls)]
            unknown = [k for k in data if k not in known]
            if unknown:
                raise VlsegError(f"lesions.{unknown[0]}: unknown setting (known: {', '.join(known)})")
            return cls(**data)
        except VlsegError as exc:
            if source:
                raise VlsegError(f"{source}: {exc}") from None
            raise

    @property
    def smallest_volume_mm3(self) -> float:
        """Volume of the smallest ellipsoid the configuration can draw (before boundary perturbation)."""
        return 4.0 / 3.0 * math.pi * self.radius_mm[0] ** 3 * self.elongation[0] ** 2


# --- lesion shape -------------------------------------------------------------------------------------------------

class _Shape:
    """One lesion's geometry: semi-axes, orientation and the radial boundary perturbation."""

    def __init__(self, rng: np.random.Generator, cfg: LesionConfig, radius: float):
        ratios = rng.uniform(cfg.elongation[0], cfg.elongation[1], size=2)
        self.axes = radius * np.array([1.0, ratios[0], ratios[1]])
        q, r = np.linalg.qr(rng.standard_normal((3, 3)))
        q = q * np.sign(np.diag(r))
        if np.linalg.det(q) < 0:
            q[:, 0] = -q[:, 0]
        self.rotation = q  # columns: the lesion's axes in scanner millimetres
        self.irregularity = cfg.irregularity
        if self.irregularity > 0:
            d = rng.standard_normal((_PERTURBATION_TERMS, 3))
            self.directions = d / np.linalg.norm(d, axis=1, keepdims=True)
            self.freqs = rng.uniform(0.5 * math.pi, 2.5 * math.pi, size=_PERTURBATION_TERMS)
            self.phases = rng.uniform(0.0, 2.0 * math.pi, size=_PERTURBATION_TERMS)
            self.amps = rng.uniform(0.5, 1.0, size=_PERTURBATION_TERMS)
            self.offset, self.scale = 0.0, 1.0
            raw = self._raw_perturbation(_SPHERE[:, 0], _SPHERE[:, 1], _SPHERE[:, 2])
            self.offset = float(raw.mean())
            self.scale = float(np.abs(raw - self.offset).max()) or 1.0

    def _raw_perturbation(self, n0, n1, n2):
        total = 0.0
        for v, f, p, a in zip(self.directions, self.freqs, self.phases, self.amps):
            total = total + a * np.cos(f * (v[0] * n0 + v[1] * n1 + v[2] * n2) + p)
        return total

    def signed_distance(self, d0, d1, d2) -> np.ndarray:
        """Approximate signed distance (mm, negative inside) along the ray from the centre, for offsets in mm."""
        R = self.rotation
        u0 = R[0, 0] * d0 + R[1, 0] * d1 + R[2, 0] * d2
        u1 = R[0, 1] * d0 + R[1, 1] * d1 + R[2, 1] * d2
        u2 = R[0, 2] * d0 + R[1, 2] * d1 + R[2, 2] * d2
        dist = np.sqrt(u0 * u0 + u1 * u1 + u2 * u2)
        at_centre = dist < 1e-9
        safe = np.where(at_centre, 1.0, dist)
        n0 = np.where(at_centre, 1.0, u0 / safe)
        n1 = np.where(at_centre, 0.0, u1 / safe)
        n2 = np.where(at_centre, 0.0, u2 / safe)
        # Boundary radius along unit direction n of the ellipsoid: 1 / |n / axes|, then the radial perturbation.
        k = np.sqrt((n0 / self.axes[0]) ** 2 + (n1 / self.axes[1]) ** 2 + (n2 / self.axes[2]) ** 2)
        boundary = 1.0 / k
        if self.irregularity > 0:
            g = (self._raw_perturbation(n0, n1, n2) - self.offset) / self.scale
            boundary = boundary * (1.0 + self.irregularity * g)
        return dist - boundary


def _soft_profile(sd: np.ndarray, width: float) -> np.ndarray:
    """1 for sd <= -width/2, 0 for sd >= width/2, smoothstep between (0.5 on the boundary)."""
    if width <= 0:
        return (sd <= 0).astype(np.float64)
    t = np.clip(0.5 - sd / width, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


# --- synthesis ----------------------------------------------------------------------------------------------------

def _check_centre(centre, shape) -> tuple[int, int, int]:
    try:
        c = tuple(_integer(v, "centre") for v in centre)
    except TypeError:
        raise VlsegError(f"centre={centre!r}: expected three voxel indices") from None
    if len(c) != 3 or any(not 0 <= v < n for v, n in zip(c, shape)):
        raise VlsegError(f"centre={centre!r}: expected three voxel indices inside the volume of shape {shape}")
    return c


class _Placement(NamedTuple):
    """Where one lesion goes: its centre voxel, the box around it (``start`` its corner), the soft profile ``w`` and
    the organ over that box, and its label (``w >= 0.5`` inside the organ)."""

    centre: tuple
    start: list[int]
    box: tuple[slice, slice, slice]
    w: np.ndarray
    organ_box: np.ndarray
    label: np.ndarray


def _place(rng: np.random.Generator, cfg: LesionConfig, organ: np.ndarray, candidates: np.ndarray,
           footprint: np.ndarray, sp: np.ndarray, fixed) -> _Placement | None:
    """Draw a lesion inside the organ, clear of the lesions placed so far (``footprint``), in one piece; None when
    ``_MAX_ATTEMPTS`` draws find no room.  ``fixed``: the centre of the first attempts, when given."""
    r_lo, r_hi = cfg.radius_mm
    reach = 1.0 + cfg.irregularity
    for attempt in range(_MAX_ATTEMPTS):
        # Later attempts draw from a shrinking radius range so that a small or thin organ still gets a lesion.
        radius = float(rng.uniform(r_lo, r_lo + (r_hi - r_lo) * (1.0 - attempt / _MAX_ATTEMPTS)))
        c = fixed if fixed is not None else np.unravel_index(int(candidates[rng.integers(candidates.size)]),
                                                             organ.shape)
        shape = _Shape(rng, cfg, radius)
        half = np.ceil((radius * reach + 0.5 * cfg.boundary_mm) / sp).astype(int) + 1
        start = [max(int(ci) - h, 0) for ci, h in zip(c, half)]
        stop = [min(int(ci) + h + 1, n) for ci, h, n in zip(c, half, organ.shape)]
        box = tuple(slice(a, b) for a, b in zip(start, stop))
        d = [((np.arange(a, b) - int(ci)) * s).reshape([-1 if j == axis else 1 for j in range(3)])
             for axis, (a, b, ci, s) in enumerate(zip(start, stop, c, sp))]
        w = _soft_profile(shape.signed_distance(*d), cfg.boundary_mm)
        organ_box = organ[box]
        raw = w >= 0.5
        label = raw & organ_box
        if label.sum() < cfg.margin_inside * raw.sum():
            continue
        if (footprint[box] & (w > 0) & organ_box).any():
            continue
        if ndimage.label(label)[1] != 1:
            continue
        return _Placement(c, start, box, w, organ_box, label)
    return None


def _paint(out: np.ndarray, at: _Placement, sp: np.ndarray, cfg: LesionConfig, rng: np.random.Generator,
           hu_scale: float, value_range: tuple[float, float]) -> np.ndarray:
    """Give the placed lesion its contrast and texture in ``out`` (in place); returns where it changed ``out`` (its
    soft support within the box)."""
    # Soft profile cut at the organ surface and kept to the piece connected to the lesion's centre.
    local_centre = tuple(int(ci) - a for ci, a in zip(at.centre, at.start))
    soft = at.w * at.organ_box
    pieces, _ = ndimage.label(soft > 0)
    soft = np.where(pieces == pieces[local_centre], soft, 0.0)
    inside = soft > 0

    contrast = float(rng.uniform(*cfg.contrast_hu))
    sigma = np.maximum(_TEXTURE_CORRELATION_MM / sp, 0.5)
    noise = ndimage.gaussian_filter(rng.standard_normal(soft.shape), sigma, mode="nearest")
    noise = noise - noise[inside].mean()
    std = noise[inside].std()
    texture = noise / std if std > 0 else np.zeros_like(noise)

    old = out[at.box].astype(np.float64)
    weight = at.organ_box.astype(np.float64)
    num = ndimage.gaussian_filter(old * weight, sigma, mode="nearest")
    den = ndimage.gaussian_filter(weight, sigma, mode="nearest")
    local_mean = np.where(inside, num / np.maximum(den, 1e-6), old)
    delta = hu_scale * (contrast + cfg.texture_hu * texture) - _TEXTURE_DAMPING * (old - local_mean)
    new = np.clip(old + soft * delta, *value_range)
    out[at.box] = np.where(inside, new, old).astype(np.float32)
    return inside


def _lesion_count(cfg: LesionConfig, rng: np.random.Generator, count) -> int:
    if count is None:
        return int(rng.integers(cfg.count[0], cfg.count[1] + 1))
    n_lesions = _integer(count, "count")
    if n_lesions < 0:
        raise VlsegError(f"count={count!r}: must be >= 0")
    return n_lesions


def synthesize_lesions(image: np.ndarray, organ: np.ndarray, spacing, rng: np.random.Generator,
                       cfg: LesionConfig | None = None, hu_scale: float = 1.0, count: int | None = None,
                       centre: tuple[int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Insert synthetic lesions into ``image`` inside ``organ``; returns ``(new_image float32, lesion bool mask)``.

    ``image`` is ``[X, Y, Z]`` in HU (``hu_scale=1``) or linearly normalised, with ``hu_scale`` normalised units per
    HU (``2 / (hi - lo)`` for a ``[lo, hi]`` window mapped to [-1, 1]).  ``spacing`` is the voxel size in mm.
    ``count`` overrides ``cfg.count`` (fewer lesions are placed if the organ has no room); ``centre`` places the
    first lesion at that voxel when it lies inside the organ (otherwise it is drawn like the others).
    ``cfg.probability`` is not applied here.  The output is a pure function of the inputs and ``rng``'s state, and
    the random draws depend only on the organ mask, so the same ``rng`` state gives the same lesions on an HU image
    and on its normalised copy.
    An empty organ, or one smaller than ``margin_inside`` of the smallest lesion, returns the image unchanged (as
    float32) and an empty mask.
    """
    cfg = LesionConfig() if cfg is None else cfg
    image = np.asarray(image)
    if image.ndim != 3:
        raise VlsegError(f"image: expected a 3-D [X, Y, Z] array, got shape {image.shape}")
    organ = np.asarray(organ)
    if organ.shape != image.shape:
        raise VlsegError(f"organ mask shape {organ.shape} does not match image shape {image.shape}")
    organ = organ.astype(bool, copy=False)
    sp = np.asarray(positive_triple(spacing, "spacing (mm)", where="synthesize_lesions"), dtype=np.float64)
    hu_scale = _number(hu_scale, "hu_scale")
    if hu_scale <= 0:
        raise VlsegError(f"hu_scale={hu_scale!r}: must be positive (normalised units per HU)")
    n_lesions = _lesion_count(cfg, rng, count)
    fixed = _check_centre(centre, image.shape) if centre is not None else None

    out = np.array(image, dtype=np.float32, copy=True)
    lesions = np.zeros(image.shape, dtype=bool)
    if n_lesions == 0 or out.size == 0:
        return out, lesions
    candidates = np.flatnonzero(organ)
    if candidates.size == 0 or candidates.size * float(np.prod(sp)) < cfg.margin_inside * cfg.smallest_volume_mm3:
        return out, lesions
    if fixed is not None and not organ[fixed]:
        fixed = None
    value_range = (float(out.min()), float(out.max()))
    footprint = np.zeros(image.shape, dtype=bool)  # soft support of the lesions placed so far
    for index in range(n_lesions):
        at = _place(rng, cfg, organ, candidates, footprint, sp, fixed if index == 0 else None)
        if at is None:
            continue  # no room for this lesion
        inside = _paint(out, at, sp, cfg, rng, hu_scale, value_range)
        lesions[at.box] |= at.label
        footprint[at.box] |= inside
    return out, lesions


def maybe_synthesize_lesions(image: np.ndarray, organ: np.ndarray, spacing, rng: np.random.Generator,
                             cfg: LesionConfig | None = None, hu_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Training-time helper: with chance ``cfg.probability`` call ``synthesize_lesions``, otherwise return the image
    (float32 copy) and an empty mask.  Exactly one uniform draw decides, so the rng stream stays reproducible."""
    cfg = LesionConfig() if cfg is None else cfg
    if rng.random() < cfg.probability:
        return synthesize_lesions(image, organ, spacing, rng, cfg, hu_scale=hu_scale)
    return np.array(image, dtype=np.float32, copy=True), np.zeros(np.shape(image), dtype=bool)


def synthesize_case(image_hu: np.ndarray, organ: np.ndarray, spacing, seed: int,
                    cfg: LesionConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Whole-volume convenience (e.g. building the held-out evaluation scan): lesions drawn with
    ``numpy.random.default_rng(seed)`` into an HU image, ``cfg.count`` lesions, ``cfg.probability`` ignored."""
    return synthesize_lesions(image_hu, organ, spacing, np.random.default_rng(seed), cfg, hu_scale=1.0)
