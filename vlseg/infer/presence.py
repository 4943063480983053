"""Presence rules: is the structure a prompt names in the scan at all?

Each rule reads one target's features (``Target``: the presence head's probability, the unvetoed mask's volume, the
mean model probability and the mean intensity inside that mask) and answers ``score(target)``, higher meaning
"present", and ``present(target)``: ``score >= threshold``.  One interface, so every rule is scored the same way
(``auroc``; its interval by ``vlseg.evaluate.uncertainty.bootstrap`` with the case as the cluster):

* ``PresenceHead``: the head's probability against one threshold (the config's, as shipped).
* ``CalibratedPresence``: Platt scaling of the head's logit (``a·logit(p) + b``, fitted with both kinds weighted
  equally) whose 0.5 point is the global threshold, plus a threshold per class (best balanced accuracy) for classes
  with at least ``MIN_PER_KIND`` present and as many absent targets; its score is the logit margin over the class's
  threshold.
* ``VolumeRule``: absent when the unvetoed mask is under a volume fitted by balanced accuracy.
* ``StatisticalTest``: per (modality, class), Gaussians fitted to the present targets' mean mask probability and mean
  intensity (CT: Hounsfield units; MR: the model's z-score units, raw MR values having no common scale); a target's
  score is the Fisher combination of a lower-tail p-value for its probability and a two-sided one for its intensity,
  and it is called absent below ``alpha``.  A target without a mask on the image's grid scores 0.

Fitted rules are plain dicts (``to_json``/``from_json``) so they travel in ``calibration.json``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from vlseg.errors import VlsegError

MIN_PER_KIND = 3  # present and absent targets a class needs for a threshold of its own
MIN_FOR_STATISTICS = 3  # present targets (with a mask) a (modality, class) needs for distributions of its own
PROBABILITY_SD_FLOOR = 0.05  # so three near-identical fit targets do not make every other value improbable
INTENSITY_SD_FLOOR = {"CT": 20.0, "MR": 0.25}  # HU; z-score units
EPS = 1e-6


@dataclass
class Target:
    """One question "is class X in this image?" with its answer and what the model said."""

    case_id: str  # the scan it comes from (crops of one scan share it: bootstrap groups)
    class_name: str
    modality: str
    present: bool
    presence_probability: float
    volume_ml: float  # of the mask before any presence veto
    mean_probability: float | None  # mean model probability inside that mask; None without one
    mean_intensity: float | None  # inside that mask: HU for CT, the model's z-score units for MR
    source: str = "scan"  # "scan" or "crop"

    @property
    def has_mask(self) -> bool:
        """Whether the unvetoed mask has a voxel on the image's grid (and so a mean probability and intensity)."""
        return self.volume_ml > 0 and self.mean_probability is not None and self.mean_intensity is not None

    def as_dict(self) -> dict:
        return asdict(self)


def mask_intensity(scan, mask, modality: str) -> float | None:
    """Mean intensity inside a ``BoxMask`` of ``scan``: CT in HU, MR after the model's normalisation."""
    from vlseg.transforms.intensity import normalize_intensity

    if not mask.any():
        return None
    data = scan.data if modality == "CT" else normalize_intensity(scan.data, modality)
    return float(data[mask.slices][mask.crop.astype(bool)].mean())


def targets_from_result(result, truth: dict[str, bool], case_id: str, modality: str, source: str) -> list[Target]:
    """The targets of one unvetoed segmentation (``presence_threshold=0``), its prompts being class names in
    ``truth``."""
    from vlseg.io.scan import canonical_modality

    modality = canonical_modality(modality)
    return [Target(case_id, r.prompt, modality, bool(truth[r.prompt]), float(r.presence_probability),
                   float(r.volume_ml), r.mean_probability, mask_intensity(result.scan, r.mask, modality), source)
            for r in result.results]


# ------------------------------------------------------------------------------------------------------- separation


def best_threshold(values, present, bounds: tuple[float, float] | None = (0.0, 1.0)) -> tuple[float, float]:
    """``(threshold, balanced accuracy)``: the threshold midway between the two neighbouring values where balanced
    accuracy (mean of the share of present targets kept and of absent targets vetoed) peaks, the lowest on ties;
    clipped to ``bounds`` (probabilities) unless None (volumes)."""
    p = np.asarray(values, dtype=np.float64)
    y = np.asarray(present, dtype=bool)
    if y.all() or not y.any():
        raise VlsegError("calibration needs both present and absent targets "
                         f"({int(y.sum())} present, {int((~y).sum())} absent)")
    v = np.unique(p)
    candidates = np.concatenate([[v[0] - 1e-6], (v[:-1] + v[1:]) / 2, [v[-1] + 1e-6]])
    best = (0.5, -1.0)
    for t in candidates:
        score = balanced_accuracy(p >= t, y)
        if score > best[1] + 1e-12:
            best = (float(t if bounds is None else np.clip(t, *bounds)), float(score))
    return best


