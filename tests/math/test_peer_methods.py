"""Known answers for mergekit's peer methods (breadcrumbs, DELLA, Model Stock, the
spherical family, SCE, Arcee Fusion, passthrough) on hand-made tensors, the
checks of how many models each takes, and DELLA's distribution. Parity with
mergekit itself is in test_mergekit_parity_peers.py."""
import math

import pytest
import torch

from curvlens.errors import CurvlensError
from curvlens.math.methods import get_method

R = math.sqrt(0.5)


def _m(name, base, experts, **params):
    return get_method(name)(base, experts, None, **params)


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- how many models each method takes -------------------------------------------


@pytest.mark.parametrize("name, base, n, message", [
    ("slerp", torch.zeros(2), 2, "exactly 1 expert besides the base; got 2"),
    ("slerp", None, 1, "needs a base"),
    ("arcee_fusion", torch.zeros(2), 2, "exactly 1 expert besides the base"),
    ("nuslerp", None, 3, "exactly 2 experts; got 3"),
    ("nuslerp", torch.zeros(2), 1, "exactly 2 experts; got 1"),
    ("model_stock", torch.zeros(2), 1, "at least 2 experts besides the base; got 1"),
    ("passthrough", None, 2, "exactly 1 expert; got 2"),
    ("passthrough", torch.zeros(2), 1, "takes no base"),
])
def test_model_counts_are_checked(name, base, n, message):
    experts = [torch.full((2,), float(i + 1)) for i in range(n)]
    with pytest.raises(CurvlensError, match=message):
        _m(name, base, experts, **({"t": 0.5} if name == "slerp" else {}))


def test_slerp_t_is_required():
    with pytest.raises(CurvlensError, match="t is required"):
        _m("slerp", torch.zeros(2), [torch.ones(2)])


# -- slerp and friends -------------------------------------------------------------


def test_slerp_orthogonal_unit_vectors():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(_m("slerp", a, [b], t=0.5), torch.tensor([R, R]))
    # a third of the way along the quarter circle
    torch.testing.assert_close(_m("slerp", a, [b], t=1 / 3),
                               torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))
    torch.testing.assert_close(_m("slerp", a, [b], t=0.0), a)
    torch.testing.assert_close(_m("slerp", a, [b], t=1.0), b)


def test_slerp_keeps_unequal_norms_as_mergekit_does():
    # the coefficients multiply the raw tensors: |a| = 2, |b| = 1 at 90 degrees
    a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(_m("slerp", a, [b], t=0.5), torch.tensor([2 * R, R]))


def test_slerp_collinear_is_linear():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([3.0, 0.0])
    assert torch.equal(_m("slerp", a, [b], t=0.25), torch.tensor([1.5, 0.0]))
    assert torch.equal(_m("slerp", a, [-b], t=0.25), torch.tensor([0.0, 0.0]))  # antipodal: linear too


def test_nuslerp_weights_set_t_and_rows():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # t = 3 / (1 + 3) = 0.75 of the way from a to b
    want = torch.tensor([math.sin(math.pi / 8), math.sin(3 * math.pi / 8)])
    torch.testing.assert_close(_m("nuslerp", None, [a, b], weight=[1.0, 3.0]), want)
    # per row (flatten off): row 0 orthogonal, row 1 collinear (linear)
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([[0.0, 1.0], [3.0, 3.0]])
    out = _m("nuslerp", None, [x, y], nuslerp_flatten=False)
    torch.testing.assert_close(out, torch.tensor([[R, R], [2.0, 2.0]]))
    # row_wise: the vectors run along dim 0 (the columns)
    out = _m("nuslerp", None, [x.T, y.T], nuslerp_flatten=False, nuslerp_row_wise=True)
    torch.testing.assert_close(out, torch.tensor([[R, R], [2.0, 2.0]]).T)
    # with a base: slerp of the task vectors, added to the base
    base = torch.tensor([5.0, 5.0])
    torch.testing.assert_close(_m("nuslerp", base, [base + a, base + b]), base + torch.tensor([R, R]))


def test_multislerp():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(_m("multislerp", None, [a, b]), torch.tensor([R, R]))
    # one expert: returned as it is (a copy)
    x = torch.tensor([1.0, -2.0])
    out = _m("multislerp", torch.zeros(2), [x])
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    # an antipodal pair falls back to the weighted sum
    assert torch.equal(_m("multislerp", None, [x, -x], weight=[1.0, 1.0]), torch.zeros(2))
    with pytest.raises(CurvlensError, match="weighted mean of the experts' unit vectors is zero"):
        _m("multislerp", None, [x, -x, torch.tensor([0.0, 0.0])])
    with pytest.raises(CurvlensError, match="weights sum to 0"):
        _m("multislerp", None, [a, b], weight=[1.0, -1.0])


