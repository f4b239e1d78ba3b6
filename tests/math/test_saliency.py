"""Tests for curvlens.math.saliency: FFG saliency, masks and top-k."""
import pytest
import torch

from curvlens.errors import CurvlensError
from curvlens.math.saliency import fisher_mask, magnitude_scores, saliency
from curvlens.math.topk import topk_mask


def test_saliency_hand_values_and_fp32():
    v = torch.tensor([1.0, 4.0, 0.0], dtype=torch.bfloat16)
    tau = torch.tensor([3.0, -0.5, 7.0], dtype=torch.float64)
    s = saliency(v, tau)
    assert s.dtype == torch.float32
    assert torch.equal(s, torch.tensor([9.0, 1.0, 0.0]))


def test_fisher_mask_threshold_is_inclusive():
    v = torch.tensor([1.0, 1.0, 1.0])
    tau = torch.tensor([1.0, 2.0, 3.0])
    assert fisher_mask(v, tau, 4.0).tolist() == [False, True, True]


def test_fisher_mask_zero_d():
    assert bool(fisher_mask(torch.tensor(2.0), torch.tensor(1.0), 2.0))


def test_shape_mismatch_and_bad_threshold():
    with pytest.raises(CurvlensError, match="same shape"):
        saliency(torch.ones(2), torch.ones(3))
    with pytest.raises(CurvlensError, match="threshold"):
        fisher_mask(torch.ones(2), torch.ones(2), float("nan"))
    with pytest.raises(CurvlensError, match="threshold"):
        fisher_mask(torch.ones(2), torch.ones(2), "high")


def test_magnitude_scores():
    assert torch.equal(magnitude_scores(torch.tensor([-2.0, 0.5])), torch.tensor([2.0, 0.5]))


def test_topk_mask_counts_like_mergekit():
    scores = torch.arange(10.0)
    assert topk_mask(scores, 0.35).sum() == 3  # int(3.5)
    assert topk_mask(scores, 0.05).sum() == 1  # int(0.5) = 0, but a positive density keeps 1
    assert topk_mask(scores, 0.0).sum() == 0
    assert bool(topk_mask(scores, 1.0).all())
    assert topk_mask(scores, 0.3).tolist() == [False] * 7 + [True] * 3


def test_topk_mask_2d_and_0d():
    scores = torch.tensor([[1.0, 5.0], [3.0, 2.0]])
    assert topk_mask(scores, 0.5).tolist() == [[False, True], [True, False]]
    assert bool(topk_mask(torch.tensor(1.0), 0.5))


@pytest.mark.parametrize("density", [-0.1, 1.5, float("nan"), "half"])
def test_topk_mask_bad_density(density):
    with pytest.raises(CurvlensError, match="density"):
        topk_mask(torch.ones(3), density)


def test_not_mutated():
    v, tau = torch.rand(3, 3), torch.randn(3, 3)
    v0, tau0 = v.clone(), tau.clone()
    topk_mask(saliency(v, tau), 0.5)
    fisher_mask(v, tau, 0.1)
    assert torch.equal(v, v0) and torch.equal(tau, tau0)


@pytest.mark.parametrize("dist", ["normal", "ties", "heavy"])
@pytest.mark.parametrize("frac", [1e-6, 0.01, 0.3, 0.5, 0.99, 1.0])
def test_kth_largest_exact_on_large_tensors(dist, frac):
    from curvlens.math.topk import kth_largest

    g = torch.Generator().manual_seed(3)
    n = 1_100_000  # above the sample-select size (64 * 2**14)
    x = {"normal": torch.randn(n, generator=g),
         "ties": torch.randint(0, 7, (n,), generator=g).float(),
         "heavy": torch.exp(torch.randn(n, generator=g) * 8)}[dist]
    k = max(1, int(frac * n))
    assert kth_largest(x, k) == torch.sort(x, descending=True).values[k - 1]


@pytest.mark.parametrize("ties", [False, True])
def test_kth_largest_blocked_matches_kth_largest_through_the_bracket(ties):
    from curvlens.math.topk import kth_largest, kth_largest_blocked

    g = torch.Generator().manual_seed(5)
    x = torch.randn(50_000, generator=g)
    if ties:
        x = x.abs()
        x = torch.round(x * 4)  # a few hundred distinct values: heavy ties
    calls = []

    def score(ix):
        calls.append(ix)
        return x[ix]

    for k in (1, 7, 12_345, 49_999, 50_000):
        calls.clear()
        kth, above, equal = kth_largest_blocked(score, x.numel(), k, size=4096, sample=64,
                                                nonnegative=bool((x >= 0).all()))
        assert kth == kth_largest(x, k)
        assert above == int((x > kth).sum())
        assert equal == [int((x[i:i + 4096] == kth).sum()) for i in range(0, x.numel(), 4096)]
        # the bracket path read the data block by block, never all at once
        assert all(not isinstance(ix, slice) or ix.stop - ix.start <= 4096 for ix in calls)


def test_topk_keeper_gives_topk_mask_block_by_block():
    from curvlens.math.topk import TopKKeeper, kth_largest_blocked

    x = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 2.0, 3.0, 2.0])
    for k in range(1, 9):
        kth, above, equal = kth_largest_blocked(lambda ix: x[ix], 8, k, size=3)
        for keeper in (TopKKeeper(kth, k - above), TopKKeeper(kth, k - above, equal)):
            blocked = torch.cat([keeper(x[i:i + 3]) for i in range(0, 8, 3)])
            assert blocked.dtype == torch.float32
            assert torch.equal(blocked.bool(), topk_mask(x, k / 8)), k
            keeper.reset()
            assert torch.equal(torch.cat([keeper(x[i:i + 3]) for i in range(0, 8, 3)]), blocked)


def test_float_masks_equal_comparisons_at_the_edges():
    from curvlens.math.topk import above, at_least

    x = torch.tensor([0.0, 1e-45, 0.5, 1.0, 1.0000001, 3.0, float("inf")])
    for t in [0.0, 1e-45, 0.5, 1.0, 2.0, -1.0, float("inf")]:
        assert torch.equal(at_least(x, t), (x >= t).float()), t
        assert torch.equal(above(x, t), (x > t).float()), t


def test_kth_largest_blocked_with_values_shared_by_many_entries(monkeypatch):
    """bf16-derived scores repeat a few values millions of times: the bracket then
    collapses to one value, or has tied ends, and both are counted, not selected."""
    from curvlens.math import topk as S

    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.full((20_000,), 0.5), torch.full((15_000,), 0.25),
                   torch.rand(15_000, generator=g)])[torch.randperm(50_000, generator=g)]
    used = []
    for name in ("_select_point", "_select_bracket"):
        real = getattr(S, name)
        monkeypatch.setattr(S, name, lambda *a, _real=real, _n=name: used.append(_n) or _real(*a))
    for k in (1, 3_000, 7_000, 12_000, 20_000, 30_000, 34_000, 40_000, 49_000, 50_000):
        for nonneg in (True, False):
            kth, above, equal = S.kth_largest_blocked(lambda ix: x[ix], x.numel(), k, 4096,
                                                      nonnegative=nonneg, sample=4096)
            assert kth == S.kth_largest(x, k), k
            assert above == int((x > kth).sum()) < k <= above + sum(equal)
            assert equal == [int((x[i:i + 4096] == kth).sum()) for i in range(0, 50_000, 4096)]
    assert {"_select_point", "_select_bracket"} <= set(used)
