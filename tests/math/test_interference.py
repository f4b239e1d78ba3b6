import math

import pytest
import torch

from curvlens.errors import CurvlensError
from curvlens.math.interference import pair_interference, predicted_loss_increase


def test_known_sign_pattern_gives_known_conflict_rates():
    # entries: agree, conflict, conflict, a only, b only, both zero, agree, conflict
    ta = torch.tensor([1.0, 2.0, -1.0, 3.0, 0.0, 0.0, -2.0, 0.5])
    tb = torch.tensor([2.0, -1.0, 4.0, 0.0, 1.0, 0.0, -1.0, -0.5])
    r = pair_interference(ta, tb)
    assert r["sign_conflict"] == 3 / 8
    assert r["both_nonzero_frac"] == 5 / 8
    assert r["sign_conflict_of_both_nonzero"] == 3 / 5
    # |ta tb| on both-nonzero entries: 2, 2, 4, 2, 0.25; conflicts: 2, 4, 0.25.
    assert r["magnitude_weighted_conflict"] == pytest.approx(6.25 / 10.25)
    assert math.isnan(r["curvature_weighted_conflict"])  # no moments given


def test_curvature_weighted_conflict_hand_computed_and_scale_invariant():
    ta = torch.tensor([1.0, 2.0, -1.0, 3.0])
    tb = torch.tensor([2.0, -1.0, 4.0, -1.0])
    va = torch.tensor([1.0, 4.0, 0.0, 1.0])
    vb = torch.tensor([1.0, 1.0, 9.0, 4.0])
    # w = sqrt(va vb) |ta tb| = [1*2, 2*2, 0*4, 2*3] = [2, 4, 0, 6]; conflicts: 1, 2, 3.
    r = pair_interference(ta, tb, va, vb)
    assert r["curvature_weighted_conflict"] == pytest.approx(10 / 12)
    r2 = pair_interference(ta * 7, tb, va * 1e-20, vb * 3)  # tiny moments must not underflow
    assert r2["curvature_weighted_conflict"] == pytest.approx(10 / 12)


def test_identical_and_opposite_task_vectors():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(20, 30, generator=g)
    tau[tau.abs() < 0.1] = 0.0
    same = pair_interference(tau, tau.clone())
    assert same["tv_cosine"] == 1.0 and same["sign_conflict"] == 0.0
    opp = pair_interference(tau, -tau, torch.ones(20, 30), torch.ones(20, 30))
    assert opp["tv_cosine"] == pytest.approx(-1.0)
    nonzero = float((tau != 0).float().mean())
    assert opp["sign_conflict"] == pytest.approx(nonzero)
    assert opp["sign_conflict_of_both_nonzero"] == 1.0
    assert opp["curvature_weighted_conflict"] == pytest.approx(1.0)


def test_degenerate_inputs_give_nan_not_errors():
    z = torch.zeros(5)
    r = pair_interference(z, torch.ones(5), z, torch.ones(5))
    assert math.isnan(r["tv_cosine"])
    assert math.isnan(r["sign_conflict_of_both_nonzero"])
    assert math.isnan(r["curvature_weighted_conflict"])
    assert r["sign_conflict"] == 0.0


def test_bad_inputs_raise():
    with pytest.raises(CurvlensError, match=r"tau_a \(2, 3\).*tau_b \(3, 2\)"):
        pair_interference(torch.ones(2, 3), torch.ones(3, 2))
    with pytest.raises(CurvlensError, match="both v_a and v_b"):
        pair_interference(torch.ones(3), torch.ones(3), v_a=torch.ones(3))
    with pytest.raises(CurvlensError, match="negative"):
        pair_interference(torch.ones(3), torch.ones(3), torch.tensor([1.0, -1.0, 1.0]), torch.ones(3))


def test_predicted_loss_increase_zero_for_own_expert_and_hand_value():
    v = torch.tensor([[1.0, 4.0], [0.5, 0.0]])
    expert = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert predicted_loss_increase(v, expert.clone(), expert) == 0.0
    merged = torch.tensor([[2.0, 1.0], [1.0, 100.0]])
    # 0.5 * (1 * 1 + 4 * 1 + 0.5 * 4 + 0 * 96^2) = 3.5
    assert predicted_loss_increase(v, merged, expert) == pytest.approx(3.5)


def test_predicted_loss_increase_of_an_average_merge():
    # Two experts, merge = their mean: each expert's edit is half undone.
    ta, tb = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])
    merged = (ta + tb) / 2
    va = torch.tensor([3.0, 1.0])
    # expert a moves by (-1, +1): 0.5 * (3 + 1) = 2
    assert predicted_loss_increase(va, merged, ta) == pytest.approx(2.0)


def test_predicted_loss_increase_is_float64_and_does_not_mutate():
    theta = torch.full((1000,), 1.0, dtype=torch.float64)
    merged = theta + 1e-9
    before = merged.clone()
    out = predicted_loss_increase(torch.ones(1000, dtype=torch.float64), merged, theta)
    assert out == pytest.approx(0.5 * 1000 * 1e-18, rel=1e-6)
    assert torch.equal(merged, before)
    with pytest.raises(CurvlensError, match=r"v \(3,\).*theta_merged \(2,\).*theta_expert \(3,\)"):
        predicted_loss_increase(torch.ones(3), torch.ones(2), torch.ones(3))