def test_karcher():
    x = torch.tensor([1.0, 2.0, -2.0])
    torch.testing.assert_close(_m("karcher", None, [x, x, x]), x)
    # directions averaged on the circle, times the mean norm (3 + 1) / 2
    out = _m("karcher", None, [torch.tensor([3.0, 0.0]), torch.tensor([0.0, 1.0])])
    torch.testing.assert_close(out, torch.tensor([2 * R, 2 * R]))
    # a base is one more model: angles 0, 90 and (base) 0 average to 30 degrees
    out = _m("karcher", torch.tensor([1.0, 0.0]), [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])],
             max_iter=100, tol=1e-9)
    torch.testing.assert_close(out, torch.tensor([math.cos(math.pi / 6), math.sin(math.pi / 6)]))
    # max_iter 0: the normalised arithmetic mean of the directions
    out = _m("karcher", torch.tensor([1.0, 0.0]), [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])],
             max_iter=0)
    torch.testing.assert_close(out, torch.tensor([2.0, 1.0]) / math.sqrt(5))
    assert torch.equal(_m("karcher", None, [torch.zeros(2), torch.zeros(2)]), torch.zeros(2))


# -- Model Stock ---------------------------------------------------------------------


def test_model_stock():
    base = torch.tensor([1.0, 1.0, 1.0])
    tau = torch.tensor([1.0, -2.0, 0.5])
    # identical task vectors: cos = 1, t = 1: the expert
    torch.testing.assert_close(_m("model_stock", base, [base + tau, base + tau, base + tau]), base + tau)
    # orthogonal task vectors: cos = 0, t = 0: the base
    e1, e2 = base + torch.tensor([1.0, 0.0, 0.0]), base + torch.tensor([0.0, 2.0, 0.0])
    assert torch.equal(_m("model_stock", base, [e1, e2]), base)
    # opposite task vectors, two experts: 1 + cos = 0 is singular: the base
    assert torch.equal(_m("model_stock", base, [base + tau, base - tau]), base)
    # cos = 0.5, three experts (pairwise angles all 60 degrees): t = 1.5 / 2 = 0.75
    taus = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.5, math.sqrt(0.75), 0.0]),
            torch.tensor([0.5, math.sqrt(0.75) / 3, math.sqrt(2 / 3)])]
    out = _m("model_stock", torch.zeros(3), taus)
    torch.testing.assert_close(out, 0.75 * sum(taus) / 3)


