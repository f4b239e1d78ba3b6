"""The per-tensor sweeps: C kernels and their torch twins agree, and both agree
with the plain torch/numpy definitions (exactly where the result is a count, a
selection or a quantile)."""
import math

import numpy as np
import pytest
import torch

from curvlens.errors import CurvlensError
from curvlens.math import native
from curvlens.math.moment_sweep import moment_sweep, order_selections, user_bins
from curvlens.math.pair_sweep import overlap_sums, tv_sums, weighted_sq_diff
from curvlens.math.quantile import ScoreSource, TopKSketch

needs_c = pytest.mark.skipif(native.lib() is None, reason=f"no C kernels: {native.reason()}")


@pytest.fixture(params=["c", "torch"])
def impl(request, monkeypatch):
    if request.param == "c":
        if native.lib() is None:
            pytest.skip(f"no C kernels: {native.reason()}")
    else:
        monkeypatch.setitem(native._STATE, "lib", None)
    return request.param


def _moments(n=20011, seed=0, zeros=True):
    g = torch.Generator().manual_seed(seed)
    v = torch.exp(torch.randn(n, generator=g) * 4 - 20)
    if zeros:
        v[::7] = 0.0
    if n > 5:
        v[3] = 1e-42  # a subnormal
        v[5] = -0.0
    return v


def test_moment_sweep_counts_and_sums(impl):
    v = _moments()
    s = moment_sweep(v)
    pos = v[v > 0].double()
    assert (s.numel, s.zeros, s.positive) == (v.numel(), int((v <= 0).sum()), pos.numel())
    assert s.sum_log10 == pytest.approx(float(torch.log10(pos).sum()), rel=1e-9)
    assert s.sum_v == pytest.approx(float(v.double().sum()), rel=1e-12)
    assert s.vmax == float(v.max())
    assert int(s.hist.sum()) == s.positive


@pytest.mark.parametrize("edges", [np.linspace(-30, 0, 121), [-44.5, -20.0, -19.5, -19.0, 38.6], [-20.0, -19.0]])
def test_user_bins_are_bucketize_of_float64_log10(impl, edges):
    v = _moments(seed=1)
    # values exactly at edges (as float32) and around them
    extra = torch.tensor([10.0 ** e for e in np.asarray(edges)[:-1] if -45 < e < 38], dtype=torch.float32)
    v = torch.cat([v, extra, torch.nextafter(extra, torch.zeros_like(extra))])
    e = torch.tensor(edges, dtype=torch.float64)
    lg = torch.log10(v.double())
    idx = torch.bucketize(lg, e, right=True) - 1
    idx[lg == e[-1]] = e.numel() - 2
    idx = idx[(idx >= 0) & (idx < e.numel() - 1)]
    want = torch.bincount(idx, minlength=e.numel() - 1)
    assert torch.equal(moment_sweep(v, user_bins(edges)).user_counts, want)


@pytest.mark.parametrize("n", [1, 2, 5, 1000, 70001])
def test_quantiles_are_torch_quantile_bit_for_bit(impl, n):
    v = _moments(n, seed=n, zeros=n > 5)
    s = moment_sweep(v)
    levels = [0.0, 0.01, 0.1, 0.5, 0.9, 0.99, 1.0]
    got, _ = order_selections(v, s, levels)
    pos = v[v > 0]
    if pos.numel() == 0:
        assert all(math.isnan(x) for x in got)
        return
    want = torch.quantile(torch.log10(pos.double()), torch.tensor(levels, dtype=torch.float64)).tolist()
    assert got == want


@pytest.mark.parametrize("values", ["distinct", "ties"])
def test_top_sets_keep_the_highest_indices_of_ties(impl, values):
    g = torch.Generator().manual_seed(3)
    v = torch.rand(5003, generator=g) if values == "distinct" else torch.randint(0, 9, (5003,), generator=g).float()
    s = moment_sweep(v)
    ks = [1, 17, 500, s.positive]
    _, tops = order_selections(v, s, (), ks)
    order = torch.sort(v, stable=True).indices
    for k, (t, cut) in zip(ks, tops):
        mask = (v > t) | ((v == t) & (torch.arange(v.numel()) >= cut))
        want = torch.zeros_like(mask)
        want[order[v.numel() - k:]] = True
        assert torch.equal(mask, want), k


