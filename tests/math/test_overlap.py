import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlens.errors import CurvlensError
from curvlens.math.overlap import log10_stats
from tests.math.oracles import moment_pair_metrics


def _moments(n, seed, decades=12):
    """Positive moments spread log-uniformly over ``decades`` decades."""
    g = torch.Generator().manual_seed(seed)
    return 10.0 ** (-decades * torch.rand(n, generator=g, dtype=torch.float64)).float()


def test_identical_experts_agree_perfectly():
    v = _moments(1000, 0).reshape(10, 100)
    v[0, :7] = 0.0  # zeros (ties) must not break the identity
    r = moment_pair_metrics(v, v.clone())
    assert r["cosine"] == 1.0
    assert r["pearson_log"] == 1.0
    assert r["spearman_log"] == 1.0
    assert r["jaccard_top1"] == 1.0
    assert r["jaccard_top10"] == 1.0
    assert r["numel"] == 1000


def test_reversed_order_is_perfectly_anti_ranked():
    v = torch.tensor([1e-9, 1e-7, 1e-5, 1e-3])
    r = moment_pair_metrics(v, v.flip(0), top_fracs=(0.25,))
    assert r["spearman_log"] == pytest.approx(-1.0, abs=1e-12)
    assert r["pearson_log"] == pytest.approx(-1.0, abs=1e-9)
    assert r["jaccard_top25"] == 0.0


def test_matches_numpy_and_pandas_references_with_ties():
    a = _moments(5000, 1)
    b = a * _moments(5000, 2, decades=2)
    # Snap both to a grid of 0.1 decade: ~120 distinct values, so many exact ties.
    a = 10.0 ** torch.round(torch.log10(a.double()), decimals=1)
    b = (10.0 ** torch.round(torch.log10(b.double()), decimals=1)).float()
    a = a.float()
    a[:300] = 0.0
    r = moment_pair_metrics(a, b)
    an, bn = a.double().numpy(), b.double().numpy()
    assert r["cosine"] == pytest.approx(an @ bn / np.linalg.norm(an) / np.linalg.norm(bn), rel=1e-12)
    la, lb = np.log10(an + 1e-30), np.log10(bn + 1e-30)
    assert r["pearson_log"] == pytest.approx(np.corrcoef(la, lb)[0, 1], rel=1e-9)
    # Reference Spearman: Pearson of pandas' average ranks.
    ref = np.corrcoef(pd.Series(an).rank(method="average"), pd.Series(bn).rank(method="average"))[0, 1]
    assert r["spearman_log"] == pytest.approx(ref, rel=1e-9)


def test_jaccard_of_known_top_sets():
    a = torch.arange(1, 101, dtype=torch.float32)  # top 10: indices 90..99
    b = a.clone()
    b[90:95] = 0.0  # b's top 10 are 85..89 and 95..99: 5 shared with a's
    r = moment_pair_metrics(a, b, top_fracs=(0.1, 0.01, 0.07))
    assert r["jaccard_top10"] == pytest.approx(5 / 15)
    assert r["jaccard_top1"] == 1.0  # both tops are index 99
    assert "jaccard_top7" in r  # k = 7 (not 8, despite 0.07 * 100 = 7.000000000000001)
    assert r["jaccard_top7"] == pytest.approx(5 / 9)  # a: 93..99, b: 88, 89, 95..99


def test_constant_and_zero_tensors_give_nan_correlations():
    c = torch.full((50,), 1e-6)
    v = _moments(50, 3)
    r = moment_pair_metrics(c, v)
    assert math.isnan(r["pearson_log"]) and math.isnan(r["spearman_log"])
    assert not math.isnan(r["cosine"])
    r = moment_pair_metrics(torch.zeros(50), v)
    assert math.isnan(r["cosine"])


def test_device_dtype_and_numpy_inputs():
    v = _moments(300, 4)
    w = _moments(300, 5)
    r32 = moment_pair_metrics(v, w)
    r64 = moment_pair_metrics(v.double().numpy(), w.double().numpy())
    assert r64["spearman_log"] == pytest.approx(r32["spearman_log"], rel=1e-12)
    rbf = moment_pair_metrics(v.bfloat16(), v.bfloat16())
    assert rbf["spearman_log"] == 1.0


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([1.0, float("nan"), 1.0]), "NaN"),
    (torch.tensor([1.0, -1.0, 1.0]), "negative"),
])
def test_bad_moments_raise(bad, match):
    with pytest.raises(CurvlensError, match=match):
        moment_pair_metrics(bad, torch.ones(3))
    with pytest.raises(CurvlensError, match=match):
        log10_stats(bad)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(CurvlensError, match=r"v_a \(4, 3\).*v_b \(3, 4\)"):
        moment_pair_metrics(torch.ones(4, 3), torch.ones(3, 4))


