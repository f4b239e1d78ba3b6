import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlens.errors import CurvlensError
from curvlens.math.quantile import TopKSketch


def _check_against_exact(sketch, values, density):
    """The sketch's answer versus the exact k-th largest value of ``values``."""
    x = values.reshape(-1).float()
    n = x.numel()
    t, kept, total, err = sketch.threshold(density)
    assert total == n
    k = math.floor(density * n + 0.5)
    if k == 0:
        assert (t, kept) == (math.inf, 0)
        return
    assert kept == int((x >= t).sum())  # kept_count is exact
    assert abs(kept / n - density) <= err  # realised density within the stated bound
    assert kept >= k
    kth = float(torch.sort(x, descending=True).values[k - 1])
    # Within one bin: the exact k-th largest value is in the threshold's bin.
    assert sketch.bin_of(kth) == sketch.bin_of(t)
    lo, hi = sketch.bin_edges(sketch.bin_of(t))
    assert lo == t <= kth < hi


def _heavy_tailed(n, sigma, seed, zero_frac=0.0):
    """Log-normal values; sigma 15 spans ~50 decades, still inside float32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(sigma * torch.randn(n, generator=g, dtype=torch.float64)).clamp(1e-37, 1e37).float()
    if zero_frac:
        x[torch.rand(n, generator=g) < zero_frac] = 0.0
    return x


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("sigma", [0.5, 4.0, 15.0])
def test_threshold_matches_exact_kth_value_on_log_normal_data(seed, sigma):
    x = _heavy_tailed(20000, sigma, seed, zero_frac=0.1 if seed % 2 else 0.0)
    sk = TopKSketch()
    for part in x.split(3000):  # streamed in pieces, like one tensor at a time
        sk.update(part)
    for density in (1e-4, 0.01, 0.2, 0.3333, 0.46, 0.5, 0.95, 1.0):
        _check_against_exact(sk, x, density)


def test_ties_zeros_subnormals_and_coarse_bins():
    g = torch.Generator().manual_seed(7)
    ints = torch.randint(0, 5, (5000,), generator=g).float()  # heavy ties
    tiny = torch.rand(3000, generator=g) * 1e-40  # subnormal float32
    x = torch.cat([ints, tiny, torch.zeros(500)])
    for bits in (0, 3, 12, 14):
        sk = TopKSketch(mantissa_bits=bits).update(x)
        for density in (0.0001, 0.1, 0.5, 0.6, 0.7, 0.99, 1.0):
            _check_against_exact(sk, x, density)


def test_density_beyond_positive_values_keeps_everything():
    x = torch.tensor([0.0] * 6 + [1.0, 2.0, 3.0, 4.0])
    t, kept, total, err = TopKSketch().update(x).threshold(0.5)
    assert (t, kept, total) == (0.0, 10, 10)
    assert err == 0.6  # the zeros' bin
    t, kept, _, err = TopKSketch().update(x).threshold(0.02)  # k = round(0.2) = 0
    assert (t, kept, err) == (math.inf, 0, 0.02)


def test_update_order_chunking_and_merge_do_not_matter():
    x = _heavy_tailed(10000, 6.0, 11)
    whole = TopKSketch().update(x)
    chunked = TopKSketch(chunk_size=777).update(x.reshape(100, 100).T)  # non-contiguous too
    a = TopKSketch().update(x[:4000])
    b = TopKSketch().update(x[4000:])
    merged = a.merge(b)
    for density in (0.01, 0.3):
        assert whole.threshold(density) == chunked.threshold(density) == merged.threshold(density)


def test_memory_is_independent_of_the_number_of_values():
    sk = TopKSketch()
    before = sk.nbytes
    for seed in range(3):
        sk.update(_heavy_tailed(200000, 10.0, seed))
    assert sk.nbytes == before == 8 * 2**20
    assert sk.total == 600000


def test_accepts_half_precision_and_negative_zero():
    x = torch.tensor([-0.0, 0.5, 1.5, 2.5], dtype=torch.bfloat16)
    assert TopKSketch().update(x).threshold(0.5)[:3] == (1.5, 2, 4)


@pytest.mark.parametrize("bad, what", [
    (torch.tensor([1.0, float("nan")]), "1 NaN"),
    (torch.tensor([1.0, -2.0]), "1 negative"),
    (torch.tensor([1.0, float("inf")]), "1 Inf"),
])
def test_bad_values_raise_and_leave_the_sketch_unchanged(bad, what):
    sk = TopKSketch(chunk_size=1).update(torch.tensor([3.0, 4.0]))
    with pytest.raises(CurvlensError, match=what):
        sk.update(bad)
    assert sk.total == 2
    assert sk.threshold(0.5)[:3] == (4.0, 1, 2)


def test_bad_arguments_raise():
    with pytest.raises(CurvlensError, match="empty"):
        TopKSketch().threshold(0.5)
    sk = TopKSketch().update(torch.ones(3))
    with pytest.raises(CurvlensError, match="density"):
        sk.threshold(1.5)
    with pytest.raises(CurvlensError, match="mantissa_bits"):
        TopKSketch(mantissa_bits=20)
    with pytest.raises(CurvlensError, match="mantissa_bits 12 and 8"):
        sk.merge(TopKSketch(mantissa_bits=8))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, float(torch.finfo(torch.float32).max), width=32), min_size=1, max_size=60),
       st.floats(0, 1), st.integers(0, 12))
def test_property_threshold_within_bound_and_one_bin(vals, density, bits):
    x = torch.tensor(vals, dtype=torch.float32)
    _check_against_exact(TopKSketch(mantissa_bits=bits).update(x), x, density)


def test_dense_and_sparse_binning_agree():
    x = _heavy_tailed(300000, 8.0, 12, zero_frac=0.05)
    dense = TopKSketch().update(x)  # one chunk: bincount
    sparse = TopKSketch(chunk_size=1000).update(x)  # small chunks: unique + index_add_
    assert torch.equal(dense._counts, sparse._counts)
