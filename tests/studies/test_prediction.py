"""The predicted loss split over a model, and its agreement with measured scores (with intervals)."""
import numpy as np
import pandas as pd
import pytest
import torch

from curvlens import Checkpoint, Experts, compare_merges
from curvlens.errors import CurvlensError
from curvlens.io.moments import Moments
from curvlens.passes.experts import Expert
from curvlens.studies.prediction import (
    agreement_by_family, measured_quality, prediction_agreement, split_merges,
)


def _experts():
    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=g),
            "model.norm.weight": torch.randn(8, generator=g)}
    exs = []
    for i in range(2):
        w = {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        exs.append(Expert(f"e{i}", Checkpoint.open(w), Moments.open({k: torch.rand(v.shape, generator=g)
                                                                    for k, v in w.items()})))
    return base, Experts(base, exs)


def test_split_merges_adds_up_to_compare_merges():
    base, ex = _experts()
    tau = {e: {k: ex[e].checkpoint[k] - base[k] for k in base} for e in ex.names}
    merges = {"half": {k: base[k] + 0.5 * (tau["e0"][k] + tau["e1"][k]) / 2 * 2 for k in base},
              "e0": {k: ex["e0"].checkpoint[k] for k in base}}
    split = split_merges(ex, merges, device="cpu", progress=False).set_index(["method", "expert"])
    ref = compare_merges(ex, merges, device="cpu", progress=False).set_index(["method", "expert"])
    for c in ("predicted_loss_increase", "predicted_loss_of_base", "relative_loss"):
        np.testing.assert_allclose(split[c], ref.loc[split.index, c], rtol=1e-9)
    np.testing.assert_allclose(split["coherent_loss"] + split["residual_loss"], split["predicted_loss_increase"],
                               rtol=1e-9)
    # the expert itself loses nothing, coherently or not
    assert split.loc[("e0", "e0"), "predicted_loss_increase"] == pytest.approx(0.0, abs=1e-12)
    assert split.loc[("e0", "e0"), "relative_coherent_loss"] == pytest.approx(0.0, abs=1e-12)
    no_base = Experts(None, [ex["e0"], ex["e1"]])
    with pytest.raises(CurvlensError, match="base"):
        split_merges(no_base, merges, device="cpu", progress=False)


def _items(k, n=50):
    return "T" * k + "F" * (n - k)


def _table(accs: dict, n=50):
    rows = []
    for model, (x, y) in accs.items():
        rows += [{"model": model, "capability": c, "accuracy": round(a * n) / n, "n": n,
                  "correct": _items(round(a * n), n)} for c, a in (("x", x), ("y", y))]
    return pd.DataFrame(rows)


REF = {"base": (0.5, 0.0), "expert: a": (1.0, 0.0), "expert: b": (0.5, 1.0)}


def test_agreement_has_a_p_value_and_an_interval_and_uses_the_gain():
    merges = {f"m{i}": (0.5 + 0.05 * i, 0.1 * i) for i in range(8)}  # m7 best, m0 worst
    t = _table({**REF, **merges})
    pred = pd.DataFrame({"method": list(merges), "expert": "a", "relative_loss": [1 - 0.1 * i for i in range(8)]})
    r = prediction_agreement(pred, t, {"a": "x", "b": "y"}, n_resamples=300).iloc[0]
    assert r["measure"] == "gain" and r["n_merges"] == 8
    assert r["spearman"] == pytest.approx(1.0) and r["p_value"] < 1e-3 and 0 < r["low"] <= r["high"] <= 1.0
    # a shuffled prediction: not significant, and the interval covers 0
    pred["relative_loss"] = [0.3, 0.9, 0.1, 0.6, 0.2, 0.8, 0.5, 0.4]
    r = prediction_agreement(pred, t, {"a": "x", "b": "y"}, n_resamples=300).iloc[0]
    assert r["p_value"] > 0.05 and r["low"] < 0 < r["high"]
    # without the base's rows: retention, said so
    no_base = t[t.model != "base"]
    assert prediction_agreement(pred, no_base, {"a": "x", "b": "y"}, n_resamples=50).iloc[0]["measure"] == \
        "retention"
    with pytest.raises(CurvlensError, match="base"):
        measured_quality(no_base, {"a": "x", "b": "y"}, list(merges), measure="gain")


def test_agreement_by_family_splits_the_merges():
    merges = {f"m{i}": (0.5 + 0.05 * i, 0.1 * i) for i in range(8)}
    t = _table({**REF, **merges})
    # the prediction ranks the dense merges right and the sparse ones backwards
    loss = [1 - 0.1 * i if i < 4 else 0.1 * i for i in range(8)]
    pred = pd.DataFrame({"method": list(merges), "expert": "a", "relative_loss": loss})
    fam = {f"m{i}": "dense" if i < 4 else "sparse" for i in range(8)}
    a = agreement_by_family(pred, t, {"a": "x", "b": "y"}, fam, n_resamples=100).set_index("merges")
    assert set(a.index) == {"all", "only dense", "all but dense", "only sparse", "all but sparse"}
    assert a.loc["only dense", "spearman"] == pytest.approx(1.0)
    assert a.loc["only sparse", "spearman"] == pytest.approx(-1.0)
    assert a.loc["all", "n_merges"] == 8 and a.loc["only dense", "n_merges"] == 4
