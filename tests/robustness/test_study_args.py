"""Every public study function against generated arguments, by outcome: a valid
call runs and gives the result its contract states; each corrupted argument is a
CurvlensError naming that argument (type, finiteness, range), before any merge,
evaluation or pass; empty grids, exclusions that leave nothing and metrics that
vanish are errors or error rows that say so."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from curvlens import Checkpoint, CurvlensError, Experts
from curvlens.studies.graft import graft_sweep
from curvlens.studies.findings import FRAME_COLUMNS, UNTESTED, findings
from curvlens.studies.fronts import pareto_front
from curvlens.studies.prediction import merge_retention
from curvlens.studies.regime import regime_verdict
from curvlens.studies.soup import greedy_soup
from curvlens.passes.sparse_soup import sparse_soup
from curvlens.studies.sweep import sweep, sweep_grid
from tests.robustness.conftest import scratch
from tests.passes.handmade import DistanceScore, write_experts

KW = dict(device="cpu", progress=False)
BAD_NUMBERS = ["0.5", True, None, float("nan"), float("inf"), [1.0], {"a": 1}]
BAD_INTS = [2.5, True, -1, "3", float("nan"), None]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Base w = [0, 0]; experts a, b, c with moments; picklable evaluators act on ``w``."""
    root = tmp_path_factory.mktemp("study-args")
    base, dirs = write_experts(root, {"w": [0.0, 0.0]},
                               {"a": {"w": [1.0, 0.0]}, "b": {"w": [0.0, 1.0]}, "c": {"w": [0.5, 0.5]}},
                               {n: {"w": [1.0, 2.0]} for n in "abc"})
    return root, base, dirs


def _ex(tiny, base=True, moments=False):
    root, b, dirs = tiny
    return Experts.from_dirs(b if base else None, dirs, moments=moments)


class Calls(DistanceScore):
    """Counts its calls (to show a refusal came before any evaluation)."""

    def __init__(self, targets=None):
        super().__init__(targets or {"x": [1.0, 0.0], "y": [0.0, 1.0]})
        self.calls = 0

    def __call__(self, model_dir):
        self.calls += 1
        return super().__call__(model_dir)


# ---------------------------------------------------------------------- sweep
SWEEP_BAD = {
    "grid": [[], {}, "linear", [{"method": 3}], [{}], [{"method": "linear", "experts": "a"}], 3],
    "evaluate": [3, "f", None],
    "keep": [1, "yes", None],
    "n_workers": [0, 2.5, True, "2"],
}


@settings(max_examples=30, deadline=None)
@given(which=st.sampled_from([None, *SWEEP_BAD]), data=st.data())
def test_sweep_arguments(tiny, which, data):
    ev = Calls()
    args = {"grid": [{"method": "linear", "experts": ["a", "b"]}], "evaluate": ev, "keep": False, "n_workers": 1}
    if which is not None:
        args[which] = data.draw(st.sampled_from(SWEEP_BAD[which]), label=which)
    with scratch() as d:
        call = lambda: sweep(_ex(tiny), args["grid"], args["evaluate"], out_dir=d, keep=args["keep"],  # noqa: E731
                             n_workers=args["n_workers"], **KW)
        if which is None:
            df = call()
            assert df[["metric", "value", "status"]].values.tolist() == [["x", -0.5, "ok"], ["y", -0.5, "ok"]]
        else:
            with pytest.raises(CurvlensError, match=which.replace("grid", "grid|job")):
                call()
            assert ev.calls == 0 and list(d.iterdir()) == []


@pytest.mark.parametrize("axes, match", [({"density": []}, "axis 'density' is empty"),
                                         ({"weight": [], "lambda": [1.0]}, "axis 'weight'")])
def test_sweep_grid_refuses_an_empty_axis(axes, match):
    with pytest.raises(CurvlensError, match=match):
        sweep_grid("ties", **axes)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "0.5", None, [1.0]])
def test_an_evaluator_that_returns_a_non_number_makes_an_error_row(tiny, value):
    df = sweep(_ex(tiny), [{"method": "linear"}], lambda d: {"x": value}, **KW)
    assert df["status"].tolist() == ["error"] and "metric 'x'" in df["error"].iloc[0]


# ---------------------------------------------------------------- greedy soup
SOUP_BAD = {"objective": ["median", 3, None], "metrics": ["x", [], [1], ["x", "x"]], "evaluate": [3, None]}


