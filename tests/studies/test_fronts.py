import numpy as np
import pytest
import torch

from curvlens import CurvlensError, Experts, compare_merges, merge
from curvlens.math.fronts import quadratic_losses
from curvlens.studies.fronts import gram_matrices, pareto_front
from tests.conftest import make_tiny_zoo
from tests.passes.handmade import BoundedScore, DistanceScore, write_experts


def test_streamed_gram_matrices_equal_a_dense_computation(tmp_path):
    base_dir, dirs, weights, moments = make_tiny_zoo(tmp_path, n_experts=3)
    ex = Experts.from_dirs(base_dir, dirs)
    got = gram_matrices(ex, device="cpu", progress=False)
    base = ex.base
    names = ex.tensor_names()
    flat = lambda d: torch.cat([d[n].reshape(-1).float() for n in names])  # noqa: E731
    taus = torch.stack([flat(weights[e]) - flat(base) for e in ex.names]).double()  # the pass's fp32 differences
    vs = torch.stack([flat(moments[e]) for e in ex.names]).double()
    dense = torch.einsum("in,jn,ln->ijl", vs, taus, taus).numpy()
    np.testing.assert_allclose(got, dense, rtol=1e-9)


def test_quadratic_in_c_equals_the_predicted_loss_of_the_actual_merge(tmp_path):
    base_dir, dirs, _, _ = make_tiny_zoo(tmp_path, n_experts=3)
    ex = Experts.from_dirs(base_dir, dirs)
    grams = gram_matrices(ex, device="cpu", progress=False)
    c = [0.3, 0.9, -0.2]
    merged = merge(ex, "task_arithmetic", device="cpu", progress=False, weight=c)
    pred = compare_merges(ex, {"m": merged}, device="cpu", progress=False)
    np.testing.assert_allclose(quadratic_losses(grams, [c])[0], pred["predicted_loss_increase"].to_numpy(),
                               rtol=1e-5)


@pytest.fixture
def square(tmp_path):
    """Base 0, tau_x = (1, 0), tau_y = (0, 1); isotropic moments 1 and 4."""
    base, dirs = write_experts(tmp_path, {"w": [0.0, 0.0]}, {"x": {"w": [1.0, 0.0]}, "y": {"w": [0.0, 1.0]}},
                               moments={"x": {"w": [1.0, 1.0]}, "y": {"w": [4.0, 4.0]}})
    return Experts.from_dirs(base, dirs)


def test_curvature_front_is_the_segment_between_the_experts(square):
    # L_x = (c1-1)^2/2 + c2^2/2, L_y = 2 c1^2 + 2 (c2-1)^2: every front point lies on c1 + c2 = 1
    res = pareto_front(square, n_dense=3000, device="cpu", progress=False)
    np.testing.assert_allclose(res.grams, [np.eye(2), 4 * np.eye(2)])
    exact = res.front[res.front["source"] == "scalarized"][["c_x", "c_y"]].to_numpy()
    assert len(exact) > 1000 and np.abs(exact.sum(1) - 1).max() < 1e-9
    assert exact[:, 0].min() == 0.0 and exact[:, 0].max() == 1.0   # the whole segment, end to end
    # a random point a little off the segment is dominated only by a sliver of it (width ~ its
    # distance squared): some stay undominated by the sample, all of them close to the segment
    rnd = res.front[res.front["source"] == "random"][["c_x", "c_y"]].to_numpy()
    assert np.abs(rnd.sum(1) - 1).max() < 0.1
    off = res.dense[~res.dense["on_front"]]
    assert (np.abs(off[["c_x", "c_y"]].sum(axis=1) - 1) > 0).all() and len(res.evaluated) == 0
    assert res.predictor == "curvature" and res.objectives == ["loss_x", "loss_y"]
    again = pareto_front(square, grams=res.grams, n_dense=3000, progress=False)   # no second pass
    assert again.dense.equals(res.dense)
    with pytest.raises(CurvlensError, match="shape"):
        pareto_front(square, grams=np.eye(3)[None], progress=False)