def test_overlap_sums(impl):
    vs = [_moments(4099, seed=i) for i in range(3)]
    vs[1][:50] = 0.0
    pairs = [(0, 1), (0, 2), (1, 2)]
    sums = [moment_sweep(v) for v in vs]
    tops = [order_selections(v, s, (), [40, 400])[1] for v, s in zip(vs, sums)]
    got = overlap_sums(vs, pairs, 1e-30, [s.vmax for s in sums], tops)
    for (a, b), r in zip(pairs, got):
        va, vb = vs[a].double(), vs[b].double()
        sup = (vs[a] > 0) | (vs[b] > 0)
        la = torch.log10((vs[a] + 1e-30).double())[sup]
        lb = torch.log10((vs[b] + 1e-30).double())[sup]
        assert r["support"] == int(sup.sum())
        cos = float(va @ vb) / math.sqrt(float(va @ va) * float(vb @ vb))
        assert r["sab"] / math.sqrt(r["saa"] * r["sbb"]) == pytest.approx(cos, rel=1e-12)
        assert r["lab"] == pytest.approx(float(la @ lb), rel=1e-7)
        assert r["la"] == pytest.approx(float(la.sum()), rel=1e-7)
        for (ta, ca), (tb, cb), inter in zip(tops[a], tops[b], r["inter"]):
            ix = torch.arange(vs[a].numel())
            ma = (vs[a] > ta) | ((vs[a] == ta) & (ix >= ca))
            mb = (vs[b] > tb) | ((vs[b] == tb) & (ix >= cb))
            assert inter == int((ma & mb).sum())