def balanced_accuracy(says_present, present) -> float:
    kept, y = np.asarray(says_present, bool), np.asarray(present, bool)
    return float(0.5 * (kept[y].mean() + (~kept[~y]).mean()))


def logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def fit_platt(scores, present, l2: float = 1e-3) -> tuple[float, float]:
    """``(a, b)`` of ``P(present) = sigmoid(a·score + b)`` by logistic regression, present and absent targets weighted
    equally; a small ridge keeps it finite when the two are perfectly separated."""
    from scipy.optimize import minimize

    x, y = np.asarray(scores, np.float64), np.asarray(present, bool).astype(np.float64)
    if y.all() or not y.any():
        raise VlsegError("Platt scaling needs both present and absent targets")
    w = np.where(y > 0, 0.5 / y.mean(), 0.5 / (1 - y.mean())) / len(y)

    def loss(theta):
        z = theta[0] * x + theta[1]
        residual = w * (1.0 / (1.0 + np.exp(-z)) - y)
        value = np.sum(w * (np.logaddexp(0.0, z) - y * z)) + 0.5 * l2 * theta @ theta
        return value, np.array([residual @ x, residual.sum()]) + l2 * theta

    res = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
    return float(res.x[0]), float(res.x[1])


def auroc(scores, present) -> float:
    """Area under the ROC curve: the chance that a present target outscores an absent one, ties counting half."""
    s, y = np.asarray(scores, np.float64), np.asarray(present, bool)
    pos, neg = s[y], s[~y]
    if not pos.size or not neg.size:
        return float("nan")
    order = np.sort(neg)
    below = np.searchsorted(order, pos, side="left")
    ties = np.searchsorted(order, pos, side="right") - below
    return float((below + 0.5 * ties).sum() / (pos.size * neg.size))


# ------------------------------------------------------------------------------------------------------------ rules


class Rule:
    """A presence rule: ``score`` (higher: present) and the ``threshold`` it calls a target present at."""

    name = "rule"
    threshold = 0.0

    def score(self, target: Target) -> float:
        raise NotImplementedError

    def present(self, target: Target) -> bool:
        return self.score(target) >= self.threshold

    def to_json(self) -> dict:
        raise NotImplementedError


class FeatureThreshold(Rule):
    """A rule that is one feature of the target against one threshold; ``key`` names the threshold in its JSON."""

    feature: str
    key: str = "threshold"

    def __init__(self, threshold: float):
        self.threshold = float(threshold)

    def score(self, target: Target) -> float:
        return getattr(target, self.feature)

    def to_json(self) -> dict:
        return {self.key: self.threshold}


class PresenceHead(FeatureThreshold):
    name = "presence head"
    feature = "presence_probability"


class CalibratedPresence(Rule):
    """Platt-scaled head with per-class thresholds (raw-probability units, global where a class has few targets)."""

    name = "presence head, calibrated"

    def __init__(self, a: float, b: float, global_threshold: float, class_thresholds: dict[str, float]):
        self.a, self.b, self.global_threshold = float(a), float(b), float(global_threshold)
        self.class_thresholds = {k: float(v) for k, v in class_thresholds.items()}

    def threshold_for(self, class_name: str) -> float:
        return self.class_thresholds.get(class_name, self.global_threshold)

    def probability(self, presence_probability: float) -> float:
        """The calibrated probability of presence."""
        return float(1.0 / (1.0 + np.exp(-(self.a * logit(presence_probability) + self.b))))

    def score(self, target: Target) -> float:
        return float(logit(target.presence_probability) - logit(self.threshold_for(target.class_name)))

    @classmethod
    def fit(cls, targets: list[Target], min_per_kind: int = MIN_PER_KIND) -> "CalibratedPresence":
        p = np.array([t.presence_probability for t in targets])
        y = np.array([t.present for t in targets])
        a, b = fit_platt(logit(p), y)
        # The raw probability where the calibrated one is 0.5; a fit without a positive slope says nothing: fall back
        t = float(1.0 / (1.0 + math.exp(b / a))) if a > 1e-6 else best_threshold(p, y)[0]
        per_class = {}
        for name in sorted({t.class_name for t in targets}):
            mine = np.array([x.class_name == name for x in targets])
            if y[mine].sum() >= min_per_kind and (~y[mine]).sum() >= min_per_kind:
                per_class[name] = best_threshold(p[mine], y[mine])[0]
        return cls(a, b, t, per_class)

    def to_json(self) -> dict:
        return {"temperature": {"a": self.a, "b": self.b}, "presence_threshold": self.global_threshold,
                "class_thresholds": self.class_thresholds}

    @classmethod
    def from_json(cls, data: dict) -> "CalibratedPresence":
        return cls(data["temperature"]["a"], data["temperature"]["b"], data["presence_threshold"],
                   data.get("class_thresholds", {}))