@settings(max_examples=20, deadline=None)
@given(which=st.sampled_from([None, *SOUP_BAD]), data=st.data())
def test_greedy_soup_arguments(tiny, which, data):
    ev = Calls({"x": [0.5, 0.5]})
    args = {"objective": "mean", "metrics": None, "evaluate": ev}
    if which is not None:
        args[which] = data.draw(st.sampled_from(SOUP_BAD[which]), label=which)
    call = lambda: greedy_soup(_ex(tiny, base=False), args["evaluate"], args["objective"],  # noqa: E731
                               metrics=args["metrics"], **KW)
    if which is None:
        res = call()  # c = [0.5, 0.5] alone is the target: it ranks first; a or b would move away
        assert res.ingredients == ["c"] and res.curve["status"].eq("ok").all()
    else:
        with pytest.raises(CurvlensError, match=which):
            call()
        assert ev.calls == 0


class Vanishing(DistanceScore):
    """Returns metric ``y`` only while fewer than ``n`` calls were made."""

    def __init__(self, n):
        super().__init__({"x": [0.5, 0.5], "y": [0.5, 0.5]})
        self.n, self.calls = n, 0

    def __call__(self, model_dir):
        self.calls += 1
        out = super().__call__(model_dir)
        return out if self.calls <= self.n else {"x": out["x"]}


def test_a_metric_that_vanishes_mid_soup_is_an_error_row_that_says_so(tiny):
    res = greedy_soup(_ex(tiny, base=False), Vanishing(3), **KW)  # 3 ranking calls, then y is gone
    steps = res.curve[res.curve["phase"] == "soup"].iloc[1:]
    assert len(steps) == 2 and steps["status"].eq("error").all() and not steps["kept"].any()
    assert steps["error"].str.contains(r"returned metric\(s\) \['x'\] but not \['y'\]").all()


def test_inconsistent_metric_keys_name_the_missing_metric(tiny):
    class Keys(DistanceScore):
        def __call__(self, model_dir):
            out = super().__call__(model_dir)
            w = Checkpoint.open(model_dir)["w"].tolist()
            return {"x": out["x"]} if w == [0.0, 1.0] else out  # expert b alone: no y

    res = greedy_soup(_ex(tiny, base=False), Keys({"x": [0.5, 0.5], "y": [0.5, 0.5]}), **KW)
    rank = res.curve[res.curve["phase"] == "rank"].set_index("candidate")
    assert rank.loc["b", "status"] == "error" and "returned metric(s) ['x'] but not ['y']" in rank.loc["b", "error"]
    assert rank.loc[["a", "c"], "status"].eq("ok").all() and res.ingredients[0] == "c"
    assert "b" not in res.curve.loc[res.curve["phase"] == "soup", "candidate"].tolist()


def test_no_ingredient_scored_names_why(tiny):
    with pytest.raises(CurvlensError, match=r"a: evaluate returned .* but not") as err:
        greedy_soup(_ex(tiny, base=False), lambda d: {"x": 1.0} if "job000" in d else {"y": 1.0}, **KW)
    assert ": None" not in str(err.value)


# --------------------------------------------------------------- pareto front
FRONT_BAD = {
    "bounds": [(0, float("inf")), (1.0, 0.0), (float("nan"), 1), "ab", (0,), (0, 1, 2), (True, 1)],
    "n_dense": [0, 2.5, True, None], "seed": [-1, 1.5, "0"], "n_checks": [-1, 1.5],
    "grams": ["nan", "inf", "shape", "text"], "metrics": ["x", [], [3]], "capabilities": [["a"], "a"],
    "evaluate": [3, "f"],
}


def test_pareto_front_arguments(tiny, capfd):
    ex = _ex(tiny, moments=True)
    k = len(ex)
    good = np.stack([np.eye(k) * (i + 1) for i in range(k)])

    @settings(max_examples=30, deadline=None)
    @given(which=st.sampled_from([None, *FRONT_BAD]), data=st.data())
    def check(which, data):
        args = {"bounds": (0.0, 1.0), "n_dense": 50, "seed": 0, "n_checks": 0, "grams": good, "metrics": None,
                "capabilities": None, "evaluate": None}
        if which is not None:
            bad = data.draw(st.sampled_from(FRONT_BAD[which]), label=which)
            if which == "grams":
                bad = {"nan": good * np.nan, "inf": good * np.inf, "shape": good[:2], "text": [["a"]]}[bad]
            args[which] = bad
        call = lambda: pareto_front(ex, args["evaluate"], predictor="curvature", bounds=args["bounds"],  # noqa: E731
                                    n_dense=args["n_dense"], seed=args["seed"], n_checks=args["n_checks"],
                                    grams=args["grams"], metrics=args["metrics"],
                                    capabilities=args["capabilities"], **KW)
        if which is None:
            res = call()
            assert res.front[res.coefficient_columns].to_numpy().min() >= 0.0 and len(res.evaluated) == 0
        else:
            with pytest.raises(CurvlensError, match=which):
                call()

    check()
    assert capfd.readouterr().out == ""  # nothing printed (LAPACK complains on stdout when handed a NaN)


