"""``cl.analyze``: one pass gives exactly the frames of the single analyses, and the
one-read (scout) selections are exactly the two-read ones."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

import curvlens as cl
from curvlens import CurvlensError, Experts
from curvlens.passes import analysis as A
from curvlens.passes.analyze import ANALYSES
from curvlens.config.merge import merge
from curvlens.studies.regime import edit_norms
from curvlens.passes.scout import partial_reads, scout_selections
from curvlens.passes.thresholds import model_selections
from tests.conftest import make_tiny_zoo

KW = dict(device="cpu", progress=False)


def _singles(ex, merges):
    (label, merged), = list(merges.items())[:1]
    return {
        "curvature_stats": A.curvature_stats(ex, **KW),
        "moment_levels": A.moment_levels(ex, **KW),
        "curvature_overlap": A.curvature_overlap(ex, **KW),
        "log10_histogram": A.log10_histogram(ex, **KW),
        "edit_norms": edit_norms(ex, **KW),
        "interference": A.interference(ex, **KW),
        "mask_stats": A.mask_stats(ex, densities=(0.1, 0.3), **KW),
        "mask_overlap": A.mask_overlap(ex, 0.3, **KW),
        "compare_merges": A.compare_merges(ex, merges, **KW),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_pass_gives_every_single_analysis_exactly(tmp_path, dtype):
    base, dirs, *_ = make_tiny_zoo(tmp_path / "z", dtype=dtype)
    ex = Experts.from_dirs(base, dirs)
    merges = {"lin": merge(ex, "linear", **KW), "ties": merge(ex, "ties", density=0.5, **KW)}
    fused = cl.analyze(ex, merges=merges, **KW)
    assert list(fused) == [a for a in ANALYSES if a != "predicted_loss"]
    singles = _singles(ex, merges)
    for key, df in singles.items():
        pd.testing.assert_frame_equal(fused[key], df, check_exact=True, obj=key)
        # the pass read every tensor twice (the masks' selection, then the rest), each single
        # analysis without masks once
        assert fused[key].attrs["reads"] == 2 and df.attrs["reads"] == (2 if key.startswith("mask") else 1), key
        assert fused[key].attrs["accuracy"]
    one = cl.analyze(ex, ["predicted_loss"], merges={"ties": merges["ties"]}, **KW)["predicted_loss"]
    pd.testing.assert_frame_equal(one, A.predicted_loss(ex, merges["ties"], **KW), check_exact=True)


def test_analyze_asks_for_what_it_needs(tmp_path):
    base, dirs, *_ = make_tiny_zoo(tmp_path / "z", n_experts=2)
    no_v = Experts.from_dirs(base, dirs, moments=False)
    out = cl.analyze(no_v, **KW)  # the default: what the inputs allow (magnitude masks only)
    assert set(out) == {"edit_norms", "interference", "mask_stats", "mask_overlap"}
    assert set(out["mask_stats"].criterion) == {"magnitude"} and set(out["mask_overlap"].criterion) == {"magnitude"}
    with pytest.raises(CurvlensError, match="curvature_stats needs second moments"):
        cl.analyze(no_v, ["curvature_stats"], **KW)
    with pytest.raises(CurvlensError, match="unknown"):
        cl.analyze(no_v, ["nope"], **KW)
    with pytest.raises(CurvlensError, match="needs merged models"):
        cl.analyze(Experts.from_dirs(base, dirs), ["compare_merges"], **KW)
    with pytest.raises(CurvlensError, match="takes an Experts"):
        cl.analyze([base], **KW)


def test_analyze_runs_on_the_auto_device(tmp_path):
    base, dirs, *_ = make_tiny_zoo(tmp_path / "z", n_experts=2)
    ex = Experts.from_dirs(base, dirs)
    auto = cl.analyze(ex, ["curvature_stats", "interference"], device="auto", progress=False)
    cpu = cl.analyze(ex, ["curvature_stats", "interference"], **KW)
    for k in auto:
        pd.testing.assert_frame_equal(auto[k], cpu[k], check_exact=not torch.cuda.is_available(), obj=k)


def test_analyze_without_the_c_kernels_agrees(tmp_path, monkeypatch):
    from curvlens.math import native

    base, dirs, *_ = make_tiny_zoo(tmp_path / "z", n_experts=2, dtype=torch.bfloat16)
    ex = Experts.from_dirs(base, dirs)
    with_c = cl.analyze(ex, **KW)
    monkeypatch.setitem(native._STATE, "lib", None)
    without = cl.analyze(ex, **KW)
    for k, df in with_c.items():
        # the C log10 is within 2e-8 of the float64 one torch takes: Pearson and the mean of log10 v
        # move in the 8th digit, every count and selection is the same
        pd.testing.assert_frame_equal(without[k], df, check_exact=False, rtol=1e-6, atol=1e-9, obj=k)


# ------------------------------------------------------------------- selections
def _same(a, b):
    assert set(a) == set(b)
    for key in a:
        x, y = a[key], b[key]
        assert (x.threshold, x.k, x.total, x.tied) == (y.threshold, y.k, y.total, y.tied), key
        assert x.row()["ties_kept"] == y.row()["ties_kept"], key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("densities", [[0.05, 0.3], [0.5, 0.9, 1.0]])
def test_scout_selections_are_the_two_read_selections(tmp_path, dtype, densities):
    base, dirs, *_ = make_tiny_zoo(tmp_path / "z", dtype=dtype)
    ex = Experts.from_dirs(base, dirs)
    assert partial_reads(ex)
    with _maybe_warns() as w1:
        want = model_selections(ex, [densities] * 3, ["fisher", "magnitude"], **KW)
    with _maybe_warns() as w2:
        got, reads = scout_selections(ex, [densities] * 3, ["fisher", "magnitude"], **KW)
    _same(want, got)
    assert reads in (1, 3)
    # density 1 keeps entries scored 0, and both say so in the same words
    assert sorted(str(w.message) for w in w1.log) == sorted(str(w.message) for w in w2.log)


@pytest.mark.parametrize("kind", ["fp32_ties", "fp32_distinct", "float64", "nan"])
def test_the_sample_order_is_decreasing_score(kind):
    """The scout's sample sort (bit patterns of fp32 scores, or the floats):
    scores in decreasing order, -0.0 with 0.0 at the end, every index once."""
    from curvlens.passes.scout import _descending

    g = np.random.default_rng(5)
    s = {"fp32_ties": np.round(g.random(20000) * 50).astype(np.float32) / 64,
         "fp32_distinct": g.random(20000).astype(np.float32) * 1e-9,
         "float64": g.random(20000) / 3.0,
         "nan": g.random(20000).astype(np.float32)}[kind].astype(np.float64)
    s[::7] = 0.0
    s[3::11] = -0.0
    if kind == "nan":
        s[5] = np.nan
    order = _descending(s)
    assert sorted(order.tolist()) == list(range(s.size))
    got = s[order]
    if kind == "nan":  # the floats' own order (NaN last), not bit patterns
        assert np.array_equal(order, np.argsort(-s))
        return
    assert (np.diff(got) <= 0).all()
    assert (got[-int((s == 0).sum()):] == 0).all()
    if kind != "float64":  # stable: equal scores (0.0 and -0.0 too) in index order
        assert np.array_equal(order, np.lexsort((np.arange(s.size), -np.abs(s))))


def test_a_bracket_that_misses_falls_back_to_two_reads(tmp_path):
    base, dirs, *_ = make_tiny_zoo(tmp_path / "z", dtype=torch.bfloat16)
    ex = Experts.from_dirs(base, dirs)
    want = model_selections(ex, 0.3, ["magnitude"], **KW)
    got, reads = scout_selections(ex, 0.3, ["magnitude"], **KW, max_window=1)  # no window fits
    _same(want, got)
    assert reads == 3


@pytest.mark.parametrize("selection", ["exact", "scout"])
def test_one_read_and_two_read_merges_are_bitwise_equal(tmp_path, selection):
    base, dirs, *_ = make_tiny_zoo(tmp_path / "z", dtype=torch.bfloat16)
    ex = Experts.from_dirs(base, dirs)
    params = dict(ffg_density=0.3, epsilon=1e-26, fallback_to_base=True)
    ref = merge(ex, "ota", selection="exact", **KW, **params)
    res = merge(ex, "ota", selection=selection, **KW, **params)
    for n in ex.tensor_names():
        assert torch.equal(ref.checkpoint[n], res.checkpoint[n]), n
    pd.testing.assert_frame_equal(ref.thresholds, res.thresholds)
    pd.testing.assert_frame_equal(ref.report, res.report)


def _tied_zoo(root, dtype):
    """Fisher scores with two values across the model (integer base, edits of
    +-0.5 and +-1, one constant moment): the threshold of any density lies on a
    value thousands of entries share, in every tensor."""
    from safetensors.torch import load_file, save_file

    base, dirs, *_ = make_tiny_zoo(root, dtype=dtype)
    g = torch.Generator().manual_seed(3)
    for f in sorted(base.glob("*.safetensors")):
        t = load_file(str(f))
        save_file({k: torch.randint(-4, 5, v.shape, generator=g).to(dtype) for k, v in t.items()}, str(f))
    b = {}
    for f in sorted(base.glob("*.safetensors")):
        b.update(load_file(str(f)))
    for d in dirs:
        for f in sorted(d.glob("*.safetensors")):
            t = load_file(str(f))
            step = torch.tensor([-1.0, -0.5, 0.5, 1.0])[torch.randint(0, 4, (1,), generator=g)]
            edits = {k: (b[k].float() + step * torch.randint(1, 3, v.shape, generator=g).float()
                         * torch.where(torch.rand(v.shape, generator=g) < 0.5, -1.0, 1.0)).to(dtype)
                     for k, v in t.items()}
            save_file(edits, str(f))
        m = load_file(str(d / "export" / "exp_avg_sq.safetensors"))
        save_file({k: torch.full_like(v, 1e-3) for k, v in m.items()}, str(d / "export" / "exp_avg_sq.safetensors"))
    return Experts.from_dirs(base, dirs)


@pytest.mark.parametrize("native_kernels", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_one_read_merge_keeps_the_first_ties_in_model_order(tmp_path, monkeypatch, dtype, native_kernels):
    """The merge itself hands out a one-read selection's tied entries (no count
    pass of its own): the same tensors as per-tensor quotas from two reads, on
    the C kernel and on the torch code, ties in every tensor."""
    from curvlens.math import native

    ex = _tied_zoo(tmp_path / "z", dtype)
    if not native_kernels:
        monkeypatch.setitem(native._STATE, "lib", None)
    params = dict(ffg_density=[0.3, 0.55, 0.8], epsilon=1e-26, fallback_to_base=True)
    ref = merge(ex, "ota", selection="exact", **KW, **params)
    res = merge(ex, "ota", selection="scout", **KW, **params)
    sel = res.extra["selections"]
    assert all(s.ledger is not None for s in sel), "the zoo must tie at every threshold"
    assert all(s.ledger.remaining == 0 for s in sel)
    # ties are kept in more than one tensor: the budget is handed on
    assert any(sum(1 for q in s.ledger.given.values() if q) > 1 for s in sel)
    for n in ex.tensor_names():
        assert torch.equal(ref.checkpoint[n], res.checkpoint[n]), n
    pd.testing.assert_frame_equal(ref.thresholds, res.thresholds)
    pd.testing.assert_frame_equal(ref.report, res.report)


def test_a_merge_that_meets_fewer_ties_than_its_selection_is_refused(tmp_path, monkeypatch):
    """The selection pass saw other scores than the merge: refused for the model
    (the density would not be kept), and nothing is written."""
    import curvlens.passes.merge as pm

    ex = _tied_zoo(tmp_path / "z", torch.float32)
    real = pm._model_wide

    def more_ties_than_exist(*a, **k):
        sel = real(*a, **k)
        sel[1].ledger.total += sel[1].tied
        sel[1].ledger.remaining += sel[1].tied
        return sel

    monkeypatch.setattr(pm, "_model_wide", more_ties_than_exist)
    out = tmp_path / "merged"
    with pytest.raises(CurvlensError, match="expert 'expert1' should keep .* tied at the threshold .*scores differ"):
        merge(ex, "ota", out, selection="scout", **KW, ffg_density=0.3, epsilon=1e-26)
    assert not out.exists()


def test_masks_from_a_one_read_selection_keep_exactly_k(tmp_path):
    base, dirs, *_ = make_tiny_zoo(tmp_path / "z", dtype=torch.bfloat16)
    ex = Experts.from_dirs(base, dirs)
    a = A.mask_stats(ex, densities=(0.3,), criteria=("magnitude",), **KW)
    total = sum(ex.reference.shape(n).numel() for n in ex.tensor_names(floating_only=True))
    for e, df in a.groupby("expert"):
        assert round(float((df.kept_frac * df.numel).sum())) == math.floor(0.3 * total + 0.5)
    assert a.attrs["reads"] == 2
    # a subset of tensors cannot hand out ties in model order: the two-read selection
    sub = A.mask_stats(ex, densities=(0.3,), criteria=("magnitude",), names=ex.tensor_names()[:3], **KW)
    assert sub.attrs["reads"] == 3
    pd.testing.assert_frame_equal(sub.reset_index(drop=True),
                                  a[a.name.isin(ex.tensor_names()[:3])].reset_index(drop=True))


class _maybe_warns:
    """Density 1 keeps entries scored 0 and says so; the scout must say the same."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings(record=True)
        self.log = self._ctx.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def test_partial_reads_read_just_the_chunks(tmp_path):
    base, dirs, weights, moments = make_tiny_zoo(tmp_path / "z", dtype=torch.bfloat16)
    ex = Experts.from_dirs(base, dirs, bias_correction=False)
    name = "model.layers.0.mlp.up_proj.weight"
    e = ex.experts[1]
    starts = np.array([0, 5, 40])
    got = e.checkpoint.chunks(name, starts, 7)
    flat = weights["expert1"][name].reshape(-1)
    assert torch.equal(got, torch.stack([flat[s:s + 7] for s in starts]))
    gv = e.moments.chunks(name, starts, 7)
    fv = moments["expert1"][name].reshape(-1)
    assert torch.equal(gv, torch.stack([fv[s:s + 7] for s in starts]))
    with pytest.raises(CurvlensError, match="outside the tensor"):
        e.checkpoint.chunks(name, [flat.numel() - 3], 7)
    in_memory = cl.Checkpoint.open({name: flat.reshape(12, 8)})
    assert not in_memory.partial_reads and torch.equal(in_memory.chunks(name, starts, 7), got)


def test_mask_stats_without_ranks_is_the_rest_of_the_frame(tmp_path):
    base, dirs, *_ = make_tiny_zoo(tmp_path / "z", n_experts=2)
    ex = Experts.from_dirs(base, dirs)
    full = A.mask_stats(ex, densities=(0.3,), **KW)
    fast = A.mask_stats(ex, densities=(0.3,), ranks=False, **KW)
    rank_cols = ["mask_rank", "mask_rank_at_least", "mask_effective_rank", "stable_rank", "rank_method"]
    rest = [c for c in full.columns if c not in rank_cols]
    pd.testing.assert_frame_equal(fast[rest], full[rest])
    assert fast[rank_cols[:4]].isna().all().all()
    assert set(fast.rank_method) == {"skipped", "none"} and set(full.rank_method) == {"exact", "none"}
