"""spearman_test: permutation p-values and bootstrap intervals with known answers."""
import numpy as np
import pandas as pd
import pytest

from curvlens.errors import CurvlensError
from curvlens.math.rank_stats import rank_corr, spearman_test


def test_rank_corr_equals_pandas_spearman_with_ties():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 5, 40).astype(float)
    y = x + rng.normal(0, 2, 40)
    assert rank_corr(x, y) == pytest.approx(pd.Series(x).corr(pd.Series(y), method="spearman"), abs=1e-12)


def test_a_perfect_and_an_absent_link():
    r = spearman_test(np.arange(21), np.arange(21) ** 3, n_perm=2000, n_boot=500)
    assert r["rho"] == 1.0 and r["p"] < 0.001 and r["low"] == pytest.approx(1.0) and r["n"] == 21
    rng = np.random.default_rng(0)
    null = spearman_test(rng.normal(size=21), rng.normal(size=21), n_perm=2000, n_boot=500)
    assert null["p"] > 0.05 and null["low"] < 0 < null["high"]


def test_p_value_matches_the_exact_permutation_distribution_for_five_items():
    # n = 5, rho = 0.9: 5! = 120 orderings, |rho| >= 0.9 for 10 of them (rho = +-1: 2, +-0.9: 8)
    r = spearman_test([1, 2, 3, 4, 5], [1, 3, 2, 4, 5], n_perm=40000, n_boot=10)
    assert r["rho"] == pytest.approx(0.9) and r["p"] == pytest.approx(10 / 120, abs=0.006)


def test_the_p_value_is_calibrated_under_the_null():
    rng = np.random.default_rng(3)
    ps = [spearman_test(rng.normal(size=12), rng.normal(size=12), n_perm=300, n_boot=2, seed=k)["p"]
          for k in range(200)]
    assert 0.02 < np.mean(np.array(ps) < 0.1) < 0.2   # about 10% below 0.1


def test_degenerate_inputs():
    assert np.isnan(spearman_test([1, 2], [2, 1])["rho"])
    assert np.isnan(spearman_test([1, 1, 1, 1], [1, 2, 3, 4])["rho"])
    assert spearman_test([1, np.nan, 3, 4, 5], [1, 2, np.nan, 4, 5])["n"] == 3
    with pytest.raises(CurvlensError, match="5 items"):
        rank_corr([1, 2, 3, 4, 5], [1, 2])