def test_model_stock_filter_wise_takes_one_angle_per_row():
    base = torch.zeros(2, 2)
    e1 = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    e2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # row 0: identical task vectors (t = 1); row 1: orthogonal (t = 0)
    out = _m("model_stock", base, [e1, e2], filter_wise=True)
    torch.testing.assert_close(out, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    # one angle for the whole tensor: cos = 1/2, t = 1 / 1.5
    out = _m("model_stock", base, [e1, e2])
    torch.testing.assert_close(out, (e1 + e2) / 2 * (2 / 3))


# -- breadcrumbs -----------------------------------------------------------------------


def test_breadcrumbs_band():
    tau = torch.tensor([5.0, -4.0, 3.0, 2.0, 1.0, -0.5, 0.25, 0.1, 6.0, -7.0])
    base = torch.zeros(10)
    # keep int(0.4 * 10) = 4, drop int(0.2 * 10) = 2 outliers (-7, 6): keep 5, -4, 3, 2
    out = _m("breadcrumbs", base, [tau], density=0.4, gamma=0.2)
    assert torch.equal(out, torch.tensor([5.0, -4.0, 3.0, 2.0, 0, 0, 0, 0, 0, 0]))
    # gamma 0.8 would leave fewer than 4: the outlier cut shrinks to 10 - 4 = 6
    out = _m("breadcrumbs", base, [tau], density=0.4, gamma=0.8)
    assert torch.equal(out, torch.tensor([0, 0, 0, 0, 1.0, -0.5, 0.25, 0.1, 0, 0]))
    # int(0.05 * 10) = 0 kept: the base (mergekit keeps no minimum here)
    assert torch.equal(_m("breadcrumbs", base, [tau], density=0.05), base)
    # density 1: nothing pruned, gamma or not
    assert torch.equal(_m("breadcrumbs", base, [tau], gamma=0.5), tau)
    # rescale to the L1 norm: 28.85 / 14
    out = _m("breadcrumbs", base, [tau], density=0.4, gamma=0.2, rescale=True)
    torch.testing.assert_close(out, torch.tensor([5.0, -4.0, 3.0, 2.0, 0, 0, 0, 0, 0, 0]) * (28.85 / 14))


def test_breadcrumbs_ties_with_gamma_zero_is_ties():
    base = _randn(6, 7)
    experts = [base + _randn(6, 7, seed=s) for s in (1, 2, 3)]
    p = {"density": [0.3, 0.5, 0.8], "weight": [0.5, 1.0, 2.0]}
    assert torch.equal(_m("breadcrumbs_ties", base, experts, gamma=0.0, normalize=True, **p),
                       _m("ties", base, experts, **p))
    assert torch.equal(_m("breadcrumbs", base, experts, gamma=0.0, **p),
                       _m("task_arithmetic", base, [base + (e - base) * _topk(e - base, d)
                                                     for e, d in zip(experts, p["density"])],
                          weight=p["weight"]))


def _topk(tau, density):
    k = int(density * tau.numel())
    mask = torch.zeros(tau.numel())
    mask[tau.abs().reshape(-1).argsort(descending=True)[:k]] = 1
    return mask.reshape(tau.shape)


def test_breadcrumbs_ties_in_magnitude_keep_lowest_indices():
    tau = torch.tensor([2.0, 2.0, 2.0, 2.0, 1.0])
    # keep 2 after 1 outlier, all tied: ranks 2-3 are indices 1, 2
    out = _m("breadcrumbs", torch.zeros(5), [tau], density=0.4, gamma=0.2)
    assert torch.equal(out, torch.tensor([0.0, 2.0, 2.0, 0.0, 0.0]))


# -- DELLA -----------------------------------------------------------------------------


def test_della_epsilon_must_fit_inside_0_1():
    with pytest.raises(CurvlensError, match=r"epsilon\[0\]=0.15 with density\[0\]=0.9"):
        _m("della", torch.zeros(3), [torch.ones(3)], density=0.9)
    with pytest.raises(CurvlensError, match="epsilon"):
        _m("della", torch.zeros(3), [torch.ones(3)], density=0.1, epsilon=0.1)
    # density 1 draws nothing, whatever epsilon
    assert torch.equal(_m("della", torch.zeros(3), [torch.ones(3)], epsilon=0.5), torch.ones(3))


def test_della_with_epsilon_zero_is_dare():
    # every probability is density - 0 + r * 2 * 0 = density: DARE's draws
    base = _randn(5, 9)
    experts = [base + _randn(5, 9, seed=s) for s in (1, 2)]
    for della, dare in (("della_linear", "dare_linear"), ("della", "dare_ties")):
        a = get_method(della)(base, experts, density=0.4, epsilon=0.0, normalize=True,
                              rng=torch.Generator().manual_seed(9))
        b = get_method(dare)(base, experts, density=0.4, normalize=True, rng=torch.Generator().manual_seed(9))
        assert torch.equal(a, b)


def _della_masks(shape, density, epsilon, draws, make_row):
    row = make_row()
    tau = row.expand(shape).contiguous()
    kept = torch.zeros(shape)
    for s in range(draws):
        out = get_method("della_linear")(torch.zeros(shape), [tau], density=density, epsilon=epsilon,
                                         rescale=False, seed=s)
        kept += (out != 0).float()
    return kept / draws, tau


def test_della_keep_rate_rises_linearly_with_rank():
    # one row of 11 distinct magnitudes (ranks 1..11), repeated over 500 rows and
    # 8 draws: 4,000 draws per rank, standard error <= 0.008; 0.035 is > 4 sigma
    # and well under the 0.04 step between neighbouring ranks.
    perm = torch.tensor([3, 7, 0, 10, 5, 1, 9, 2, 8, 4, 6])
    rates, tau = _della_masks((500, 11), 0.5, 0.2, 8, lambda: (perm.float() + 1) * torch.tensor(
        [1.0, -1.0] * 5 + [1.0]))
    rank = perm  # |tau| = perm + 1: rank - 1 = perm
    want = 0.5 - 0.2 + 0.4 * rank.float() / 10
    assert (rates.mean(0) - want).abs().max() < 0.035
    # a uniform DARE-style draw would miss the ends by 0.2
    assert rates.mean(0)[perm == 0] < 0.35 and rates.mean(0)[perm == 10] > 0.65


def test_della_rows_of_one_entry_keep_at_density():
    # mergekit's rank spread is 0/0 there (it fails); curvlens keeps at density
    rates, _ = _della_masks((4000, 1), 0.3, 0.1, 1, lambda: torch.ones(1))
    assert abs(float(rates.mean()) - 0.3) < 0.03  # 4,000 draws: standard error 0.007


def test_della_rescale_keeps_the_l1_norm_and_its_mean_follows_mergekit():
    # mergekit's rescale (and so curvlens's) scales the kept entries by
    # ||tau||_1 / ||kept||_1, not by 1/p per entry as the DELLA paper does; over
    # many draws entry i averages tau_i p_i sum|tau| / sum p|tau|.
    g = torch.Generator().manual_seed(0)
    row = torch.randn(9, generator=g)
    tau = row.expand(300, 9).contiguous()
    total = torch.zeros(9)
    draws = 80
    for s in range(draws):
        out = get_method("della_linear")(torch.zeros(300, 9), [tau], density=0.5, epsilon=0.3, seed=s)
        torch.testing.assert_close(out.abs().sum(), tau.abs().sum())  # the L1 norm, exactly kept
        total += out.mean(0)
    ranks = row.abs().argsort().argsort().float()
    p = 0.2 + 0.6 * ranks / 8
    want = row * p * row.abs().sum() / (p * row.abs()).sum()
    # 24,000 draws per entry: the mean's relative standard error is <= 0.013
    torch.testing.assert_close(total / draws, want, rtol=0.04, atol=0.01)
    # a per-entry 1/p rescale would be unbiased: its mean, tau, is far from this one
    assert (want - row).abs().max() > 0.2


def test_della_counts_kept_entries():
    from curvlens.math.methods import MaskCounts

    c = MaskCounts(1)
    get_method("della")(torch.zeros(4000), [_randn(4000)], density=0.3, epsilon=0.1, counts=c)
    assert c.used and abs(c.kept[0] / 4000 - 0.3) < 0.03


# -- SCE, Arcee Fusion, passthrough -------------------------------------------------------


def test_sce():
    base = torch.zeros(2)
    # weights mean(tau^2): 2.5 and 5 -> 1/3, 2/3; entry 1: only expert 0 agrees with -
    out = _m("sce", base, [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])])
    torch.testing.assert_close(out, torch.tensor([1 / 3 + 2, -2.0]))
    # select_topk 0.5: keep the 2 of 4 entries with largest variance across experts
    e1 = torch.tensor([1.0, 1.0, 4.0, 0.0])
    e2 = torch.tensor([1.5, 3.0, -4.0, 0.5])
    out = _m("sce", torch.zeros(4), [e1, e2], select_topk=0.5)
    # variances 1/16, 1, 16, 1/16: k = int(4 * 0.5) = 2, entries 1 and 2 kept;
    # weights from the masked tau: mean squares 17/4, 25/4 -> 17/42, 25/42;
    # entry 2 sums to 0, electing +: only expert 0's +4 agrees
    w1, w2 = 17 / 42, 25 / 42
    want = torch.tensor([0.0, (w1 * 1 + w2 * 3) / (w1 + w2), 4.0, 0.0])
    torch.testing.assert_close(out, want)
    # no edits at all: the base
    assert torch.equal(_m("sce", torch.ones(3), [torch.ones(3), torch.ones(3)]), torch.ones(3))


