import numpy as np
import pytest
import torch

from curvlens.errors import CurvlensError
from curvlens.math import blocks as blocks_mod
from curvlens.math.fronts import (
    fit_quadratic,
    front_distance,
    non_dominated,
    predict_quadratic,
    quadratic_losses,
    sample_coefficients,
    tensor_grams,
)


def test_tensor_grams_equal_dense_einsum_over_blocks(monkeypatch):
    g = torch.Generator().manual_seed(0)
    taus = [torch.randn(7, 9, generator=g) for _ in range(3)]
    vs = [torch.rand(7, 9, generator=g) for _ in range(2)]
    t = torch.stack([x.reshape(-1) for x in taus]).double()
    want = torch.stack([(t * v.reshape(-1).double()) @ t.T for v in vs])
    monkeypatch.setitem(blocks_mod.BLOCK, "cpu", 5)  # many uneven blocks
    got = tensor_grams(vs, taus)
    assert got.dtype == torch.float64 and got.shape == (2, 3, 3)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, got.transpose(1, 2))


def test_tensor_grams_rejects_mismatched_shapes():
    with pytest.raises(CurvlensError, match="shapes differ"):
        tensor_grams([torch.ones(3)], [torch.ones(3), torch.ones(4)])


def test_quadratic_losses_match_the_diagonal_model():
    # L_i(c) = 1/2 sum v_i (theta(c) - theta_i)^2 computed directly in parameter space
    rng = np.random.default_rng(1)
    taus = rng.normal(size=(3, 11))
    vs = rng.uniform(size=(3, 11))
    grams = np.einsum("in,jn,ln->ijl", vs, taus, taus)
    c = rng.uniform(size=(5, 3))
    theta = c @ taus
    direct = np.stack([0.5 * (vs[i] * (theta - taus[i]) ** 2).sum(1) for i in range(3)], axis=1)
    np.testing.assert_allclose(quadratic_losses(grams, c), direct, rtol=1e-12)
    assert quadratic_losses(grams, np.eye(3)).diagonal().tolist() == [0.0, 0.0, 0.0]


def test_front_of_two_1d_quadratics_is_the_segment_between_their_minimisers():
    c = np.linspace(-1, 2, 301)
    a, b = 0.2, 1.3
    f = np.stack([(c - a) ** 2, 3 * (c - b) ** 2], axis=1)
    front = c[non_dominated(f)]
    inside = (c >= a - 1e-12) & (c <= b + 1e-12)
    assert np.array_equal(non_dominated(f), inside)
    assert front.min() == pytest.approx(a) and front.max() == pytest.approx(b)
    assert np.array_equal(non_dominated(-f, maximize=True), inside)


def test_non_dominated_keeps_duplicates_and_drops_dominated():
    f = np.array([[1.0, 2.0], [2.0, 1.0], [2.0, 2.0], [1.0, 2.0], [3.0, 0.5]])
    assert non_dominated(f).tolist() == [True, True, False, True, True]
    with pytest.raises(CurvlensError, match="finite"):
        non_dominated([[np.nan, 1.0]])


def test_quadratic_surrogate_is_exact_on_a_quadratic():
    rng = np.random.default_rng(0)
    c = rng.uniform(size=(20, 3))
    y = 0.5 - (c[:, 0] - 0.3) ** 2 + 0.7 * c[:, 1] * c[:, 2] - 2 * c[:, 2]
    w = fit_quadratic(c, y)
    new = rng.uniform(size=(6, 3))
    want = 0.5 - (new[:, 0] - 0.3) ** 2 + 0.7 * new[:, 1] * new[:, 2] - 2 * new[:, 2]
    np.testing.assert_allclose(predict_quadratic(w, new), want, atol=1e-10)


def test_sampling_and_front_distance():
    s = sample_coefficients(10, 3, seed=4)
    assert s.shape == (10, 3) and (s[:3] == np.eye(3)).all() and ((s >= 0) & (s <= 1)).all()
    np.testing.assert_array_equal(s, sample_coefficients(10, 3, seed=4))
    assert front_distance(s, s) == 0.0
    assert front_distance([[0.0]], [[2.0]]) == 2.0
    with pytest.raises(CurvlensError):
        sample_coefficients(3, 2, low=1.0, high=1.0)


def test_non_dominated_equals_the_brute_force_definition():
    rng = np.random.default_rng(3)
    for n, m in ((300, 2), (400, 4)):
        f = rng.integers(0, 6, size=(n, m)).astype(float)          # many ties and duplicates
        f[: n // 2] = rng.normal(size=(n // 2, m)) @ np.eye(m)[::-1]
        le = (f[None, :, :] <= f[:, None, :]).all(-1)
        lt = (f[None, :, :] < f[:, None, :]).any(-1)
        np.testing.assert_array_equal(non_dominated(f), ~(le & lt).any(1))