def test_bad_parameters_raise():
    with pytest.raises(CurvlensError, match="top_fracs"):
        moment_pair_metrics(torch.ones(3), torch.ones(3), top_fracs=(0.0,))
    with pytest.raises(CurvlensError, match="empty"):
        moment_pair_metrics(torch.ones(0), torch.ones(0))
    with pytest.raises(CurvlensError, match="quantiles"):
        log10_stats(torch.ones(3), quantiles=(1.5,))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0, 1e3, width=32), min_size=2, max_size=40), st.integers(0, 2**31 - 1))
def test_spearman_is_symmetric_bounded_and_monotone_invariant(vals, seed):
    a = torch.tensor(vals, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    b = a[torch.randperm(a.numel(), generator=g)]
    r = moment_pair_metrics(a, b)
    s = r["spearman_log"]
    if math.isnan(s):  # constant where either is positive (zeros in both are left out)
        keep = (a > 0) | (b > 0)
        sa, sb = a[keep], b[keep]
        assert sa.numel() == 0 or bool((sa == sa[0]).all()) or bool((sb == sb[0]).all())
        return
    assert -1.0 <= s <= 1.0
    assert moment_pair_metrics(b, a)["spearman_log"] == pytest.approx(s, abs=1e-12)
    # Squaring is strictly increasing on v >= 0 and exact in float64: same ranks.
    assert moment_pair_metrics(a.double() ** 2, b.double() ** 2)["spearman_log"] == \
        pytest.approx(s, abs=1e-12)


def test_log10_stats_known_values():
    v = torch.tensor([0.0, 0.0, 1e-8, 1e-6, 1e-4, 1e-2])
    s = log10_stats(v, quantiles=(0.0, 0.5, 1.0))
    assert s["numel"] == 6 and s["n_positive"] == 4
    assert s["frac_zero"] == pytest.approx(2 / 6)
    assert s["mean"] == pytest.approx(-5.0, abs=1e-6)
    assert s["median"] == pytest.approx(-5.0, abs=1e-6)
    assert s["q0"] == pytest.approx(-8.0, abs=1e-6)
    assert s["q100"] == pytest.approx(-2.0, abs=1e-6)
    assert s["min"] == pytest.approx(-8.0, abs=1e-6) and s["max"] == pytest.approx(-2.0, abs=1e-6)
    assert s["std"] == pytest.approx(np.std([-8, -6, -4, -2]), abs=1e-6)
    assert s["sampled"] is False
    assert {"q1", "q10", "q50", "q90", "q99"} <= set(log10_stats(v))


def test_log10_stats_sampled_path_is_close_and_reproducible():
    v = _moments(20000, 6, decades=10)
    exact = log10_stats(v)
    s1 = log10_stats(v, max_exact=5000, seed=1)
    s2 = log10_stats(v, max_exact=5000, seed=1)
    assert s1["sampled"] is True and exact["sampled"] is False
    assert s1 == s2
    assert s1["mean"] == exact["mean"]  # moments stay exact
    for key in ("median", "q10", "q90"):
        assert s1[key] == pytest.approx(exact[key], abs=0.3)  # 10 decades, 5000 samples


def test_log10_stats_all_zero():
    s = log10_stats(torch.zeros(5))
    assert s["frac_zero"] == 1.0 and s["n_positive"] == 0
    assert math.isnan(s["mean"]) and math.isnan(s["q50"])


def test_spearman_without_ties_matches_reference():
    g = torch.Generator().manual_seed(8)
    a = torch.rand(3000, generator=g)
    b = a + 0.3 * torch.rand(3000, generator=g)
    ref = np.corrcoef(pd.Series(a.numpy()).rank(), pd.Series(b.numpy()).rank())[0, 1]
    assert moment_pair_metrics(a, b)["spearman_log"] == pytest.approx(ref, rel=1e-12)


@pytest.mark.parametrize("kind", ["moments", "ties_and_zeros", "negative", "nan", "float64"])
def test_the_rank_sort_is_the_stable_float_sort(kind):
    """Non-negative float32 values are sorted by their bit patterns (a radix sort):
    the permutation of the stable float sort, ties and -0.0 included; anything
    else by the floats themselves."""
    from curvlens.math.overlap import _stable_sort

    g = torch.Generator().manual_seed(11)
    x = torch.exp(torch.randn(5000, generator=g) * 5 - 15)
    if kind != "moments":
        x[::3] = x[1::3][: x[::3].numel()]  # ties
        x[::11] = 0.0
        x[5::13] = -0.0
        x[7], x[8], x[9] = 1e-45, float("inf"), 3.4e38
    if kind == "negative":
        x[100] = -1e-9
    if kind == "nan":
        x[200] = float("nan")
    if kind == "float64":
        x = x.double()
    keys, perm = _stable_sort(x)
    want_vals, want_perm = torch.sort(x, stable=True)
    assert torch.equal(perm, want_perm)
    same = keys[1:] == keys[:-1]
    assert torch.equal(same, want_vals[1:] == want_vals[:-1])
