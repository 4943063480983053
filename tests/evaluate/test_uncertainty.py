"""The clustered bootstrap: intervals hold their estimate, narrow with more cases, respect cases as clusters, say
when they rest on one case, and come out the same every time."""

from __future__ import annotations

import time

import numpy as np
import pytest

from vlseg.evaluate.uncertainty import (
    NO_ROWS,
    ONE_CASE,
    ONE_ROW,
    bootstrap,
    format_estimate,
    mean,
    mean_of_means,
    median,
    rate,
    ratio,
    resample_counts,
)


def _rows(cases: int, prompts: int, seed: int = 0) -> list[dict]:
    """Dice-like rows: each case has its own level (patients differ), its prompts scatter around it."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(cases):
        level = rng.uniform(0.3, 0.9)
        rows += [{"case_id": f"case{c}", "class": f"c{k % 3}", "other": float(rng.uniform(0.5, 1.0)),
                  "dice": float(np.clip(level + rng.normal(0, 0.05), 0, 1))} for k in range(prompts)]
    return rows


def _width(found: dict) -> float:
    return found["interval"][1] - found["interval"][0]


def test_the_interval_holds_the_estimate_and_narrows_with_more_cases():
    few, many = bootstrap(_rows(5, 8), mean("dice")), bootstrap(_rows(200, 8), mean("dice"))
    for found in (few, many):
        assert found["interval"][0] <= found["estimate"] <= found["interval"][1]
        assert "note" not in found
    assert (few["cases"], few["rows"], many["cases"], many["rows"]) == (5, 40, 200, 1600)
    assert _width(many) < _width(few) / 2  # about √40 times narrower


def test_cases_are_the_clusters_not_the_rows():
    """Six cases whose prompts all score the same: the only uncertainty is which patients were drawn.  Resampling rows
    as independent would make it look 4-5 times smaller than it is."""
    levels = [0.1, 0.3, 0.5, 0.6, 0.8, 0.9]
    rows = [{"case_id": c, "dice": v} for c, v in enumerate(levels) for _ in range(20)]
    clustered, as_rows = bootstrap(rows, mean("dice")), bootstrap(rows, mean("dice"), cluster=None)
    assert _width(clustered) > 3 * _width(as_rows)
    # with identical prompts the two-level draw is exactly a draw of the six case levels
    per_case = bootstrap([{"case_id": c, "dice": v} for c, v in enumerate(levels)], mean("dice"))
    assert clustered["interval"] == pytest.approx(per_case["interval"])


def test_resample_counts_keep_each_drawn_case_whole():
    clusters = np.array([0, 0, 0, 1, 2, 2])
    counts = resample_counts(clusters, resamples=200, seed=3)
    assert counts.shape == (200, 6)
    # each draw of a case brings as many rows as it has, so a resample holds a multiple of its size per case
    per_case = np.stack([counts[:, clusters == k].sum(1) for k in range(3)], axis=1)
    assert (per_case % np.array([3, 1, 2]) == 0).all() and (counts.sum(1) >= 3).all()
    assert (per_case / np.array([3, 1, 2])).sum(1) == pytest.approx(np.full(200, 3))  # three cases drawn each time


def test_one_case_one_row_and_none_say_so():
    one_case = bootstrap(_rows(1, 12), mean("dice"))
    assert one_case["note"] == ONE_CASE and one_case["cases"] == 1
    assert one_case["interval"][0] <= one_case["estimate"] <= one_case["interval"][1]  # prompts still vary
    one_row = bootstrap(_rows(1, 1), mean("dice"))
    assert one_row["interval"] is None and one_row["note"] == ONE_ROW and one_row["estimate"] is not None
    nothing = bootstrap([], mean("dice"))
    assert nothing == {"estimate": None, "interval": None, "cases": 0, "rows": 0, "note": NO_ROWS}
    # rows without the value are left out, and so are cases left without rows
    rows = _rows(3, 4) + [{"case_id": "empty", "dice": None}, {"case_id": "nan", "dice": float("nan")}]
    assert bootstrap(rows, mean("dice"))["cases"] == 3


def test_the_same_rows_give_the_same_interval():
    rows = _rows(12, 6)
    assert bootstrap(rows, mean("dice")) == bootstrap(rows, mean("dice"))
    assert bootstrap(rows, mean("dice"), seed=1)["interval"] != bootstrap(rows, mean("dice"))["interval"]


def test_statistics_match_numpy_and_any_function_of_rows():
    rows = _rows(9, 7, seed=2)
    dice, other = np.array([r["dice"] for r in rows]), np.array([r["other"] for r in rows])
    assert mean("dice")(rows) == pytest.approx(dice.mean())
    assert median("dice")(rows) == pytest.approx(np.median(dice))
    assert rate(lambda r: r["dice"] > 0.5)(rows) == pytest.approx((dice > 0.5).mean())
    assert ratio("dice", "other")(rows) == pytest.approx(dice.mean() / other.mean())
    by_class = [dice[[r["class"] == c for r in rows]].mean() for c in ("c0", "c1", "c2")]
    assert mean_of_means("dice", lambda r: float(r["class"][1]))(rows) == pytest.approx(np.mean(by_class))
    # the vectorised statistics resample exactly as a plain function of the drawn rows would
    for vectorised, plain in [(mean("dice"), lambda rs: np.mean([r["dice"] for r in rs])),
                              (median("dice"), lambda rs: np.median([r["dice"] for r in rs]))]:
        assert bootstrap(rows, vectorised)["interval"] == pytest.approx(bootstrap(rows, plain)["interval"])


def test_a_thousand_resamples_of_thousands_of_rows_are_quick():
    rows = _rows(60, 50)  # 3,000 rows
    started = time.perf_counter()
    found = bootstrap(rows, median("dice"))
    assert time.perf_counter() - started < 2.0  # about 0.2 s on a busy 2-core machine
    assert found["rows"] == 3000 and found["interval"][0] < found["estimate"] < found["interval"][1]


def test_format_estimate():
    assert format_estimate({"estimate": 0.8234, "interval": [0.7071, 0.9012]}) == "0.823 [0.71, 0.90]"
    assert format_estimate({"estimate": 0.25, "interval": [0.1, 0.55]}, percent=True) == "25% [10%, 55%]"
    assert format_estimate({"estimate": 0.5, "interval": None}) == "0.500"
    assert format_estimate(None) == format_estimate({"estimate": None}) == "–"
