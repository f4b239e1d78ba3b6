"""Nothing wrong is accepted silently on the merge and analysis paths: bad values,
bad YAML, overflowing outputs; and every model-wide selection keeps exactly the
requested count on bf16 weights, where scores tie by the thousand."""
import importlib.util
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from curvlens import CurvlensError, Experts
from curvlens.cli import main
from curvlens.passes import analysis as A
from curvlens.studies import graft as G
from curvlens.config.merge import merge
from curvlens.config.merge_config import load_merge_config
from curvlens.passes.thresholds import model_selections
from tests.conftest import make_tiny_zoo

UP = "model.layers.0.mlp.up_proj.weight"
KW = {"device": "cpu", "progress": False}


def _with_moments(tmp_path, dirs, i, fill):
    """Expert ``i``'s moments with one entry of UP replaced by ``fill``."""
    from curvlens import Moments

    m = Moments.open(dirs[i])
    v = {n: m[n].clone() for n in m}
    v[UP][0, 1] = fill
    save_file(v, str(tmp_path / f"bad{i}.safetensors"))
    return tmp_path / f"bad{i}.safetensors"


@pytest.mark.parametrize("fill, what", [(float("nan"), "1 NaN"), (float("inf"), "1 Inf"), (-1.0, "1 negative")])
@pytest.mark.parametrize("run", ["fisher", "ota", "ota_ffg", "curvature_overlap", "mask_stats", "interference"])
def test_bad_moments_stop_merges_and_analyses(tmp_path, fill, what, run):
    base, dirs, *_ = make_tiny_zoo(tmp_path / "z", n_experts=2)
    bad = _with_moments(tmp_path, dirs, 1, fill)
    ex = Experts.from_dirs(base, dirs, moments=[dirs[0], bad])
    calls = {
        "fisher": lambda: merge(ex, "fisher", tmp_path / "o", **KW),
        "ota": lambda: merge(ex, "ota", tmp_path / "o", **KW),
        "ota_ffg": lambda: merge(ex, "ota", tmp_path / "o", ffg_density=0.3, **KW),
        "curvature_overlap": lambda: A.curvature_overlap(ex, **KW),
        "mask_stats": lambda: A.mask_stats(ex, densities=0.3, **KW),
        "interference": lambda: A.interference(ex, **KW),
    }
    with pytest.raises(CurvlensError, match=rf"expert 'expert1', tensor '{UP}': {what}"):
        calls[run]()
    assert not (tmp_path / "o").exists()
    # the pass's helper threads (mask ranks, selection sweeps, writes) stopped with it
    assert not [t for t in threading.enumerate() if t.name.startswith(("curvlens-bg", "curvlens-write"))]


@pytest.mark.parametrize("who", ["base", "expert"])
def test_non_finite_weights_are_refused(tmp_path, who):
    base, dirs, weights, _ = make_tiny_zoo(tmp_path / "z", n_experts=2)
    from safetensors.torch import save_file

    src = dict(weights["expert0"]) if who == "expert" else {n: t for n, t in Experts.from_dirs(
        base, dirs).base.items()}
    src = {n: t.clone() for n, t in src.items()}
    src[UP][1, 1] = float("nan")
    bad = tmp_path / "bad"  # written as a stranger would: curvlens itself never writes a NaN
    bad.mkdir()
    save_file(src, str(bad / "model.safetensors"))
    if who == "expert":
        ex = Experts.from_dirs(base, [bad, dirs[1]], moments=[dirs[0], dirs[1]])
        label = "expert 'bad'"
    else:
        ex = Experts.from_dirs(bad, dirs)
        label = "the base model"
    with pytest.raises(CurvlensError, match=rf"{label}, tensor '{UP}': 1 NaN"):
        merge(ex, "task_arithmetic", **KW)


def test_merged_values_that_overflow_fp16_are_refused(tmp_path):
    from curvlens.io.writer import write_model

    base = write_model({"w": torch.zeros(4)}, tmp_path / "b")
    e1 = write_model({"w": torch.tensor([1.0, 2.0, 7e4, 3.0])}, tmp_path / "e1")
    e2 = write_model({"w": torch.tensor([1.0, 2.0, 7e4, 3.0])}, tmp_path / "e2")
    ex = Experts.from_dirs(base, [e1, e2], moments=False)
    with pytest.raises(CurvlensError, match=r"tensor 'w': a merged value \(1.4e\+05\) overflows the output dtype "
                                            r"float16"):
        merge(ex, "task_arithmetic", tmp_path / "o", dtype="float16", **KW)
    assert not (tmp_path / "o").exists()
    res = merge(ex, "task_arithmetic", dtype="bfloat16", **KW)
    assert torch.isfinite(res.checkpoint["w"].float()).all()