def test_map_surrogate_is_exact_on_quadratic_scores_and_checks_agree(square):
    # scores -||theta(c) - e_x||^2, -||theta(c) - e_y||^2 are exactly quadratic in c
    ev = DistanceScore({"x": [1.0, 0.0], "y": [0.0, 1.0]})
    res = pareto_front(square, ev, n_samples=8, n_checks=3, n_dense=2000, metric_range=None, device="cpu",
                       progress=False)
    assert res.predictor == "surrogate" and res.metric_range is None
    np.testing.assert_allclose(res.surrogates["x"], [-1, 2, 0, -1, 0, -1], atol=1e-6)
    f = res.front[res.front["source"] == "scalarized"][["c_x", "c_y"]].to_numpy()
    assert np.abs(f.sum(1) - 1).max() < 1e-5
    checks = res.evaluated[res.evaluated["role"] == "check"]
    assert len(checks) == 3 and (checks["status"] == "ok").all()
    np.testing.assert_allclose(checks["pred_x"], checks["x"], atol=1e-6)
    assert res.agreement["mae"].max() < 1e-6 and (res.agreement["spearman"] > 0.99).all()
    # agreement is scored on the held-out points only: 3 checks + 4 hold-out c, never the 8 fitted
    assert (res.agreement["n"] == 7).all() and (res.agreement["points"] == "held out").all()
    assert res.summary["n_fit"] == 8 and (res.evaluated["role"] == "holdout").sum() == 4
    assert checks["measured_front"].all()
    # the checks are spread over the front, away from the points already evaluated
    sampled = res.evaluated[res.evaluated["role"] == "sample"][["c_x", "c_y"]].to_numpy()
    gaps = np.sqrt(((checks[["c_x", "c_y"]].to_numpy()[:, None] - sampled[None]) ** 2).sum(-1)).min(1)
    assert (gaps > 0.05).all()


def test_curvature_front_checked_against_evaluations(square):
    ev = DistanceScore({"x": [1.0, 0.0], "y": [0.0, 1.0]})
    res = pareto_front(square, ev, predictor="curvature", n_samples=6, n_checks=2, device="cpu", progress=False)
    # the curvature losses are the negated scores up to a scale per expert: ranks agree exactly
    assert res.agreement["metric"].tolist() == ["x", "y"] and (res.agreement["spearman"] > 0.99).all()
    assert res.summary["n_evaluations"] == 8 and res.summary["front_distance"] < 0.2
    # the two corners (each expert alone: its own loss 0 by construction) do not enter the agreement
    assert (res.agreement["n"] == 6).all() and (res.agreement["points"] == "off the corners").all()
    with pytest.raises(CurvlensError, match="pass evaluate"):
        pareto_front(square, n_samples=3, progress=False)
    with pytest.raises(CurvlensError, match="needs evaluate"):
        pareto_front(square, predictor="surrogate", progress=False)


def test_map_surrogate_needs_more_evaluations_than_weights_and_predicts_inside_the_metric_range(square):
    # a quadratic in 2 coefficients has 6 weights: 6 evaluations would only interpolate
    with pytest.raises(CurvlensError, match="6 weights.*more than 6"):
        pareto_front(square, BoundedScore({"x": [1.0, 0.0], "y": [0.0, 1.0]}), n_samples=6, progress=False)
    res = pareto_front(square, BoundedScore({"x": [1.0, 0.0], "y": [0.0, 1.0]}), n_samples=10, n_checks=2,
                       bounds=(-1.0, 2.0), device="cpu", progress=False)
    assert res.metric_range == (0.0, 1.0)
    pred = res.dense[["pred_x", "pred_y"]].to_numpy()
    assert pred.min() >= 0.0 and pred.max() <= 1.0 and pred.min() < 0.05   # far from a target: near 0, not below
    # the same scores fitted raw: the quadratic leaves the range somewhere in the box
    raw = pareto_front(square, BoundedScore({"x": [1.0, 0.0], "y": [0.0, 1.0]}), n_samples=10, n_checks=0,
                       bounds=(-1.0, 2.0), metric_range=None, device="cpu", progress=False)
    assert raw.dense[["pred_x", "pred_y"]].to_numpy().min() < 0.0


def test_map_surrogate_refuses_a_metric_outside_its_range(square):
    with pytest.raises(CurvlensError, match="outside metric_range.*or None for an unbounded"):
        pareto_front(square, DistanceScore({"x": [1.0, 0.0], "y": [0.0, 1.0]}), n_samples=8, progress=False)
