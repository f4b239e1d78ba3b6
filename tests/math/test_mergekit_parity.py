"""Numerical parity with mergekit 0.1.5 for the methods both implement.

mergekit is no dependency of curvlens (curvlens never imports it); the ``parity``
extra installs mergekit 0.1.5 to compare with (``pip install -e ".[parity]"``; CI
installs it). Without it this module is skipped, with that reason.

Inputs are fp32 so mergekit (which computes in the input dtype) and curvlens
(always fp32) do the same arithmetic. DARE draws from torch's global generator in
mergekit and from an explicit generator in curvlens; both are seeded alike.
"""
import pytest
import torch

mergekit_api = pytest.importorskip(
    "mergekit.merge_methods.api",
    reason="mergekit is not installed: pip install -e '.[parity]' (CI installs it) to compare with it")

from curvlens.math.methods import get_method  # noqa: E402

SHAPES = [(), (7,), (6, 5)]


def _inputs(shape, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    experts = [base + torch.randn(shape, generator=g) for _ in range(n)]
    return base, experts


def _mergekit(method, base, experts, params):
    tensors = experts if base is None else [base, *experts]
    return mergekit_api.merge_tensors(
        tensors, method, parameters=params, base_index=None if base is None else 0
    )


def _ours(method, base, experts, params, rng=None):
    return get_method(method).fn(base, experts, None, rng=rng, **params)


def _close(a, b):
    # Same operations in the same order: the results agree to the bit.
    torch.testing.assert_close(a, b, atol=0.0, rtol=0.0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear(shape, normalize):
    _, experts = _inputs(shape)
    params = {"weight": [0.2, 1.5, 0.7], "normalize": normalize}
    _close(_ours("linear", None, experts, params), _mergekit("linear", None, experts, params))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "params",
    [
        {"weight": [1.0, 1.0, 1.0]},
        {"weight": [0.3, -0.5, 1.2], "lambda": 0.7},
        {"weight": [0.3, 0.5, 1.2], "normalize": True},
        {"weight": [1.0, -1.0, 0.0], "normalize": True},  # total weight 0: no division
    ],
)
def test_task_arithmetic(shape, params):
    base, experts = _inputs(shape)
    _close(_ours("task_arithmetic", base, experts, params),
           _mergekit("task_arithmetic", base, experts, params))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "params",
    [
        {"weight": [1.0, 1.0, 1.0]},
        {"weight": [0.5, 1.0, 2.0], "density": [0.2, 0.5, 0.9]},
        {"weight": [0.5, -1.0, 2.0], "density": 0.3, "normalize": False, "lambda": 1.3},
        {"weight": [1.0, 1.0, 1.0], "density": 0.4, "rescale": True},
        {"weight": [1.0, 1.0, 1.0], "density": 0.01},  # keeps max(1, int(...)) entries
    ],
)
def test_ties(shape, params):
    base, experts = _inputs(shape)
    _close(_ours("ties", base, experts, params), _mergekit("ties", base, experts, params))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "params",
    [
        {"weight": [1.0, 1.0, 1.0], "density": 0.5},
        {"weight": [0.4, 0.9, 1.3], "density": [0.3, 1.0, 0.7], "normalize": True},
        {"weight": [1.0, 1.0, 1.0], "density": 0.6, "rescale": False, "lambda": 0.8},
    ],
)
@pytest.mark.parametrize("seed", [0, 17])
def test_dare(method, shape, params, seed):
    base, experts = _inputs(shape)
    torch.manual_seed(seed)
    theirs = _mergekit(method, base, experts, params)
    ours = _ours(method, base, experts, params, rng=torch.Generator().manual_seed(seed))
    _close(ours, theirs)