@needs_c
@pytest.mark.parametrize("n", [1025, 4099, 20011, 65536])
@pytest.mark.parametrize("pairs", [[(0, 1)], [(0, 1), (0, 2), (1, 2)], [(2, 0), (1, 1)]])
def test_overlap_sums_split_over_two_threads_are_the_one_thread_bits(n, pairs):
    """The second half of the blocks on a helper thread, its block sums added after
    the first half's in order: every sum is the one-thread sweep's, to the bit
    (odd sizes end in a short block; a pair may repeat an expert)."""
    vs = [_moments(n, seed=20 + i) for i in range(3)]
    vs[1][: n // 3] = 0.0
    sums = [moment_sweep(v) for v in vs]
    tops = [order_selections(v, s, (), [max(1, n // 100), n // 10])[1] for v, s in zip(vs, sums)]
    vmax = [s.vmax for s in sums]
    one = overlap_sums(vs, pairs, 1e-30, vmax, tops, split=False)
    two = overlap_sums(vs, pairs, 1e-30, vmax, tops, split=True)
    assert two == one
    # and bits that would tell a changed summation order apart: the first half alone differs
    half = overlap_sums([v[: n // 2] for v in vs], pairs, 1e-30, vmax, tops, split=False)
    assert half != one


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_task_vector_sums(impl, dtype):
    g = torch.Generator().manual_seed(4)
    base = torch.randn(3001, generator=g).to(dtype)
    xs = [(base.float() + torch.randn(3001, generator=g) * 0.1).to(dtype) for _ in range(3)]
    xs[2][:100] = base[:100]  # unchanged entries: tau = 0
    vs = [_moments(3001, seed=10 + i) for i in range(3)]
    pairs = [(0, 1, 0, 1), (1, 2, None, None), (0, 2, 0, 2)]
    bsq, dsq, per = tv_sums(base, xs, 3, vs, pairs)
    assert bsq == pytest.approx(float(base.double().square().sum()), rel=1e-12)
    for x, d in zip(xs, dsq):
        assert d == pytest.approx(float((x.double() - base.double()).square().sum()), rel=1e-12)
    for (a, b, ma, mb), r in zip(pairs, per):
        ta, tb = (xs[a].float() - base.float()).double(), (xs[b].float() - base.float()).double()
        pr = ta * tb
        assert r["dot"] == pytest.approx(float(pr.sum()), rel=1e-12, abs=1e-300)
        assert (r["both"], r["conflict"]) == (int((pr != 0).sum()), int((pr < 0).sum()))
        if ma is None:
            assert r["curv"] == 0.0
        else:
            w = pr.abs() * vs[ma].double().sqrt() * vs[mb].double().sqrt()
            assert r["curv"] == pytest.approx(float(w.sum()), rel=1e-12)
            assert r["curv_conflict"] == pytest.approx(float(w[pr < 0].sum()), rel=1e-12)


def test_weighted_sq_diff(impl):
    v = _moments(777)
    a, b = torch.randn(777).bfloat16(), torch.randn(777)
    want = float((v.double() * (a.double() - b.double()) ** 2).sum())
    assert weighted_sq_diff(v, a, b) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("da,db", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32),
                                   (torch.float32, torch.bfloat16)])
def test_unweighted_sq_diff_is_the_float64_squared_norm(impl, da, db):
    g = torch.Generator().manual_seed(3)
    # an edit a thousand times smaller than the weights: fp32 differences would round
    b = (torch.randn(41 * 122, generator=g) * 3).to(db)
    a = (b.double() + torch.randn(41 * 122, generator=g, dtype=torch.float64) * 1e-3).to(da)
    want = float(((a.double() - b.double()) ** 2).sum())
    assert weighted_sq_diff(None, a.reshape(41, 122), b) == pytest.approx(want, rel=1e-12)
    with pytest.raises(CurvlensError, match="sizes differ"):
        weighted_sq_diff(None, a, b[:-1])


@needs_c
@pytest.mark.parametrize("criterion", ["fisher", "magnitude"])
def test_selection_sketches_score_as_torch_does(criterion):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(9001, generator=g).bfloat16()
    x = (base.float() + torch.randn(9001, generator=g) * 0.01).bfloat16()
    v = _moments(9001, seed=6).abs()
    src = ScoreSource.of(base, x, v, criterion)
    tau = x.float() - base.float()
    scores = tau.abs() if criterion == "magnitude" else v * tau.square()
    a, b = TopKSketch().update(src), TopKSketch().update(scores)
    assert torch.equal(a._counts, b._counts) and a.total == b.total
    bin_, _, _ = b.locate(900)
    assert torch.equal(b.bin_counts(bin_).update(src), b.bin_counts(bin_).update(scores))


@needs_c
def test_a_sketch_of_nonfinite_scores_raises_and_keeps_its_counts():
    from curvlens.errors import CurvlensError

    base, x = torch.zeros(10), torch.ones(10) * 3e19
    sk = TopKSketch().update(torch.ones(4))
    before = sk._counts.clone()
    with pytest.raises(CurvlensError, match="NaN or Inf"):
        sk.update(ScoreSource.of(base, x, torch.ones(10) * 1e30, "fisher"))
    assert torch.equal(sk._counts, before) and sk.total == 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_16_bit_pattern_widens_as_torch_widens_it(dtype):
    """The kernels' loads of fp16 and bf16 (by blocks and one at a time) give
    torch's fp32 value of every one of the 65536 patterns: normals, subnormals,
    zeros of both signs, infinities (NaNs stay NaN)."""
    from curvlens.math import native

    lib = native.lib()
    if lib is None:
        pytest.skip(f"no compiled kernels: {native.reason()}")
    h = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype)
    want = h.float()
    out, each = torch.empty(65536), torch.empty(65536)
    lib.cl_widen(h.data_ptr(), native.dtype_code(h), h.numel(), out.data_ptr(), each.data_ptr())
    nan = torch.isnan(want)
    assert int(nan.sum()) > 0
    for got in (out, each):
        assert torch.equal(torch.isnan(got), nan)
        assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))  # bits: -0.0 too


@pytest.mark.parametrize("dx", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("db", [torch.bfloat16, torch.float16, torch.float32])
def test_task_vectors_in_one_pass_are_torchs_bits(dx, db, monkeypatch):
    """fp32_task_vector through cl_sub_widened: every 16-bit pattern of x (NaNs,
    infinities, subnormals, -0.0) against shuffled ones of b, and a length past the
    kernel's 4096-entry blocks."""
    from curvlens.math.checks import fp32_task_vector

    if native.lib() is None:
        pytest.skip(f"no compiled kernels: {native.reason()}")
    pats = torch.arange(65536 + 4099, dtype=torch.int32) % 65536
    g = torch.Generator().manual_seed(0)

    def make(dt, p):
        if dt == torch.float32:  # fp32: the 16-bit patterns as bf16 widened, plus random values
            return torch.cat([p.to(torch.int16).view(torch.bfloat16).float()[:-4099],
                              torch.randn(4099, generator=g) * 1e30])
        return p.to(torch.int16).view(dt)

    x, b = make(dx, pats), make(db, pats[torch.randperm(pats.numel(), generator=g)])
    x_before, b_before = x.clone(), b.clone()
    got = fp32_task_vector(x.view(-1, 1), b.view(-1, 1))
    monkeypatch.setenv("CURVLENS_NATIVE", "0")  # the torch path
    want = fp32_task_vector(x.view(-1, 1), b.view(-1, 1))
    assert want.data_ptr() != x.data_ptr() and got.dtype == torch.float32 and got.shape == (x.numel(), 1)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan].view(torch.int32), want[~nan].view(torch.int32))
    assert torch.equal(x.view(torch.uint8), x_before.view(torch.uint8))  # inputs untouched
    assert torch.equal(b.view(torch.uint8), b_before.view(torch.uint8))