def test_arcee_fusion():
    base = torch.zeros(2, 4)
    expert = torch.tensor([[0.0, 0.1, 0.0, 0.2], [0.0, 0.0, 3.0, 0.3]])
    # row KLs: tiny for row 0, large for row 1; sorted scores have q1 = median = 0
    # and q3 = the larger row-0 score, so the cut keeps row 1's two edits only
    out = _m("arcee_fusion", base, [expert])
    assert torch.equal(out, torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.3]]))
    # the expert equal to the base: the base
    assert torch.equal(_m("arcee_fusion", expert, [expert.clone()]), expert)


def test_arcee_fusion_threshold_is_the_exact_quartile_rule():
    from curvlens.math.methods.fusion import fusion_threshold

    s = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 0.0, 6.0, 7.0, 8.0])
    # n - 1 = 8: entries 2, 4, 6 of the sorted scores 0..8 are q1, median, q3
    assert float(fusion_threshold(s)) == 4 + 1.5 * (6 - 2)


def test_passthrough():
    x = torch.tensor([[1.0, -2.0], [0.5, 4.0]])
    out = _m("passthrough", None, [x])
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    assert torch.equal(_m("passthrough", None, [x], scale=-0.5), -0.5 * x)
    assert _m("passthrough", None, [x.to(torch.bfloat16)]).dtype == torch.float32
