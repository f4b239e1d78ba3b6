"""Intervals, three-way decisions and the resolution of a verdict from undecided parts."""
import numpy as np
import pytest
from scipy.stats import spearmanr

from curvlens.errors import CurvlensError
from curvlens.math.bootstrap import (
    NO, UNDECIDED, YES, decide, interval, possible, rank_corr_rows, resample_indices, resolve, spearman_interval,
)


def test_resample_indices_start_with_the_sample_and_are_seeded():
    idx = resample_indices(7, 50, seed=3)
    assert idx.shape == (51, 7) and idx[0].tolist() == list(range(7))
    assert idx.min() >= 0 and idx.max() <= 6
    assert np.array_equal(idx, resample_indices(7, 50, seed=3))
    assert not np.array_equal(idx, resample_indices(7, 50, seed=4))
    with pytest.raises(CurvlensError, match="at least one item"):
        resample_indices(0)


def test_interval_is_the_outward_rounded_percentile_range():
    v = np.arange(1000.0)
    lo, hi = interval(v)
    assert (lo, hi) == (24.0, 975.0)  # 2.5% and 97.5% of 0..999, rounded outwards
    assert interval([3.0, 3.0, np.nan]) == (3.0, 3.0)
    assert all(np.isnan(interval([np.nan])))
    # a "none swept" step (inf) is an ordinary value
    assert interval([1.0, np.inf] * 50, 0.5) == (1.0, np.inf)


@pytest.mark.parametrize("low, high, thr, strict, expected", [
    (0.1, 0.2, 0.0, True, YES), (-0.2, -0.1, 0.0, True, NO), (-0.1, 0.1, 0.0, True, UNDECIDED),
    (0.0, 0.5, 0.0, True, UNDECIDED), (0.0, 0.5, 0.0, False, YES), (0.7, 0.9, 0.7, False, YES),
    (0.5, 0.7, 0.7, True, NO), (np.nan, 1.0, 0.0, True, UNDECIDED),
])
def test_decide(low, high, thr, strict, expected):
    assert decide(low, high, thr, strict=strict) == expected


def test_resolve_states_a_verdict_only_when_every_resolution_agrees():
    rule = lambda vals: "holds" if all(vals) else "partly" if any(vals) else "not"  # noqa: E731
    assert resolve([possible(YES)] * 3, rule) == "holds"
    assert resolve([possible(NO)] * 3, rule) == "not"
    assert resolve([possible(YES), possible(NO), possible(UNDECIDED)], rule) == "partly"
    assert resolve([possible(YES), possible(UNDECIDED)], rule) is None
    assert resolve([possible(NO), possible(UNDECIDED)], rule) is None


def test_spearman_interval_matches_scipy_and_covers_its_value():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = x + 0.5 * rng.normal(size=40)
    r = spearman_interval(x, y, n_resamples=500)
    ref = spearmanr(x, y)
    assert r["rho"] == pytest.approx(ref.statistic) and r["p_value"] == pytest.approx(ref.pvalue)
    assert r["low"] < r["rho"] < r["high"] and r["n"] == 40 and r["p_value"] < 0.01
    # a shuffle with rho 0.035: not significant, and the interval covers 0
    z = spearman_interval(range(12), [5, 11, 0, 7, 2, 9, 4, 1, 10, 6, 3, 8], n_resamples=500)
    assert z["p_value"] > 0.5 and z["low"] < 0 < z["high"]
    # a perfectly monotone sample: every resample is monotone too
    m = spearman_interval(np.arange(10.0), np.arange(10.0) ** 3, n_resamples=300)
    assert (m["rho"], m["low"], m["high"]) == (pytest.approx(1.0), pytest.approx(1.0), pytest.approx(1.0))
    # too few or constant pairs: NaN, never a fake number
    assert np.isnan(spearman_interval([1, 2], [2, 1])["rho"])
    assert np.isnan(spearman_interval([1, 2, 3], [5, 5, 5])["rho"])


def test_rank_corr_rows_is_spearman_per_row():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(5, 9)), rng.normal(size=(5, 9))
    y[0] = x[0]
    x[1, :3] = x[1, 0]  # ties get average ranks
    got = rank_corr_rows(x, y)
    assert got[0] == pytest.approx(1.0)
    for i in range(5):
        assert got[i] == pytest.approx(spearmanr(x[i], y[i]).statistic)
