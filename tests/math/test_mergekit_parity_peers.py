"""Numerical parity with mergekit 0.1.5 for its other merge methods (breadcrumbs,
DELLA, Model Stock, the spherical family, SCE, Arcee Fusion, passthrough).

mergekit is no dependency of curvlens; the ``parity`` extra installs it (CI
does). Without it this module is skipped, with that reason. Inputs are fp32 and
tie-free (Gaussian), so mergekit's unstable sorts and curvlens's lowest-index
tie rule select the same entries. Where curvlens runs mergekit's fp32
operations in mergekit's order the results are compared bit for bit.
"""
import pytest
import torch

mergekit_api = pytest.importorskip(
    "mergekit.merge_methods.api",
    reason="mergekit is not installed: pip install -e '.[parity]' (CI installs it) to compare with it")

# the same inputs and calls as the parity tests of the methods both had before
from tests.math.test_mergekit_parity import SHAPES, _inputs, _mergekit, _ours  # noqa: E402


def _exact(a, b):
    # Same fp32 operations in the same order: the same bits.
    torch.testing.assert_close(a, b, atol=0.0, rtol=0.0)


# -- breadcrumbs ---------------------------------------------------------------


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("shape", SHAPES + [(3, 4, 5)])
@pytest.mark.parametrize(
    "params",
    [
        {"weight": [1.0, 1.0, 1.0]},  # density 1: no pruning (gamma ignored, as in mergekit)
        {"weight": [1.0, 1.0, 1.0], "density": 0.5},  # default gamma 0.01
        {"weight": [0.5, -1.0, 2.0], "density": [0.3, 0.6, 0.9], "gamma": [0.1, 0.0, 0.05]},
        {"weight": [1.0, 1.0, 1.0], "density": 0.6, "gamma": 0.7},  # outlier cut shrinks to fit
        {"weight": [0.4, 0.9, 1.3], "density": 0.4, "gamma": 0.2, "rescale": True,
         "normalize": True, "lambda": 0.7, "int8_mask": True},
        {"weight": [1.0, 1.0, 1.0], "density": 0.01},  # int(density * n) = 0: nothing kept
    ],
)
def test_breadcrumbs(method, shape, params):
    base, experts = _inputs(shape)
    _exact(_ours(method, base, experts, params), _mergekit(method, base, experts, params))


# -- DELLA ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("shape", [(7,), (6, 5), (3, 4, 5), (2, 1)])
@pytest.mark.parametrize(
    "params",
    [
        {"weight": [1.0, 1.0, 1.0], "density": 0.5},  # default epsilon 0.15
        {"weight": [0.4, 0.9, 1.3], "density": [0.3, 1.0, 0.7], "epsilon": [0.1, 0.0, 0.25]},
        {"weight": [1.0, -1.0, 2.0], "density": 0.6, "epsilon": 0.3, "rescale": False, "lambda": 0.8,
         "normalize": True},
        {"weight": [1.0, 1.0, 1.0], "density": 0.4, "normalize": False, "int8_mask": True},
    ],
)
def test_della_same_generator_same_bits(method, shape, params):
    # mergekit draws from torch's global generator, curvlens from an explicit one;
    # seeded alike, the draws (one Bernoulli per entry, experts in order) match.
    seed = 0 if method == "della" else 17
    base, experts = _inputs(shape)
    if shape == (2, 1):  # rows of one entry: mergekit's keep probability is NaN (it raises)
        with pytest.raises(RuntimeError):
            _mergekit(method, base, experts, params)
        return
    torch.manual_seed(seed)
    theirs = _mergekit(method, base, experts, params)
    _exact(_ours(method, base, experts, params, rng=torch.Generator().manual_seed(seed)), theirs)


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("budget", [None, 0])
def test_della_over_several_blocks(monkeypatch, rescale, budget):
    # 17-entry blocks over rows of 9: rows straddle curvlens's blocks; budget 0
    # redraws the masks from the saved generator state instead of keeping them.
    # The masks (ranks and draws) are mergekit's, so without rescale the bits
    # are. With rescale the two L1 norms are curvlens's per-block fp32 sums added
    # in double against mergekit's one fp32 sum: the factor moves by an fp32
    # rounding or two (observed: < 1e-6 absolute on entries of size ~3), inside
    # assert_close's fp32 defaults (rtol 1.3e-6, atol 1e-5).
    from curvlens.math.methods import sparsify

    monkeypatch.setattr("curvlens.math.methods.task_arithmetic.block_size", lambda dev: 17)
    if budget is not None:
        monkeypatch.setattr(sparsify, "DARE_MASK_BUDGET", budget)
    base, experts = _inputs((40, 9))
    params = {"weight": [0.4, 0.9, 1.3], "density": 0.5, "epsilon": 0.2, "rescale": rescale}
    torch.manual_seed(4)
    theirs = _mergekit("della", base, experts, params)
    ours = _ours("della", base, experts, params, rng=torch.Generator().manual_seed(4))
    if rescale:
        torch.testing.assert_close(ours, theirs)
    else:
        _exact(ours, theirs)


# -- Model Stock -----------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES + [(3, 4, 5)])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_model_stock(shape, filter_wise, n):
    base, experts = _inputs(shape, n=n)
    params = {"filter_wise": filter_wise}
    _exact(_ours("model_stock", base, experts, params), _mergekit("model_stock", base, experts, params))


