"""Regime statistics and the paper's findings, on hand-made frames and a tiny zoo."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from curvlens import Checkpoint, Experts
from curvlens.io.moments import Moments
from curvlens.passes.experts import Expert
from curvlens.studies.findings import (
    HOLDS, NOT, PARTLY, UNTESTED, finding_grafting, finding_masks, finding_merges, finding_overlap, findings,
)
from curvlens.studies.regime import edit_norms, regime_table, regime_verdict, relative_edit


def _experts(scale):
    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),
            "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g)}
    exs = []
    for i, s in enumerate(scale):
        w = {k: v + s * torch.randn(v.shape, generator=g) for k, v in base.items()}
        exs.append(Expert(f"e{i}", Checkpoint.open(w), Moments.open({k: torch.rand(v.shape) for k, v in w.items()})))
    return base, Experts(base, exs)


def test_relative_edit_is_the_norm_ratio_over_the_model_and_per_role():
    base, ex = _experts([0.01, 0.2])
    norms = edit_norms(ex, device="cpu", progress=False)
    rel = relative_edit(norms).set_index("expert")["relative_edit"]
    for e in ex.names:
        d = sum(float((ex[e].checkpoint[n].double() - base[n].double()).square().sum()) for n in base)
        b = sum(float(base[n].double().square().sum()) for n in base)
        assert rel[e] == pytest.approx(math.sqrt(d / b), rel=1e-12)
    by_role = relative_edit(norms, by=("role",))
    assert set(by_role.role) == {"q", "up"}
    t = regime_table(norms)
    assert set(t.scope) == {"expert", "role"}
    assert regime_verdict(t).startswith("large edits")  # e1 moved 0.2 of the weights' scale
    _, small = _experts([0.01, 0.02])
    assert regime_verdict(regime_table(edit_norms(small, device="cpu", progress=False))).startswith("small edits")


def test_regime_table_carries_pairs_and_retention():
    norms = pd.DataFrame({"expert": ["a", "b"], "name": "x", "layer": pd.array([0, 0], dtype="Int64"),
                          "role": "q", "numel": 4, "delta_sq": [0.01, 0.04], "base_sq": 1.0})
    inter = pd.DataFrame({"expert_a": ["a"], "expert_b": ["b"], "name": ["x"], "layer": pd.array([0], dtype="Int64"),
                          "role": ["q"], "numel": [4], "tv_cosine": [0.25]})
    scores = pd.DataFrame({"model": ["expert: a", "expert: b", "m", "m"], "capability": ["x", "y", "x", "y"],
                           "accuracy": [1.0, 0.5, 0.5, 0.5]})
    t = regime_table(norms, interference=inter, scores=scores, capabilities={"a": "x", "b": "y"}).set_index(
        ["scope", "subject", "metric"])["value"]
    assert t["expert", "b", "relative_edit"] == pytest.approx(0.2)
    assert t["pair", "a / b", "tv_cosine"] == 0.25
    assert t["merge", "m", "mean_retention"] == 0.75 and t["merge", "m", "worst_retention"] == 0.5


def _sweep(ffg, mag, densities=(0.1, 0.3, 0.5)):
    rows = []
    for e, (fs, ms) in {"a": (ffg, mag)}.items():
        for d, f, m in zip(densities, fs, ms):
            rows += [{"expert": e, "criterion": "fisher", "density": d, "capability": "x", "score": f},
                     {"expert": e, "criterion": "magnitude", "density": d, "capability": "x", "score": m}]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("ffg, mag, verdict", [
    ((0.95, 1.0, 1.0), (0.1, 0.5, 0.95), HOLDS),     # FFG keeps 90% at 0.1, magnitude only at 0.5
    ((0.5, 0.95, 1.0), (0.1, 0.95, 1.0), NOT),       # both at 0.3
    ((0.1, 0.2, 0.3), (0.1, 0.2, 0.3), NOT),          # neither keeps it anywhere
])
def test_grafting_finding(ffg, mag, verdict):
    from curvlens.studies.graft import GRAFT_SWEEP_COLUMNS

    sweep = _sweep(ffg, mag)
    for c in GRAFT_SWEEP_COLUMNS:
        if c not in sweep:
            sweep[c] = 0
    r = finding_grafting(sweep, {"a": 1.0}, {"a": "x"})
    assert r["verdict"] == verdict, r["evidence"]
    assert finding_grafting(None, None, None)["verdict"] == UNTESTED


def test_grafting_finding_measures_the_gain_over_the_base():
    from curvlens.studies.graft import GRAFT_SWEEP_COLUMNS

    # the base scores 0.8: magnitude's 0.9 at density 0.1 is 90% of the score but only
    # 50% of the expert's gain (1.0 - 0.8); FFG keeps the gain from 0.1, magnitude from 0.5
    sweep = _sweep((0.99, 1.0, 1.0), (0.9, 0.92, 0.99))
    for c in GRAFT_SWEEP_COLUMNS:
        if c not in sweep:
            sweep[c] = 0
    assert finding_grafting(sweep, {"a": 1.0}, {"a": "x"})["verdict"] == NOT  # without the base: a tie at 0.1
    r = finding_grafting(sweep, {"a": 1.0}, {"a": "x"}, {"x": 0.8})
    assert r["verdict"] == HOLDS and "FFG 0.1 vs magnitude 0.5" in r["evidence"], r["evidence"]
    # an expert no better than its base is left out, and says so
    r = finding_grafting(sweep, {"a": 0.8}, {"a": "x"}, {"x": 0.8})
    assert r["verdict"] == UNTESTED and "above the base" in r["evidence"]


def _masks(rank, row_sp, kept_early, kept_late):
    rows = []
    for layer, kept in ((0, kept_early), (3, kept_late)):
        for role in ("q", "up"):
            rows.append({"expert": "a", "criterion": "fisher", "density": 0.3, "name": f"l{layer}.{role}",
                         "layer": layer, "role": role, "numel": 64, "kept_frac": kept if role == "q" else kept_late,
                         "row_sparsity": row_sp, "col_sparsity": 0.0, "mask_rank": float(rank),
                         "mask_rank_at_least": float(rank)})
    return pd.DataFrame(rows), {f"l{la}.{r}": (8, 8) for la in (0, 3) for r in ("q", "up")}


def test_mask_finding_all_three_one_or_none():
    df, shapes = _masks(rank=2, row_sp=0.5, kept_early=0.9, kept_late=0.1)
    assert finding_masks(df, shapes)["verdict"] == HOLDS
    df, shapes = _masks(rank=2, row_sp=0.0, kept_early=0.3, kept_late=0.3)
    assert finding_masks(df, shapes)["verdict"] == PARTLY  # low-rank only
    df, shapes = _masks(rank=8, row_sp=0.0, kept_early=0.3, kept_late=0.3)
    r = finding_masks(df, shapes)
    assert r["verdict"] == NOT and "1.00" in r["evidence"]
    # a bounded rank is used at its bound and marked as such
    df.loc[0, "mask_rank"] = np.nan
    assert ">= " in finding_masks(df, shapes)["evidence"]


def test_overlap_and_merge_findings():
    ov = pd.DataFrame({"expert_a": ["a", "a"], "expert_b": ["b", "c"], "name": "x", "layer": pd.array([0, 0]),
                       "role": "q", "numel": 10, "cosine": 0.9, "spearman_log": [0.8, 0.5]})
    assert finding_overlap(ov)["verdict"] == PARTLY
    ov["spearman_log"] = [0.8, 0.75]
    assert finding_overlap(ov)["verdict"] == HOLDS
    labels = {"ota_ffg": "O", "linear": "L", "ties": "T"}
    t = pd.DataFrame({"model": ["expert: a", "expert: b"] + ["O"] * 2 + ["L"] * 2 + ["T"] * 2,
                      "capability": ["x", "y"] * 4, "accuracy": [1, 1, 0.9, 0.8, 0.7, 0.7, 0.95, 0.4]})
    r = finding_merges(t, {"a": "x", "b": "y"}, labels)
    assert r["verdict"] == HOLDS, r["evidence"]  # mean 0.85 >= 0.7, 0.675; worst 0.8 >= 0.7, 0.4
    t.loc[t.model == "T", "accuracy"] = [1.0, 0.9]
    assert finding_merges(t, {"a": "x", "b": "y"}, labels)["verdict"] == PARTLY
    f = findings({"curvature_overlap": ov})
    assert list(f.claim) == ["a", "b", "c", "d"] and list(f.verdict) == [UNTESTED, UNTESTED, HOLDS, UNTESTED]
