"""The overlap kernel the analyses run (float32, every pair of experts at once)
against known answers and the float64 reference of tests/math/oracles.py."""
import math

import pytest
import torch

from curvlens.errors import CurvlensError
from curvlens.math.overlap import pair_overlaps
from tests.math.oracles import moment_pair_metrics


def _moments(n, seed, decades=12):
    g = torch.Generator().manual_seed(seed)
    return 10.0 ** (-decades * torch.rand(n, generator=g, dtype=torch.float64)).float()


def _one(a, b, spearman_max=None):
    out, sampled = pair_overlaps("t", {"a": a, "b": b}, [("a", "b")], spearman_max, 0, 1e-30)
    return out["a", "b"], sampled


def test_identical_and_reversed_experts():
    v = _moments(1000, 0)
    v[:7] = 0.0  # zeros tie
    r, sampled = _one(v, v.clone())
    assert not sampled
    assert (r["cosine"], r["pearson_log"], r["spearman_log"], r["jaccard_top1"], r["jaccard_top10"]) == \
        (1.0, 1.0, 1.0, 1.0, 1.0)
    w = torch.sort(_moments(200, 1)).values
    r, _ = _one(w, w.flip(0))
    assert r["spearman_log"] == pytest.approx(-1.0, abs=1e-9) and r["jaccard_top10"] == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_the_float64_reference(seed):
    a, b = _moments(5000, seed), _moments(5000, seed + 10)
    b[:500] = a[:500]  # correlated part
    a[-100:] = 0.0  # ties at zero
    got, _ = _one(a, b)
    want = moment_pair_metrics(a, b)
    for k in ("cosine", "pearson_log", "spearman_log", "jaccard_top1", "jaccard_top10"):
        assert got[k] == pytest.approx(want[k], abs=1e-5), k


def test_sampled_spearman_is_close_and_reproducible():
    a, b = _moments(20000, 3), _moments(20000, 4)
    b[:10000] = a[:10000] * 3
    r1, s1 = _one(a, b, spearman_max=4096)
    r2, _ = _one(a, b, spearman_max=4096)
    assert s1 and r1 == r2
    assert r1["spearman_log"] == pytest.approx(moment_pair_metrics(a, b)["spearman_log"], abs=0.05)
    assert not math.isnan(r1["jaccard_top1"])


def test_bad_moments_name_expert_and_tensor():
    a = _moments(10, 0)
    b = a.clone()
    b[3] = float("nan")
    with pytest.raises(CurvlensError, match="expert 'b', tensor 't': 1 NaN"):
        _one(a, b)


def _mostly_zero(n_rows, dim, seen, seed):
    """An embedding's moments: only the ``seen`` rows (tokens) got a gradient."""
    v = torch.zeros(n_rows, dim)
    g = torch.Generator().manual_seed(seed)
    v[seen] = 10.0 ** (-8 * torch.rand(len(seen), dim, generator=g))
    return v


@pytest.mark.parametrize("spearman_max", [None, 4096])
def test_zeros_in_both_are_excluded_not_counted_as_agreement(spearman_max):
    # 99.8% of the rows never seen by either expert, independent values elsewhere:
    # the experts' curvature does not agree, and no statistic may say it does.
    seen = torch.arange(0, 5000, 500)
    a, b = _mostly_zero(5000, 8, seen, 0), _mostly_zero(5000, 8, seen, 1)
    r, sampled = _one(a, b, spearman_max)
    assert sampled == (spearman_max is not None)
    assert r["excluded_zero"] == 5000 * 8 - 80
    assert abs(r["spearman_log"]) < 0.35 and abs(r["pearson_log"]) < 0.35
    # top 10% of the 80 positive entries: 8 each; chance overlap, not the tied zeros
    assert r["jaccard_top10"] < 0.35 and r["jaccard_top1"] < 1.0
    want = moment_pair_metrics(a, b)
    assert want["excluded_zero"] == r["excluded_zero"]
    for k in ("cosine", "pearson_log", "jaccard_top1", "jaccard_top10"):
        assert r[k] == pytest.approx(want[k], abs=1e-5), k
    if spearman_max is None:
        assert r["spearman_log"] == pytest.approx(want["spearman_log"], abs=1e-6)
    # the same experts agreeing on their seen rows do get 1
    r, _ = _one(a, a.clone(), spearman_max)
    assert (r["pearson_log"], r["spearman_log"], r["jaccard_top10"]) == (1.0, 1.0, 1.0)


def test_zero_in_one_expert_only_is_kept():
    a = _moments(1000, 5)
    b = a.clone()
    b[:400] = 0.0  # b never updated these; a did: a real disagreement
    r, _ = _one(a, b)
    assert r["excluded_zero"] == 0 and r["spearman_log"] < 0.9
    r, _ = _one(torch.zeros(100), torch.zeros(100))
    assert math.isnan(r["pearson_log"]) and math.isnan(r["jaccard_top10"]) and r["excluded_zero"] == 100