# -- the spherical family --------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES + [(3, 4, 5)])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0, 1.4])
def test_slerp(shape, t):
    base, experts = _inputs(shape, n=1)
    _exact(_ours("slerp", base, experts, {"t": t}), _mergekit("slerp", base, experts, {"t": t}))


def test_slerp_collinear_and_chunked():
    base, experts = _inputs((5, 3), n=1)
    # collinear: the linear branch
    _exact(_ours("slerp", base, [2 * base], {"t": 0.3}), _mergekit("slerp", base, [2 * base], {"t": 0.3}))
    # more than one of mergekit's 2**20-entry chunks
    g = torch.Generator().manual_seed(5)
    big = torch.randn(1100, 1000, generator=g)
    other = big + torch.randn(1100, 1000, generator=g)
    _exact(_ours("slerp", big, [other], {"t": 0.25}), _mergekit("slerp", big, [other], {"t": 0.25}))


@pytest.mark.parametrize("shape", SHAPES + [(3, 4, 5)])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize(
    "params",
    [
        {"weight": [1.0, 1.0]},
        {"weight": [0.3, 0.9]},
        {"weight": [1.0, -1.0]},  # weights summing to 0: t = 0.5
        {"weight": [0.3, 0.9], "nuslerp_flatten": False},
        {"weight": [0.3, 0.9], "nuslerp_flatten": False, "nuslerp_row_wise": True},
        {"weight": [0.3, 0.9], "nuslerp_row_wise": True},  # flatten wins
    ],
)
def test_nuslerp(shape, with_base, params):
    base, experts = _inputs(shape, n=2)
    base = base if with_base else None
    _exact(_ours("nuslerp", base, experts, params), _mergekit("nuslerp", base, experts, params))


@pytest.mark.parametrize("shape", SHAPES + [(3, 4, 5)])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize(
    "params",
    [
        {"weight": [1.0, 1.0, 1.0]},
        {"weight": [0.2, 1.5, 0.7]},
        {"weight": [0.2, 1.5, 0.7], "normalize_weights": False},
        {"weight": [0.2, 1.5, 0.7], "eps": 1e-3},
    ],
)
def test_multislerp(shape, with_base, params):
    base, experts = _inputs(shape)
    base = base if with_base else None
    _exact(_ours("multislerp", base, experts, params), _mergekit("multislerp", base, experts, params))


def test_multislerp_antipodal_pair_falls_back_to_linear():
    x = torch.tensor([1.0, 2.0, -0.5])
    params = {"weight": [1.0, 1.0]}
    _exact(_ours("multislerp", None, [x, -x], params), _mergekit("multislerp", None, [x, -x], params))


@pytest.mark.parametrize("shape", SHAPES + [(3, 4, 5), (300, 301)])  # (300, 301): more than one CPU block
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("params", [{}, {"max_iter": 1}, {"max_iter": 0}, {"max_iter": 50, "tol": 1e-7},
                                    {"tol": 0.5}])
def test_karcher(shape, with_base, params):
    # With a base, mergekit adds base_model to the inputs (last, when it is not
    # listed under models); curvlens puts the base last in the mean too.
    base, experts = _inputs(shape)
    theirs = mergekit_api.merge_tensors([*experts, base] if with_base else experts, "karcher",
                                        parameters=params, base_index=3 if with_base else None)
    _exact(_ours("karcher", base if with_base else None, experts, params), theirs)


# -- SCE, Arcee Fusion, passthrough ---------------------------------------------


@pytest.mark.parametrize("shape", SHAPES + [(3, 4, 5)])
@pytest.mark.parametrize("params", [{}, {"select_topk": 0.5}, {"select_topk": 0.3, "int8_mask": True},
                                    {"select_topk": 0.1}, {"select_topk": 0.0}])
def test_sce(shape, params):
    base, experts = _inputs(shape)
    _exact(_ours("sce", base, experts, params), _mergekit("sce", base, experts, params))


def test_sce_k_is_computed_in_fp32():
    # 30 nonzero variances * 0.3 is 9 in fp32 (mergekit) but 8 in double.
    base, experts = _inputs((6, 5))
    _exact(_ours("sce", base, experts, {"select_topk": 0.3}), _mergekit("sce", base, experts, {"select_topk": 0.3}))
    from curvlens.math.methods.sce import variance_mask
    taus = torch.stack([e - base for e in experts])
    assert int(variance_mask(taus, 0.3).sum()) == 9


@pytest.mark.parametrize("shape", SHAPES + [(3, 4, 5), (40, 33)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_arcee_fusion(shape, seed):
    # Up to 10**6 entries mergekit uses the exact quartiles, as curvlens always does.
    base, experts = _inputs(shape, n=1, seed=seed)
    _exact(_ours("arcee_fusion", base, experts, {}), _mergekit("arcee_fusion", base, experts, {}))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [None, 0.5, -2.0])
def test_passthrough(shape, scale):
    _, experts = _inputs(shape, n=1)
    params = {} if scale is None else {"scale": scale}
    _exact(_ours("passthrough", None, experts, params), _mergekit("passthrough", None, experts, params))
