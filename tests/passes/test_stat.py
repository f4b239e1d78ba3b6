"""``curvlens.passes.stat``: the per-tensor context of the fused pass. The experts'
moment summaries and Spearman ranks made as jobs on two threads are the ones made
one at a time, and an error comes back as it would one at a time."""
import time
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

import curvlens as cl
from curvlens.errors import CurvlensError
from curvlens.math.blocks import tensor_seed
from curvlens.math.overlap import pair_overlaps, spearman_pairs, spearman_ranks, spearman_sample
from curvlens.passes import stat as stat_mod
from curvlens.passes.experts import TensorGroup
from curvlens.passes.stat import TensorContext
from curvlens.runtime import Background
from tests.conftest import make_tiny_zoo

KW = dict(device="cpu", progress=False)


def _moments(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(3):
        v = torch.rand(40, 50, generator=g) * 10.0 ** -(k + 3)
        v[torch.rand(40, 50, generator=g) < 0.2 * k] = 0.0  # 0%, 20%, 40% zeros
        v[:, :5] = v[:1, :5]  # ties
        out.append(v)
    return out


def _context(moments, threads: bool) -> TensorContext:
    g = TensorGroup("w", 0, "mlp_up", None, [torch.zeros_like(v) for v in moments], moments, ["a", "b", "c"])
    run = SimpleNamespace(user_bins=None, levels=(0.01, 0.5, 0.99), fracs=(0.01, 0.1),
                          share=Background(threads, budget=None))
    return TensorContext(g, run)


@pytest.mark.parametrize("order", [False, True])
def test_experts_summarised_together_are_the_ones_made_one_at_a_time(order):
    moments = _moments(0)
    together, alone = _context(moments, True), _context(moments, False)
    together.summarise([2, 0, 1, 2], order=order)
    assert sorted(together._moment) == [0, 1, 2] and sorted(together._order) == ([0, 1, 2] if order else [])
    for i in range(3):
        a, b = together.moment(i), alone.moment(i)
        for field in ("numel", "zeros", "positive", "sum_log10", "sum_v", "vmax"):
            assert getattr(a, field) == getattr(b, field), (i, field)
        assert torch.equal(a.hist, b.hist)
        assert together.order(i) == alone.order(i)
    together.run.share.close()


def test_the_first_experts_error_is_raised_whichever_thread_met_it_first(monkeypatch):
    real = stat_mod.moment_sweep

    def sweep(v, bins=None):
        if float(v.reshape(-1)[0]) == -1.0:  # expert 1: fails late
            time.sleep(0.3)
            raise CurvlensError("expert 1 failed")
        if float(v.reshape(-1)[0]) == -2.0:  # expert 2: fails at once
            raise CurvlensError("expert 2 failed")
        return real(v, bins)

    monkeypatch.setattr(stat_mod, "moment_sweep", sweep)
    moments = _moments(1)
    moments[1][0, 0], moments[2][0, 0] = -1.0, -2.0
    for threads in (True, False):
        ctx = _context(moments, threads)
        with pytest.raises(CurvlensError, match="expert 1 failed"):
            ctx.summarise([0, 1, 2], order=True)
        ctx.run.share.close()


@pytest.mark.parametrize("spearman_max", [None, 300])
def test_spearman_ranks_made_ahead_are_the_ones_made_inside(spearman_max):
    flats = {e: v.reshape(-1) for e, v in zip("abc", _moments(2))}
    pairs = [("a", "b"), ("b", "c"), ("a", "c")]
    n = flats["a"].numel()
    support = {(x, y): int(((flats[x] > 0) | (flats[y] > 0)).sum()) for x, y in pairs}
    assert support["a", "b"] == n and support["b", "c"] < n  # both paths: whole support and not
    want = spearman_pairs(flats, pairs, support, spearman_max, 7)
    sample = spearman_sample(n, spearman_max, 7, torch.device("cpu"))
    assert (sample is None) == (spearman_max is None)
    ahead = {e: spearman_ranks(flats[e], sample) for e in ("a", "b")}
    assert spearman_pairs(flats, pairs, support, spearman_max, 7, ranks=ahead) == want


@pytest.mark.parametrize("spearman_max", [None, 64])
def test_the_moment_statistics_are_the_same_on_one_thread_or_two(tmp_path, monkeypatch, spearman_max):
    """Experts with and without zeros, so the overlap's Spearman ranks are made both
    ahead (a pair whose support is every entry) and after the overlap sums."""
    base, dirs, *_ = make_tiny_zoo(tmp_path / "z", n_experts=3)
    g = torch.Generator().manual_seed(3)
    for d in dirs[1:]:
        f = d / "export" / "exp_avg_sq.safetensors"
        m = load_file(str(f))
        save_file({k: torch.where(torch.rand(v.shape, generator=g) < 0.3, 0.0, v) for k, v in m.items()}, str(f))
    ex = cl.Experts.from_dirs(base, dirs)

    def frames():
        out = cl.analyze(ex, ["curvature_stats", "moment_levels", "curvature_overlap", "log10_histogram"],
                         spearman_max=spearman_max, **KW)
        out["overlap alone"] = cl.curvature_overlap(ex, spearman_max=spearman_max, **KW)
        return out

    two = frames()
    monkeypatch.setenv("CURVLENS_BACKGROUND", "0")
    one = frames()
    for key in one:
        pd.testing.assert_frame_equal(two[key], one[key], check_exact=True, obj=key)
    ov = one["curvature_overlap"]
    assert (ov["excluded_zero"] == 0).any() and (ov["excluded_zero"] > 0).any()
    # each expert's ranks paired with its partner's: the whole-tensor reference agrees
    for name, rows in two["curvature_overlap"].groupby("name"):
        vs = {e: ex[e].moments[name] for e in ex.names}
        ref, _ = pair_overlaps(name, vs, list(zip(rows["expert_a"], rows["expert_b"])), spearman_max,
                               tensor_seed(0, name), 1e-30)
        for a, b, rho in zip(rows["expert_a"], rows["expert_b"], rows["spearman_log"]):
            assert rho == pytest.approx(ref[a, b]["spearman_log"], rel=1e-9, abs=1e-12), (name, a, b)
