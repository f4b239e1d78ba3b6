"""Streaming analyses on the tiny hand-made zoo: schemas and known answers."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from curvlens import Checkpoint, CurvlensError, Experts
from curvlens.io.moments import Moments
from tests.math.oracles import moment_pair_metrics as pair_overlap
from curvlens.passes import analysis as A
from curvlens.studies import graft as G
from curvlens.config.merge import merge
from curvlens.passes.thresholds import model_thresholds

ID = ["name", "layer", "role", "numel"]
KW = dict(device="cpu", progress=False)
UP = "model.layers.0.mlp.up_proj.weight"  # (12, 8)


@pytest.fixture
def zoo(tiny_zoo):
    base_dir, dirs, weights, moments = tiny_zoo
    return Experts.from_dirs(base_dir, dirs), tiny_zoo


@pytest.fixture
def twins(tiny_zoo):
    """Two experts that are the same files."""
    base_dir, dirs, *_ = tiny_zoo
    return Experts.from_dirs(base_dir, [dirs[0], dirs[0]], names=["a", "b"])


# ------------------------------------------------------------------ schemas
def test_every_frame_has_its_pinned_columns(zoo):
    ex, (_, dirs, *_) = zoo
    merged = merge(ex, "linear", **KW)
    frames = {
        "curvature_stats": (A.curvature_stats(ex, **KW),
                            ["expert", *ID, "mean_log10", "median_log10", "q01", "q10", "q50", "q90", "q99",
                             "frac_zero", "bias_corrected", "sampled"]),
        "curvature_overlap": (A.curvature_overlap(ex, **KW),
                              ["expert_a", "expert_b", *ID, "cosine", "pearson_log", "spearman_log",
                               "jaccard_top1", "jaccard_top10", "excluded_zero", "spearman_sampled"]),
        "mask_stats": (A.mask_stats(ex, densities=(0.3,), **KW),
                       ["expert", "criterion", "density", *ID, "threshold", "kept_frac", "row_sparsity",
                        "col_sparsity", "mask_rank", "mask_rank_at_least", "mask_effective_rank", "stable_rank", "saliency_kept",
                        "rank_method"]),
        "mask_overlap": (A.mask_overlap(ex, 0.3, **KW),
                         ["expert_a", "expert_b", "criterion", "density", *ID, "jaccard"]),
        "interference": (A.interference(ex, **KW),
                         ["expert_a", "expert_b", *ID, "tv_cosine", "sign_conflict",
                          "curvature_weighted_conflict"]),
        "predicted_loss": (A.predicted_loss(ex, merged, **KW), ["expert", *ID, "predicted_loss_increase"]),
        "compare_merges": (A.compare_merges(ex, {"linear": merged}, **KW),
                           ["method", "expert", "predicted_loss_increase", "predicted_loss_of_base",
                            "relative_loss"]),
        "moment_compression": (A.moment_compression(ex, **KW),
                               ["expert", *ID, "rank", "rel_error_v", "rel_error_weights", "bytes_full",
                                "bytes_compressed"]),
        "graft_sweep": (G.graft_sweep(ex, (0.5,), evaluate=lambda sd: pd.DataFrame(
            {"capability": ["x"], "accuracy": [1.0]}), **KW),
                        ["expert", "criterion", "density", "capability", "score"]),
        "pooled_moments": (A.pooled_moments(ex, [UP], **KW),
                           ["expert", "name", "layer", "role", "row_block", "col_block", "log10_v", "mask_frac"]),
        "log10_histogram": (A.log10_histogram(ex, **KW), ["expert", "role", "bin_left", "bin_right", "count"]),
        "mask_thresholds": (A.mask_thresholds(ex, (0.2, 0.4), **KW),
                       ["expert", "criterion", "density", "threshold", "kept", "total", "realized_density",
                        "tied", "ties_kept"]),
    }
    for label, (df, cols) in frames.items():
        assert list(df.columns) == cols, label
        assert len(df) > 0, label
        if "layer" in df.columns:
            assert str(df["layer"].dtype) == "Int64", label
    n_float = len(ex.tensor_names(floating_only=True))
    assert len(frames["curvature_stats"][0]) == 3 * n_float
    assert len(frames["curvature_overlap"][0]) == 3 * n_float  # 3 pairs
    assert len(frames["mask_stats"][0]) == 3 * 2 * n_float  # experts x criteria x 1 density
    assert list(A.log10_histogram(ex, by=None, **KW).columns) == ["expert", "bin_left", "bin_right", "count"]
    assert list(G.ffg_vs_magnitude_summary(frames["graft_sweep"][0], {e: "x" for e in ex.names}).columns) == \
        ["expert", "capability", "density", "fisher", "magnitude", "fisher_ge_magnitude"]


# ---------------------------------------------------------- known answers
def test_identical_experts_overlap_perfectly(twins):
    ov = A.curvature_overlap(twins, **KW)
    assert (ov[["expert_a", "expert_b"]].drop_duplicates().values.tolist()) == [["a", "b"]]
    for col in ["cosine", "pearson_log", "spearman_log", "jaccard_top1", "jaccard_top10"]:
        np.testing.assert_allclose(ov[col], 1.0, rtol=0, atol=1e-12, err_msg=col)
    assert (A.mask_overlap(twins, 0.3, **KW)["jaccard"] == 1.0).all()
    it = A.interference(twins, **KW)
    assert (it["sign_conflict"] == 0).all() and (it["curvature_weighted_conflict"] == 0).all()
    np.testing.assert_allclose(it["tv_cosine"], 1.0, atol=1e-12)


@pytest.mark.parametrize("spearman_max", [None, 16])
def test_overlap_matches_the_pairwise_math(zoo, spearman_max):
    ex, (_, _, _, moments) = zoo
    ov = A.curvature_overlap(ex, pairs=[("expert2", "expert0")], spearman_max=spearman_max, **KW)
    assert len(ov) == len(ex.tensor_names(floating_only=True))
    for r in ov.itertuples():
        want = pair_overlap(moments["expert2"][r.name], moments["expert0"][r.name])
        assert (r.expert_a, r.expert_b) == ("expert2", "expert0")
        assert r.numel == want["numel"]
        for k in ["cosine", "pearson_log", "jaccard_top1", "jaccard_top10"]:
            assert getattr(r, k) == pytest.approx(want[k], abs=1e-6), (r.name, k)
        # the sampled Spearman is flagged; the exact one equals the math
        assert r.spearman_sampled == (spearman_max is not None and r.numel > spearman_max)
        if not r.spearman_sampled:
            assert r.spearman_log == pytest.approx(want["spearman_log"], abs=1e-9)


def test_curvature_stats_match_numpy(zoo):
    ex, (_, _, _, moments) = zoo
    cs = A.curvature_stats(ex, **KW)
    r = cs[(cs.expert == "expert1") & (cs.name == UP)].iloc[0]
    lg = np.log10(moments["expert1"][UP].double().numpy().ravel())
    assert r.mean_log10 == pytest.approx(lg.mean())
    assert r.q10 == pytest.approx(np.quantile(lg, 0.1)) and r.median_log10 == pytest.approx(np.median(lg))
    assert r.frac_zero == 0 and not r.sampled and not r.bias_corrected and r.numel == 96


def test_moment_levels_are_each_experts_mean_v_over_every_entry(zoo):
    ex, (_, _, _, moments) = zoo
    lv = A.moment_levels(ex, **KW).set_index("expert")
    assert list(lv.index) == ex.names
    for e in ex.names:
        vs = [v.double() for n, v in moments[e].items() if n in ex.tensor_names(floating_only=True)]
        numel = sum(v.numel() for v in vs)
        assert lv.loc[e, "numel"] == numel
        assert lv.loc[e, "mean_v"] == pytest.approx(float(sum(v.sum() for v in vs)) / numel, rel=1e-12)
    assert lv["level_ratio"].min() == 1.0 and (lv["level_ratio"] >= 1).all()
    # names= restricts the pass: one tensor gives that tensor's mean
    one = A.moment_levels(ex, names=[UP], **KW).set_index("expert")
    for e in ex.names:
        assert one.loc[e, "mean_v"] == pytest.approx(float(moments[e][UP].double().mean()), rel=1e-12)
        assert one.loc[e, "numel"] == moments[e][UP].numel()


def test_predicted_loss_is_zero_for_the_expert_itself_and_hand_computed(zoo):
    ex, (_, dirs, weights, moments) = zoo
    pl = A.predicted_loss(ex, dirs[1], **KW)
    assert (pl.loc[pl.expert == "expert1", "predicted_loss_increase"] == 0).all()
    assert (pl.loc[pl.expert != "expert1", "predicted_loss_increase"] > 0).all()
    # theta_merged = theta_0 + 0.5 on every entry: loss = 0.5 * sum v * 0.5**2
    shifted = {n: t + 0.5 for n, t in weights["expert0"].items()}
    pl = A.predicted_loss(ex, shifted, names=[UP], **KW)
    got = pl.loc[pl.expert == "expert0", "predicted_loss_increase"].item()
    assert got == pytest.approx(0.5 * 0.25 * float(moments["expert0"][UP].double().sum()), rel=1e-6)
    # compare_merges = model-level sums of predicted_loss
    res = merge(ex, "linear", **KW)
    cm = A.compare_merges(ex, {"linear": res, "expert1": dirs[1]}, **KW)
    per = A.aggregate(A.predicted_loss(ex, res, **KW), by=())
    lin = cm[cm.method == "linear"].set_index("expert")["predicted_loss_increase"]
    np.testing.assert_allclose(lin[per.expert].values, per.predicted_loss_increase.values, rtol=1e-12)
    assert cm.loc[(cm.method == "expert1") & (cm.expert == "expert1"), "predicted_loss_increase"].item() == 0
    # the base as a "merge" loses the whole fine-tune: relative loss exactly 1
    cm = A.compare_merges(ex, {"base": ex.base, "linear": res}, **KW)
    base_rows = cm[cm.method == "base"]
    np.testing.assert_allclose(base_rows["relative_loss"], 1.0, rtol=1e-12)
    np.testing.assert_allclose(base_rows["predicted_loss_increase"], base_rows["predicted_loss_of_base"], rtol=1e-12)
    lin = cm[cm.method == "linear"]
    np.testing.assert_allclose(lin["relative_loss"], lin["predicted_loss_increase"] / lin["predicted_loss_of_base"])


def test_interference_against_a_merged_model(zoo):
    ex, (_, dirs, *_) = zoo
    it = A.interference(ex, merged=dirs[0], **KW)
    pairs = it[["expert_a", "expert_b"]].drop_duplicates().values.tolist()
    assert pairs == [["expert0", "expert1"], ["expert0", "expert2"], ["expert1", "expert2"],
                     ["expert0", "merged"], ["expert1", "merged"], ["expert2", "merged"]]
    own = it[(it.expert_a == "expert0") & (it.expert_b == "merged")]
    assert (own.sign_conflict == 0).all() and (own.curvature_weighted_conflict == 0).all()
    np.testing.assert_allclose(own.tv_cosine, 1.0, atol=1e-12)


def test_mask_kept_fraction_is_the_realised_density(zoo):
    ex, _ = zoo
    ms = A.mask_stats(ex, densities=(0.1, 0.35), **KW)
    model = A.aggregate(ms, by=())
    for c in ("fisher", "magnitude"):
        for d in (0.1, 0.35):
            t = model_thresholds(ex, d, criterion=c, **KW).set_index("expert")
            got = model[(model.criterion == c) & (model.density == d)].set_index("expert")
            np.testing.assert_allclose(got.loc[t.index, "kept_frac"], t["realized_density"], rtol=1e-12)
            np.testing.assert_allclose(ms[(ms.criterion == c) & (ms.density == d)].groupby("expert")
                                       ["threshold"].first()[t.index], t["threshold"])
    # one pass, several densities == one model_thresholds call per density
    multi = A.mask_thresholds(ex, (0.1, 0.35), "fisher", **KW)
    single = pd.concat([model_thresholds(ex, d, **KW) for d in (0.1, 0.35)])
    pd.testing.assert_frame_equal(multi.sort_values(["expert", "density"]).reset_index(drop=True),
                                  single.sort_values(["expert", "density"]).reset_index(drop=True))
    # layer x role pooling keeps the NA layer (embeddings, head) as its own group
    by_lr = A.aggregate(ms, by=("layer", "role"))
    assert by_lr["layer"].isna().any() and {"expert", "criterion", "density"} <= set(by_lr.columns)


def test_masks_are_the_merge_engines_masks(zoo):
    ex, _ = zoo
    masks = A.ffg_masks(ex, density=0.25, **KW)
    res = merge(ex, "ota", **KW, ffg_density=0.25, fallback_to_base=True)
    np.testing.assert_array_equal(masks.thresholds["threshold"], res.thresholds["threshold"])
    report = res.report.set_index("name")
    n = 0
    for name, ms in masks:
        n += 1
        for e, m in ms.items():
            assert m.dtype == torch.bool
            assert float(m.float().mean()) == pytest.approx(report.loc[name, f"kept_{e}"])
    assert n == len(masks) == len(ex.tensor_names(floating_only=True))
    one = masks[UP]
    assert set(one) == set(ex.names) and one["expert0"].shape == (12, 8)
    fixed = A.ffg_masks(ex, threshold=masks.thresholds["threshold"].tolist(), **KW)
    assert torch.equal(fixed[UP]["expert2"], one["expert2"])


def test_magnitude_reads_no_moments(tiny_zoo, monkeypatch):
    base_dir, dirs, *_ = tiny_zoo
    bare = Experts.from_dirs(base_dir, dirs, moments=False)
    ms = A.mask_stats(bare, densities=(0.3,), criteria="magnitude", **KW)
    assert ms["saliency_kept"].isna().all() and (ms.criterion == "magnitude").all()
    with pytest.raises(CurvlensError, match="second moments"):
        A.mask_stats(bare, densities=(0.3,), **KW)  # fisher is a default criterion
    # with moments on disk, the magnitude criterion still does not read them
    ex = Experts.from_dirs(base_dir, dirs)
    reads = []
    orig = Moments.__getitem__
    monkeypatch.setattr(Moments, "__getitem__", lambda self, n: reads.append(n) or orig(self, n))
    same = A.mask_stats(ex, densities=(0.3,), criteria=("magnitude",), **KW)
    list(A.ffg_masks(ex, density=0.3, criterion="magnitude", **KW))
    G.graft_sweep(ex, (0.3,), criteria="magnitude", evaluate=lambda sd: pd.DataFrame(
        {"capability": ["x"], "score": [0.0]}), **KW)
    assert reads == []
    pd.testing.assert_frame_equal(same, ms)


def test_graft_is_base_plus_masked_edit_and_density_one_is_the_expert(zoo):
    ex, (base_dir, dirs, weights, _) = zoo
    seen = []

    def evaluate(sd):
        seen.append(sd)
        # a score that identifies the model: its distance to expert1
        d = sum(float((sd[n].float() - weights["expert1"][n]).abs().sum()) for n in sd)
        return pd.DataFrame({"capability": ["dist", "const"], "accuracy": [d, 1.0]})

    sw = G.graft_sweep(ex.subset(["expert1"]), (0.4, 1.0), evaluate=evaluate, **KW)
    assert len(seen) == 3  # the expert once, then one graft per criterion
    assert sw[sw.density == 1.0].score.tolist() == [0.0, 1.0, 0.0, 1.0]
    mask = A.ffg_masks(ex.subset(["expert1"]), density=0.4, **KW)[UP]["expert1"]
    base = ex.base
    want = torch.where(mask, weights["expert1"][UP], base[UP])
    assert torch.equal(seen[1][UP], want)
    assert set(seen[0]) == set(ex.tensor_names()) and all(torch.equal(seen[0][n], weights["expert1"][n])
                                                         for n in seen[0])
    summ = G.ffg_vs_magnitude_summary(sw, {"expert1": "const"})
    assert summ.fisher_ge_magnitude.all() and summ.density.tolist() == [0.4, 1.0]


def test_moment_compression_known_answers(zoo):
    ex, (_, _, _, moments) = zoo
    mc = A.moment_compression(ex, rank=1, **KW)
    vec = mc[mc.name == "model.norm.weight"]
    assert vec["rank"].isna().all() and (vec.rel_error_v == 0).all() and (vec.rel_error_weights == 0).all()
    assert (vec.bytes_full == vec.bytes_compressed).all()
    up = mc[(mc.name == UP) & (mc.expert == "expert0")].iloc[0]
    assert up.bytes_full == 96 * 4 and up.bytes_compressed == (12 + 8) * 4 and up["rank"] == 1
    v = moments["expert0"][UP].double()
    approx = torch.outer(v.sum(1), v.sum(0)) / v.sum()
    assert up.rel_error_v == pytest.approx(float((approx - v).norm() / v.norm()), rel=1e-5)
    assert up.rel_error_weights == pytest.approx(float((approx.sqrt() - v.sqrt()).norm() / v.sqrt().norm()),
                                                 rel=1e-5)
    full = A.moment_compression(ex, rank=8, names=[UP], **KW)  # rank 8 = full rank of a 12 x 8
    assert (full.rel_error_v < 1e-5).all()
    with pytest.raises(CurvlensError, match="rank must be an int >= 1"):
        A.moment_compression(ex, rank=0, **KW)


def test_pooled_moments_are_block_means(zoo):
    ex, (_, _, _, moments) = zoo
    pm = A.pooled_moments(ex, UP, block=(4, 3), masks_density=0.3, **KW)
    e0 = pm[pm.expert == "expert0"]
    assert len(e0) == 3 * 3 and e0.row_block.max() == 2 and e0.col_block.max() == 2
    lg = np.log10(moments["expert0"][UP].double().numpy() + 1e-30)
    r = e0[(e0.row_block == 1) & (e0.col_block == 2)].iloc[0]
    assert r.log10_v == pytest.approx(lg[4:8, 6:8].mean())  # the last column block is 2 wide
    mask = A.ffg_masks(ex, density=0.3, **KW)[UP]["expert0"].double().numpy()
    assert r.mask_frac == pytest.approx(mask[4:8, 6:8].mean())
    small = A.pooled_moments(ex, [UP, "model.norm.weight"], max_blocks=4, **KW)
    assert small.mask_frac.isna().all()
    assert len(small[(small.expert == "expert1") & (small.name == UP)]) == 4 * 4
    assert len(small[(small.expert == "expert1") & (small.name == "model.norm.weight")]) == 4  # one row


def test_log10_histogram_matches_numpy(zoo):
    ex, (_, _, _, moments) = zoo
    bins = np.linspace(-6, -3, 7)
    h = A.log10_histogram(ex, bins=bins, by="layer", **KW)
    names = [n for n in moments["expert2"] if ".layers.1." in n]
    vals = np.concatenate([np.log10(moments["expert2"][n].double().numpy().ravel()) for n in names])
    got = h[(h.expert == "expert2") & (h.layer == 1)]["count"].to_numpy()
    np.testing.assert_array_equal(got, np.histogram(vals, bins)[0])
    assert h.groupby(["expert"], dropna=False).size().eq(3 * 6).all()  # embed/head (NA), layer 0, layer 1


def test_aggregate_weights_skips_nan_and_sums_additive():
    df = pd.DataFrame({"expert": ["a"] * 3, "name": ["x", "y", "z"],
                       "layer": pd.array([0, 0, None], dtype="Int64"), "role": ["q", "norm", "embed"],
                       "numel": [6, 2, 4], "mask_rank": [3.0, math.nan, 1.0],
                       "predicted_loss_increase": [1.0, 2.0, 3.0], "rank_method": ["exact", "none", "exact"]})
    by_layer = A.aggregate(df, by=("layer",))
    assert list(by_layer.columns) == ["expert", "layer", "numel", "mask_rank", "predicted_loss_increase"]
    assert by_layer["mask_rank"].tolist() == [3.0, 1.0]  # the NaN row does not dilute layer 0
    assert by_layer["predicted_loss_increase"].tolist() == [3.0, 3.0] and by_layer.numel.tolist() == [8, 4]
    model = A.aggregate(df, by=())
    assert model.mask_rank.item() == pytest.approx((3 * 6 + 4) / 10)
    with pytest.raises(CurvlensError, match="by: column"):
        A.aggregate(df, by=("nope",))


def test_bad_inputs_name_the_culprit(zoo, tmp_path):
    ex, (base_dir, dirs, weights, moments) = zoo
    with pytest.raises(CurvlensError, match="unknown expert 'nobody'"):
        A.curvature_overlap(ex, pairs=[("expert0", "nobody")], **KW)
    with pytest.raises(CurvlensError, match="two different experts"):
        A.interference(ex, pairs=[("expert0", "expert0")], **KW)
    with pytest.raises(CurvlensError, match=r"densities: every density must be in \(0, 1\]"):
        A.mask_stats(ex, densities=(0.0,), **KW)
    with pytest.raises(CurvlensError, match="criterion='l1'"):
        A.mask_stats(ex, criteria=("l1",), **KW)
    with pytest.raises(CurvlensError, match="evaluate must be a callable"):
        G.graft_sweep(ex, (0.5,), **KW)
    with pytest.raises(CurvlensError, match="exactly one of density= and threshold="):
        A.ffg_masks(ex, **KW)
    bad = dict(weights["expert0"])
    bad[UP] = torch.zeros(3, 3)
    with pytest.raises(CurvlensError, match=r"merged model 'merged'.*up_proj.*shape \(3, 3\)"):
        A.predicted_loss(ex, bad, **KW)
    with pytest.raises(CurvlensError, match="evaluate.*expert 'expert0'.*capability"):
        G.graft_sweep(ex, (1.0,), criteria="magnitude", evaluate=lambda sd: pd.DataFrame({"x": [1]}), **KW)
    nan_m = {n: t.clone() for n, t in moments["expert1"].items()}
    nan_m[UP][0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file(nan_m, str(tmp_path / "nan.safetensors"))
    broken = Experts.from_dirs(base_dir, dirs[:2], moments=[dirs[0], tmp_path / "nan.safetensors"])
    with pytest.raises(CurvlensError, match=r"expert 'expert1', tensor '.*up_proj.weight'.*NaN"):
        A.curvature_overlap(broken, **KW)


def test_aggregate_weights_overlap_statistics_by_their_support():
    # an embedding whose 98 of 100 entries are zero in both experts must weigh
    # 2 entries, not 100, in a model-level Jaccard; excluded counts add up
    df = pd.DataFrame({"expert_a": ["a", "a"], "expert_b": ["b", "b"], "name": ["emb", "q"],
                       "layer": pd.array([None, 0], dtype="Int64"), "role": ["embed", "q"],
                       "numel": [100, 10], "cosine": [1.0, 0.0], "jaccard_top10": [1.0, 0.0],
                       "excluded_zero": [98, 0]})
    row = A.aggregate(df, by=()).iloc[0]
    assert row["jaccard_top10"] == pytest.approx(2 / 12)
    assert row["cosine"] == pytest.approx(100 / 110)
    assert row["excluded_zero"] == 98


def test_thin_ffn_mask_ranks_are_exact_on_a_cpu():
    """A 1536 x 384 FFN matrix (590k entries) costs one 0.1 s SVD: its rank is
    computed exactly, not bounded by a sketch (MiniLM's shape, where a sketch of 32
    once read as the rank)."""
    from curvlens.passes.experts import Expert

    g = torch.Generator().manual_seed(0)
    base = {"layer.0.intermediate.dense.weight": torch.zeros(1536, 384)}
    exs = []
    for i in range(2):
        w = {k: torch.randn(v.shape, generator=g) for k, v in base.items()}
        v = {k: torch.rand(t.shape, generator=g) for k, t in w.items()}
        exs.append(Expert(f"e{i}", Checkpoint.open(w), Moments.open(v)))
    ms = A.mask_stats(Experts(base, exs), densities=[0.3], criteria=["fisher"], device="cpu", progress=False)
    assert (ms["rank_method"] == "exact").all() and (ms["mask_rank"] == 384).all()
    assert (ms["mask_rank_at_least"] == 384).all()
    # an explicit entry limit still bounds it, and says so
    ms = A.mask_stats(Experts(base, exs), densities=[0.3], criteria=["fisher"], device="cpu", progress=False,
                      rank_exact_max=1000)
    assert ms["mask_rank"].isna().all() and (ms["mask_rank_at_least"] == 32).all()