def test_fronts_math_never_hands_lapack_a_nan(capfd):
    from curvlens.math.fronts import fit_quadratic, scalarized_minimisers

    with pytest.raises(CurvlensError, match="non-finite"):
        scalarized_minimisers([np.eye(2) * np.inf], [[0.0, 0.0]], [[1.0]])
    with pytest.raises(CurvlensError, match="non-finite"):
        scalarized_minimisers([np.eye(2) * 1e308, np.eye(2) * 1e308], [[0.0, 0.0]] * 2, [[1.0, 1.0]])
    with pytest.raises(CurvlensError, match="non-finite"):
        fit_quadratic([[np.inf, 0.0], [1.0, 1.0]], [1.0, 2.0])
    assert capfd.readouterr().out == ""


# ---------------------------------------------------------------- sparse soup
@pytest.mark.filterwarnings("ignore:sparse_soup. the experts' zero patterns disagree")
@settings(max_examples=25, deadline=None)
@given(weights=st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32),
                                  st.sampled_from(["1", True, None])), min_size=3, max_size=3))
def test_sparse_soup_weights_by_outcome(tiny, weights):
    ok = all(isinstance(w, float) and math.isfinite(w) and w >= 0 for w in weights) and sum(weights) > 0
    if ok:
        total = sum(weights)
        want = sum(w / total * torch.tensor(x) for w, x in zip(weights, ([1.0, 0.0], [0.0, 1.0], [0.5, 0.5])))
        got = sparse_soup(_ex(tiny, base=False), weights=weights, mask="union", **KW).checkpoint["w"]
        assert torch.allclose(got, want.float(), rtol=1e-5, atol=1e-30) and torch.isfinite(got).all()
    else:
        with pytest.raises(CurvlensError, match=r"weights"):
            sparse_soup(_ex(tiny, base=False), weights=weights, mask="union", **KW)


# ---------------------------------------------------------------- graft sweep
def test_graft_sweep_arguments_and_scores(tiny):
    ex = _ex(tiny, moments=True)
    good = lambda sd: pd.DataFrame({"capability": ["x"], "score": [float(sd["w"][0])]})  # noqa: E731
    df = graft_sweep(ex, [0.5, 1.0], evaluate=good, **KW)
    assert len(df) == 3 * 2 * 2 and df["score"].map(math.isfinite).all()
    for bad, match in ((["0.5"], "densities: every density must be a real number"), ([True], "real number"),
                       ([float("nan")], "finite"), ([], "densities is empty"), ("ab", "densities"),
                       ([0.0], r"\(0, 1\]"), ([1.5], r"\(0, 1\]")):
        with pytest.raises(CurvlensError, match=match):
            graft_sweep(ex, bad, evaluate=good, **KW)
    for score, match in (("high", "score of 'x' must be a real number"), (float("nan"), "must be finite")):
        with pytest.raises(CurvlensError, match=match):
            graft_sweep(ex, [0.5], evaluate=lambda sd, s=score: pd.DataFrame({"capability": ["x"], "score": [s]}),
                        **KW)
    with pytest.raises(CurvlensError, match="evaluate must be a callable"):
        graft_sweep(ex, [0.5], evaluate=3, **KW)


