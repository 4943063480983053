"""How sure an evaluation figure is: a clustered, two-level bootstrap over evaluation rows.

The rows of one case (its classes, each asked by name and by paraphrases) share a scan, a patient and a model's view
of both, so they are not independent draws: resampling rows as if they were would give intervals far too narrow.  Each
resample here first draws the cases (the clusters) with replacement, as many as there are, and then, within each drawn
case, draws that case's rows with replacement, as many as it has.  The statistic is computed on every resample and
the interval is the 2.5th to 97.5th percentile of those values (a percentile interval, 95% by default); the point
estimate is the statistic of the rows as they are.  The seed is fixed, so the same rows always give the same interval.

What a figure cannot say is said beside it: with one case there is no between-patient variation to resample, so the
interval covers the prompts only (``note``); with one row there is no interval at all.

Statistics built here (:func:`mean`, :func:`rate`, :func:`median`, :func:`ratio`, :func:`mean_of_means`) are
computed for all resamples at once from each resample's row counts (numpy, no Python loop over resamples); any other
``statistic(rows) -> float`` works too, called once per resample.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
RESAMPLES = 1000
SEED = 0
METHOD = ("two-level bootstrap: cases drawn with replacement, then each drawn case's rows (prompts) with "
          "replacement; percentile interval")
ONE_CASE = "one case: the interval covers prompts only, not patients"
ONE_ROW = "one row: no interval"
NO_ROWS = "no rows"


@dataclass(frozen=True)
class Statistic:
    """A statistic of rows that is computed for many resamples at once: ``value`` gives a row's number (or numbers;
    None or NaN leaves the row out), ``reduce`` turns the values (rows × numbers) and each resample's row counts
    (resamples × rows) into one value per resample."""

    value: Callable[[dict], object]
    reduce: Callable[[np.ndarray, np.ndarray], np.ndarray]

    def __call__(self, rows: Sequence[dict]) -> float:
        """The statistic of ``rows`` as they are."""
        values, _ = _values(self, rows)
        return _float(self.reduce(values, np.ones((1, len(values))))[0]) if len(values) else None


def _getter(column: str | Callable[[dict], object]) -> Callable[[dict], object]:
    return column if callable(column) else (lambda row: row.get(column))


def _weighted_mean(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return (counts @ values[:, 0]) / counts.sum(1)


def _weighted_median(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """np.median of each resample's rows, read from the rows sorted once and their cumulative counts."""
    order = np.argsort(values[:, 0], kind="stable")
    ranked, cumulative = values[order, 0], np.cumsum(counts[:, order], axis=1)
    total = cumulative[:, -1]
    low = (cumulative > ((total - 1) // 2)[:, None]).argmax(1)
    high = (cumulative > (total // 2)[:, None]).argmax(1)
    return np.where(total > 0, (ranked[low] + ranked[high]) / 2, np.nan)


def _ratio(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = (counts @ values[:, 0]) / (counts @ values[:, 1])
    return np.where(np.isfinite(ratio), ratio, np.nan)


def _mean_of_means(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    codes = values[:, 1]
    means = np.stack([_weighted_mean(values[codes == c], counts[:, codes == c]) for c in np.unique(codes)])
    with warnings.catch_warnings():  # a resample that drew no row at all: NaN, left out of the interval
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(means, axis=0)


def mean(column: str | Callable[[dict], object]) -> Statistic:
    """The mean of a column (or of ``column(row)``) over the rows that have it."""
    return Statistic(_getter(column), _weighted_mean)


def rate(test: Callable[[dict], bool]) -> Statistic:
    """The share of rows for which ``test(row)`` is true."""
    return Statistic(lambda row: float(bool(test(row))), _weighted_mean)


def median(column: str | Callable[[dict], object]) -> Statistic:
    """The median of a column (or of ``column(row)``) over the rows that have it."""
    return Statistic(_getter(column), _weighted_median)


def ratio(numerator: str | Callable[[dict], object], denominator: str | Callable[[dict], object]) -> Statistic:
    """The mean of one column over the mean of another, over the rows that have both (undefined where the
    denominator's mean is 0)."""
    top, bottom = _getter(numerator), _getter(denominator)
    return Statistic(lambda row: (top(row), bottom(row)), _ratio)


def mean_of_means(column: str | Callable[[dict], object], group: Callable[[dict], float]) -> Statistic:
    """The mean over groups (``group(row)``, a number per group) of each group's mean: every group weighs the same
    however many rows it has (e.g. classes with more paraphrases than others)."""
    value = _getter(column)
    return Statistic(lambda row: (value(row), group(row)), _mean_of_means)


def _float(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def _values(statistic: Statistic, rows: Sequence[dict]) -> tuple[np.ndarray, list[int]]:
    """The statistic's numbers of the rows that have them (rows × numbers), and which rows those are."""
    kept, values = [], []
    for i, row in enumerate(rows):
        v = statistic.value(row)
        v = v if isinstance(v, tuple) else (v,)
        if any(x is None for x in v):
            continue
        v = tuple(float(x) for x in v)
        if all(math.isfinite(x) for x in v):
            kept.append(i)
            values.append(v)
    return (np.asarray(values, float) if values else np.zeros((0, 1))), kept


def _cluster_codes(rows: Sequence[dict], cluster) -> np.ndarray:
    """An integer per row naming its cluster: a key (or keys, or a function) of the row; None: every row its own."""
    if cluster is None:
        return np.arange(len(rows))
    if callable(cluster):
        key = cluster
    else:
        keys = (cluster,) if isinstance(cluster, str) else tuple(cluster)

        def key(row: dict) -> tuple:
            return tuple(row[k] for k in keys)
    codes: dict = {}
    return np.array([codes.setdefault(key(row), len(codes)) for row in rows], dtype=np.int64)


def resample_counts(clusters: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """How often each row is drawn in each resample (resamples × rows): the clusters with replacement, then within
    each drawn cluster its rows with replacement, as many as it has (see the module docstring)."""
    rng = np.random.default_rng(seed)
    n = len(clusters)
    order = np.argsort(clusters, kind="stable")  # the rows of each cluster side by side
    sizes = np.bincount(clusters)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    drawn = rng.integers(0, len(sizes), size=(resamples, len(sizes)))  # the clusters of each resample
    lengths = sizes[drawn].ravel()  # the rows each drawn cluster brings
    size = np.repeat(lengths, lengths)
    picked = order[np.repeat(starts[drawn].ravel(), lengths) + rng.integers(0, size)]
    replicate = np.repeat(np.arange(resamples), sizes[drawn].sum(1))
    return np.bincount(replicate * n + picked, minlength=resamples * n).reshape(resamples, n).astype(float)


def _each_resample(statistic: Callable[[list[dict]], float], rows: Sequence[dict], counts: np.ndarray) -> np.ndarray:
    """Any other statistic: called once per resample on the rows it drew (NaN where it gives None)."""
    index, out = np.arange(len(rows)), []
    for drawn in counts.astype(int):
        v = statistic([rows[i] for i in np.repeat(index, drawn)])
        out.append(np.nan if v is None else float(v))
    return np.array(out)


def bootstrap(rows: Sequence[dict], statistic: Statistic | Callable[[list[dict]], float], *,
              cluster: str | Sequence[str] | Callable | None = "case_id", resamples: int = RESAMPLES,
              seed: int = SEED, level: float = LEVEL) -> dict:
    """The statistic of ``rows`` with its bootstrap interval, resampling clusters (``cluster``: a row key, several, a
    function of the row; default the case) and the rows within each (see the module docstring).

    Returns ``estimate``, ``interval`` ([lo, hi], or None with one row or none), ``cases`` (clusters) and ``rows``
    (those the statistic used), and ``note`` when the interval covers less than it seems to (one case) or is absent."""
    if isinstance(statistic, Statistic):
        values, kept = _values(statistic, rows)
        rows = [rows[i] for i in kept]
    else:
        values = None
    clusters = _cluster_codes(rows, cluster)
    found = {"estimate": None, "interval": None, "cases": int(len(set(clusters.tolist()))), "rows": len(rows)}
    if not rows:
        return {**found, "note": NO_ROWS}
    found["estimate"] = statistic(rows)
    if len(rows) == 1:
        return {**found, "note": ONE_ROW}
    counts = resample_counts(clusters, resamples, seed)
    if values is not None:
        replicates = statistic.reduce(values, counts)
    else:
        replicates = _each_resample(statistic, rows, counts)
    replicates = replicates[np.isfinite(replicates)]
    if len(replicates):
        tail = 100 * (1 - level) / 2
        found["interval"] = [float(v) for v in np.percentile(replicates, [tail, 100 - tail])]
    if found["cases"] == 1:
        found["note"] = ONE_CASE
    return found


def format_estimate(found: dict | None, fmt: str = ".3f", percent: bool = False) -> str:
    """A bootstrap result as ``0.823 [0.71, 0.90]`` (``percent``: ``82% [71%, 90%]``); "–" without an estimate."""
    if not found or found.get("estimate") is None:
        return "–"

    def show(v: float, f: str) -> str:
        return f"{100 * v:.0f}%" if percent else f"{v:{f}}"

    interval = found.get("interval")
    text = show(found["estimate"], fmt)
    return f"{text} [{show(interval[0], '.2f')}, {show(interval[1], '.2f')}]" if interval else text