def test_output_dtype_is_the_experts_not_the_base(tmp_path):
    from curvlens.io.writer import write_model

    base = write_model({"w": torch.zeros(4)}, tmp_path / "b")  # fp32 base
    es = [write_model({"w": torch.ones(4, dtype=torch.bfloat16)}, tmp_path / f"e{i}") for i in range(2)]
    res = merge(Experts.from_dirs(base, es, moments=False), "task_arithmetic", **KW)
    assert res.checkpoint.dtype("w") == torch.bfloat16


# ----------------------------------------------------------------------- YAML
def _yaml(tmp_path, text):
    base, dirs, *_ = make_tiny_zoo(tmp_path / "z", n_experts=2)
    f = tmp_path / "c.yml"
    f.write_text(text.format(base=base, e0=dirs[0], e1=dirs[1]))
    return f


@pytest.mark.parametrize("text, match", [
    ("merge_method: ties\nbase_model: {base}\nparameters: [1, 2]\nmodels:\n  - model: {e0}\n  - model: {e1}\n",
     "'parameters' must be a mapping"),
    ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {e0}\n    parameters: dense\n  - model: {e1}\n",
     r"models\[0\].parameters must be a mapping"),
    ("merge_method: ota\nbase_model: {base}\nparameters: {{fallback_to_base: 'false'}}\nmodels:\n  - model: {e0}\n"
     "  - model: {e1}\n", "fallback_to_base must be true or false; got 'false'"),
    ("merge_method: ota\nparameters: {{bias_correction: 'false'}}\nmodels:\n  - model: {e0}\n  - model: {e1}\n",
     "'bias_correction' must be true or false"),
    ("merge_method: linear\nmodels:\n  - model: {e0}\n  - model: {e0}/.\n",
     r"models\[0\] and models\[1\] are the same model"),
    ("merge_method: linear\nmodels:\n  - model: {e0}\n  - model: {e1}\ndtype: 16\n",
     "dtype/out_dtype must be a string"),
    ("merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {e0}\n    parameters: {{density: abc}}\n"
     "  - model: {e1}\n", "density"),
])
def test_bad_yaml_is_a_curvlens_error_and_one_cli_line(tmp_path, capsys, text, match):
    f = _yaml(tmp_path, text)
    with pytest.raises(CurvlensError, match=match):
        cfg = load_merge_config(f)
        merge(cfg.experts(), cfg.method, dtype=cfg.dtype, **KW, **cfg.params)
    assert main(["merge", str(f), str(tmp_path / "out"), "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("curvlens: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_out_dtype_is_the_written_dtype(tmp_path):
    f = _yaml(tmp_path, "merge_method: linear\nmodels:\n  - model: {e0}\n  - model: {e1}\n"
                        "dtype: float32\nout_dtype: bfloat16\n")
    assert load_merge_config(f).dtype == "bfloat16"


def test_cli_error_is_one_line_without_traceback():
    r = subprocess.run([sys.executable, "-m", "curvlens.cli", "merge", "/nonexistent.yml", "/tmp/x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("curvlens: error:") and r.stderr.count("\n") == 1


# --------------------------------------------------------- exact bf16 densities
def _bf16_zoo(tmp_path):
    base, dirs, weights, moments = make_tiny_zoo(tmp_path / "z", n_experts=2, dtype=torch.bfloat16)
    return Experts.from_dirs(base, dirs), weights, moments


def _all_scores(ex, criterion, i):
    out = []
    for g in ex.iter_tensors(ex.tensor_names(floating_only=True), device="cpu", progress=False):
        tau = g.experts[i].float() - g.base.float()
        out.append((g.moments[i] * tau.square() if criterion == "fisher" else tau.abs()).reshape(-1))
    return torch.cat(out)


@pytest.mark.parametrize("criterion", ["fisher", "magnitude"])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.9, 1.0])
def test_selection_keeps_exactly_the_requested_count_on_bf16(tmp_path, criterion, density):
    ex, *_ = _bf16_zoo(tmp_path)
    sel = model_selections(ex, density, [criterion], **KW)
    for i, e in enumerate(ex.names):
        s = sel[criterion, e, density]
        scores = _all_scores(ex, criterion, i)
        k = int(density * scores.numel() + 0.5)
        assert s.k == k and s.total == scores.numel()
        assert int((scores > s.threshold).sum()) < k <= int((scores >= s.threshold).sum())
        kept = sum(int(s.mask(n, g).sum()) for n, g in _per_tensor(ex, criterion, i))
        assert kept == k
    if criterion == "magnitude" and density == 0.3:
        assert any(sel[criterion, e, density].tied > 1 for e in ex.names)  # the case the rule is for


def _per_tensor(ex, criterion, i):
    for g in ex.iter_tensors(ex.tensor_names(floating_only=True), device="cpu", progress=False):
        tau = g.experts[i].float() - g.base.float()
        yield g.name, (g.moments[i] * tau.square() if criterion == "fisher" else tau.abs())


def test_exact_zeros_beyond_the_nonzero_share(tmp_path):
    """Half the saliencies exactly zero: density 0.75 still keeps exactly 75%."""
    from curvlens.io.writer import write_model

    base = write_model({"w": torch.zeros(8)}, tmp_path / "b")
    e = write_model({"w": torch.tensor([1.0, 0, 2.0, 0, 3.0, 0, 4.0, 0])}, tmp_path / "e")
    (e / "export").mkdir()
    save_file({"w": torch.ones(8)}, str(e / "export" / "exp_avg_sq.safetensors"))
    ex = Experts.from_dirs(base, [e])
    with pytest.warns(UserWarning, match=r"only 4 of 8 entries \(0.500\) have a non-zero score, so 2 entries"):
        s = model_selections(ex, 0.75, ["fisher"], **KW)["fisher", "e", 0.75]
    assert (s.threshold, s.k, s.tied, s.ties(("w"))) == (0.0, 6, 4, 2)
    with pytest.warns(UserWarning, match="non-zero score"):
        res = merge(ex, "ota", ffg_density=0.75, **KW)
    assert res.report["kept_e"].iloc[0] == 0.75
    # the base is all zero here: a relative change is undefined, not 1e26
    assert res.report["delta_norm"].iloc[0] > 0 and np.isnan(res.report["rel_delta"].iloc[0])


def test_merge_and_analyses_keep_the_same_exact_masks_on_bf16(tmp_path):
    ex, *_ = _bf16_zoo(tmp_path)
    res = merge(ex, "ota", ffg_density=0.3, **KW)
    r = res.report
    stats = A.mask_stats(ex, densities=0.3, criteria="fisher", **KW)
    masks = A.ffg_masks(ex, density=0.3, **KW)
    for e in ex.names:
        k = int(res.thresholds.set_index("expert").loc[e, "kept"])
        assert int(round((r[f"kept_{e}"] * r.numel).sum())) == k
        st = stats[stats.expert == e]
        assert int(round((st.kept_frac * st.numel).sum())) == k
        assert sum(int(m[e].sum()) for _, m in masks) == k
        per = dict(zip(st.name, st.kept_frac))
        assert all(abs(per[n] - f) < 1e-12 for n, f in zip(r.name, r[f"kept_{e}"]) if n in per)


MAKE_ZOO = Path(__file__).parents[3] / "shared" / "bench" / "make_zoo.py"


@pytest.mark.skipif(not MAKE_ZOO.is_file(), reason="../shared/bench/make_zoo.py is not beside this checkout")
def test_bf16_benchmark_zoo_realized_density_equals_request(tmp_path):
    """The issue's case: on a make_zoo (bf16) zoo, every criterion keeps exactly its share."""
    spec = importlib.util.spec_from_file_location("make_zoo", MAKE_ZOO)
    subprocess.run([sys.executable, str(MAKE_ZOO), str(tmp_path / "zoo"), "--hidden", "64", "--layers", "2",
                    "--inter", "160", "--vocab", "500", "--experts", "2"], check=True, capture_output=True,
                   timeout=300)
    assert spec is not None
    dirs = sorted(p for p in (tmp_path / "zoo").iterdir() if p.name != "base")
    ex = Experts.from_dirs(tmp_path / "zoo" / "base", dirs)
    assert ex.base.dtype("model.embed_tokens.weight") == torch.bfloat16
    df = A.mask_stats(ex, densities=(0.1, 0.3), rank_exact_max=0, sketch_size=2, **KW)
    df["kept"] = df.kept_frac * df.numel
    g = df.groupby(["expert", "criterion", "density"]).agg(kept=("kept", "sum"), numel=("numel", "sum"))
    want = [int(d * n + 0.5) for d, n in zip(g.index.get_level_values("density"), g.numel)]
    assert [int(round(k)) for k in g.kept] == want
    assert len(g) == 8


# -------------------------------------------------------- wrong types, public API
ANALYSES = {"curvature_stats": (), "curvature_overlap": (), "moment_compression": (), "log10_histogram": (),
            "pooled_moments": (None,), "interference": (), "predicted_loss": ({},), "compare_merges": ({},),
            "mask_stats": (), "mask_thresholds": ((0.5,),), "mask_overlap": (0.5,), "ffg_masks": (0.5,)}


@pytest.mark.parametrize("fn", sorted(ANALYSES))
@pytest.mark.parametrize("bad", ["some/dir", ["a", "b"], None])
def test_analyses_given_something_else_than_experts(fn, bad):
    with pytest.raises(CurvlensError, match="takes an Experts"):
        getattr(A, fn)(bad, *ANALYSES[fn], **KW)


def test_merge_and_from_dirs_given_wrong_types(tmp_path):
    base, dirs, *_ = make_tiny_zoo(tmp_path / "z", n_experts=2)
    with pytest.raises(CurvlensError, match="merge takes an Experts"):
        merge(str(base), "linear", **KW)
    with pytest.raises(CurvlensError, match="method must be a method name"):
        merge(Experts.from_dirs(base, dirs), 3, **KW)
    with pytest.raises(CurvlensError, match="dirs must be a list of expert dirs"):
        Experts.from_dirs(base, str(dirs[0]))
    with pytest.raises(CurvlensError, match="sweep must be a graft_sweep DataFrame"):
        G.ffg_vs_magnitude_summary("x", {})


def test_ota_refuses_a_tie_quota_the_scores_cannot_fill():
    from curvlens.math.methods import get_method

    ota = get_method("ota").fn
    base, v = torch.zeros(4), [torch.ones(4)]
    ex = [torch.tensor([1.0, 2.0, 1.0, 3.0])]
    out = ota(base, ex, v, ffg_threshold=[1.0], ffg_ties=[1], fallback_to_base=True)  # keeps 2.0, 3.0 and the first 1.0
    assert out.tolist() == [1.0, 2.0, 0.0, 3.0]
    with pytest.raises(CurvlensError, match="should keep 3 entries tied"):
        ota(base, ex, v, ffg_threshold=[1.0], ffg_ties=[3])
    with pytest.raises(CurvlensError, match="ffg_ties is given for expert"):
        ota(base, ex, v, ffg_ties=[1])


def test_a_capped_rank_is_a_bound_in_its_own_column_never_a_rank(tmp_path):
    base, dirs, *_ = make_tiny_zoo(tmp_path / "z", n_experts=2)
    ex = Experts.from_dirs(base, dirs)
    exact = A.mask_stats(ex, densities=0.5, criteria="fisher", **KW)
    mats = exact[exact.rank_method == "exact"]
    assert len(mats) and (mats.mask_rank_at_least == mats.mask_rank).all()
    capped = A.mask_stats(ex, densities=0.5, criteria="fisher", rank_exact_max=0, sketch_size=2, **KW)
    big = capped[(capped.rank_method == "randomized") & capped.mask_rank.isna()]
    assert len(big) and (big.mask_rank_at_least == 2).all()  # "at least 2", not "rank 2"
    assert big.mask_effective_rank.isna().all()
    # where the bound is not hit, both columns agree with the exact rank
    merged = capped.merge(exact, on=["expert", "name"], suffixes=("", "_exact"))
    known = merged[merged.mask_rank.notna() & (merged.rank_method == "randomized")]
    assert (known.mask_rank == known.mask_rank_exact).all()