class VolumeRule(FeatureThreshold):
    name = "predicted-volume rule"
    feature, key = "volume_ml", "min_volume_ml"

    @classmethod
    def fit(cls, targets: list[Target]) -> "VolumeRule":
        volume, _ = best_threshold([t.volume_ml for t in targets], [t.present for t in targets], bounds=None)
        return cls(max(volume, 0.0))


def _gaussian(values, floor: float) -> list[float]:
    values = np.asarray(values, np.float64)
    return [float(values.mean()), float(max(values.std(ddof=1) if values.size > 1 else 0.0, floor))]


class StatisticalTest(Rule):
    """Absent when the mask's features are improbable for a present target of its class (see the module docstring).

    ``stats`` maps ``"MODALITY/class"`` to ``{"n", "probability": [mean, sd], "intensity": [mean, sd]}``; where a
    (modality, class) had fewer than ``MIN_FOR_STATISTICS`` present fit targets, the class's probability over every
    modality (``"*/class"``), else over every class (``"*/*"``), is used, without the intensity test."""

    name = "statistical test"

    def __init__(self, stats: dict[str, dict], alpha: float = 0.05):
        self.stats, self.threshold = stats, float(alpha)

    def _entry(self, target: Target) -> dict:
        for key in (f"{target.modality}/{target.class_name}", f"*/{target.class_name}", "*/*"):
            if key in self.stats:
                return self.stats[key]
        raise VlsegError(f"the statistical presence test has no statistics for {target.class_name!r}")

    def p_values(self, target: Target) -> list[float]:
        """Lower-tail p-value of the mean mask probability; two-sided one of the mean intensity (where fitted)."""
        from scipy.stats import norm

        entry = self._entry(target)
        mean, sd = entry["probability"]
        out = [float(norm.cdf((target.mean_probability - mean) / sd))]
        if entry.get("intensity"):
            mean, sd = entry["intensity"]
            out.append(float(2.0 * norm.sf(abs(target.mean_intensity - mean) / sd)))
        return out

    def score(self, target: Target) -> float:
        """Fisher's combination of the p-values (0 for a target without a mask)."""
        from scipy.stats import chi2

        if not target.has_mask:
            return 0.0
        p = np.maximum(self.p_values(target), 1e-300)
        return float(chi2.sf(-2.0 * np.log(p).sum(), 2 * len(p)))

    @classmethod
    def fit(cls, targets: list[Target], alpha: float = 0.05, minimum: int = MIN_FOR_STATISTICS) -> "StatisticalTest":
        fit = [t for t in targets if t.present and t.has_mask]
        if not fit:
            raise VlsegError("the statistical presence test needs present targets with a mask to fit on")
        stats = {"*/*": {"n": len(fit), "probability": _gaussian([t.mean_probability for t in fit],
                                                                 PROBABILITY_SD_FLOOR)}}
        for name in sorted({t.class_name for t in fit}):
            mine = [t for t in fit if t.class_name == name]
            if len(mine) >= minimum:
                stats[f"*/{name}"] = {"n": len(mine), "probability": _gaussian([t.mean_probability for t in mine],
                                                                               PROBABILITY_SD_FLOOR)}
            for modality in sorted({t.modality for t in mine}):
                group = [t for t in mine if t.modality == modality]
                if len(group) >= minimum:
                    stats[f"{modality}/{name}"] = {
                        "n": len(group), "probability": _gaussian([t.mean_probability for t in group],
                                                                  PROBABILITY_SD_FLOOR),
                        "intensity": _gaussian([t.mean_intensity for t in group], INTENSITY_SD_FLOOR[modality])}
        return cls(stats, alpha)

    def to_json(self) -> dict:
        return {"alpha": self.threshold, "stats": self.stats}

    @classmethod
    def from_json(cls, data: dict) -> "StatisticalTest":
        return cls(data["stats"], data["alpha"])