# -------------------------------------------------------------------- findings
@pytest.fixture(scope="module")
def frames():
    ov = pd.DataFrame({"expert_a": ["a"], "expert_b": ["b"], "name": ["w"], "layer": pd.array([0], "Int64"),
                       "role": ["q"], "numel": [4], "spearman_log": [0.8], "cosine": [0.9]})
    ms = pd.DataFrame({"expert": ["a"] * 2, "criterion": ["fisher"] * 2, "density": [0.3] * 2,
                       "name": ["model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"],
                       "layer": pd.array([0, None], "Int64"), "role": ["q", "embed"], "numel": [16, 32],
                       "kept_frac": [0.5, 0.2], "mask_rank": [2.0, 1.0], "mask_rank_at_least": [np.nan] * 2,
                       "row_sparsity": [0.2, 0.5], "col_sparsity": [0.1, 0.0]})
    gs = pd.DataFrame({"expert": ["a"] * 4, "criterion": ["fisher", "magnitude"] * 2, "density": [0.1, 0.1, 1.0, 1.0],
                       "capability": ["x"] * 4, "score": [0.8, 0.3, 0.9, 0.9]})
    mt = pd.DataFrame({"model": ["expert: a", "base", "OTA+FFG", "TIES"], "capability": ["x"] * 4,
                       "accuracy": [0.9, 0.1, 0.8, 0.7]})
    return {"curvature_overlap": ov, "mask_stats": ms, "graft_sweep": gs, "merge_table": mt}


STATES = ["valid", "absent", "empty", "drop_column", "not_a_frame"]


@settings(max_examples=40, deadline=None)
@given(states=st.fixed_dictionaries({k: st.sampled_from(STATES) for k in FRAME_COLUMNS}), data=st.data())
def test_findings_on_any_mix_of_frames(frames, states, data):
    given_frames, valid_only = {}, {}
    broken = None
    for key in FRAME_COLUMNS:  # in the order findings checks them
        state, f = states[key], frames[key]
        if state == "valid":
            given_frames[key] = valid_only[key] = f
        elif state == "empty":
            given_frames[key] = f.iloc[0:0]
        elif state == "drop_column":
            col = data.draw(st.sampled_from(FRAME_COLUMNS[key]), label=f"{key} without")
            given_frames[key] = f.drop(columns=col)
            broken = broken or (key, col)
        elif state == "not_a_frame":
            given_frames[key] = f.to_dict("list")
            broken = broken or (key, "DataFrame")
    kw = dict(capabilities={"a": "x"}, shapes={n: (4, 4) if "q_proj" in n else (8, 4) for n in frames["mask_stats"].name})
    if broken is not None:
        with pytest.raises(CurvlensError, match=rf"frames\['{broken[0]}'\] (lacks column|must be a DataFrame).*"):
            findings(given_frames, **kw)
        return
    got = findings(given_frames, **kw)
    assert got.equals(findings(valid_only, **kw))  # an empty frame is an absent one: "not measured"
    for claim, key in (("b", "mask_stats"), ("c", "curvature_overlap"), ("d", "merge_table")):
        if key not in valid_only:
            assert got.set_index("claim").loc[claim, "verdict"] == UNTESTED


@pytest.mark.parametrize("bad, match", [(None, "frames must be a mapping"), ([1, 2], "frames must be a mapping")])
def test_findings_needs_a_mapping(bad, match):
    with pytest.raises(CurvlensError, match=match):
        findings(bad)


def test_findings_other_arguments(frames):
    for kw, match in (({"capabilities": ["a"]}, "capabilities must be a mapping"),
                      ({"density": 0.0}, r"density must be in \(0, 1\]"), ({"density": "0.3"}, "real number")):
        with pytest.raises(CurvlensError, match=match):
            findings(frames, **kw)


# ------------------------------------------------------------------ exclusion
def test_an_exclude_that_leaves_nothing_is_refused(tiny):
    root, b, dirs = tiny
    with pytest.raises(CurvlensError, match="leave no floating-point tensor"):
        Experts.from_dirs(b, dirs, exclude="w")
    with pytest.raises(CurvlensError, match="leave no floating-point tensor"):
        _ex(tiny).without("name:w")


@pytest.mark.parametrize("call, match", [
    (lambda: regime_verdict(pd.DataFrame({"q": [1]})),
     r"table lacks column\(s\) \['scope', 'metric', 'value'\]"),
    (lambda: regime_verdict([1]), "table must be a DataFrame"),
    (lambda: merge_retention(
        pd.DataFrame({"model": ["expert: a"], "capability": ["x"], "accuracy": [1.0]}), ["a"]),
     "capabilities must be a mapping"),
    (lambda: merge_retention(pd.DataFrame(), {"a": "x"}),
     "scores is empty"),
])
def test_the_regime_and_retention_frames_are_checked(call, match):
    with pytest.raises(CurvlensError, match=match):
        call()
