"""The rank sketches' sparse products (curvlens/math/native/sparse.c through
:class:`curvlens.math.sparse_rows.SparseRows`) against dense float64 products, the
plain C build against the AVX2 one, and :func:`mask_structure` on its sparse
path against its dense one."""
import math

import pytest
import torch

from curvlens.errors import CurvlensError
from curvlens.math import native, sketches
from curvlens.math.mask_structure import mask_structure

pytestmark = pytest.mark.skipif(native.lib() is None, reason="no C kernels")

# shapes with rows of no kept entry, columns below and across the AVX2 loop's 32
# bytes, a single row and a single column
SHAPES = [(37, 70), (5, 33), (1, 100), (300, 1), (64, 256)]


def _case(shape, density, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(*shape, generator=g) < density
    if shape[0] >= 3:
        mask[shape[0] // 2] = False  # an empty row
    tau = (torch.randn(*shape, generator=g) * 10.0 ** torch.randint(-3, 4, shape, generator=g)).to(dtype)
    return mask, tau


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [16, 5, 40])  # the Krylov block, and widths the wrapper pads
def test_products_equal_dense_float64_products(shape, dtype, k):
    mask, tau = _case(shape, 0.3, seed=k + shape[0])
    idx = sketches.MaskIndex.build(mask, int(mask.sum()), tau)
    assert idx is not None
    a = mask.double() * tau.double()  # the values the kernels widen, exactly
    assert idx.fro2 == pytest.approx(float(a.square().sum()), rel=1e-12)
    g = torch.Generator().manual_seed(1)
    x, q = torch.randn(shape[1], k, generator=g), torch.randn(shape[0], k, generator=g)
    for op in (sketches.SparseRows(idx, values=True), sketches.SparseRows(idx, values=False)):
        ref = a if op.values else mask.double()
        y, _ = op.mm(x)
        z = op.rmm(q)
        assert y.shape == (shape[0], k) and z.shape == (shape[1], k) and y.dtype == op.dtype
        want_y, want_z = ref @ x.double(), ref.T @ q.double()
        tol = 1e-5 if op.dtype == torch.float32 else 1e-13
        scale_y = (ref.abs() @ x.double().abs()).clamp_min(1e-300)
        scale_z = (ref.abs().T @ q.double().abs()).clamp_min(1e-300)
        assert ((y.double() - want_y).abs() <= tol * scale_y).all()
        assert ((z.double() - want_z).abs() <= tol * scale_z).all()
        if shape[0] >= 3:
            assert torch.equal(y[shape[0] // 2], torch.zeros(k, dtype=op.dtype))  # the empty row
        # ||A||_F^2 whether or not the index took it
        _, f = op.mm(x, with_fro2=True)
        assert f == pytest.approx(float(ref.square().sum()), rel=1e-12)
        if op.values:
            bare = sketches.MaskIndex.build(mask, int(mask.sum()), tau, with_fro2=False)
            assert bare.fro2 is None
            assert sketches.SparseRows(bare, values=True).mm(x, with_fro2=True)[1] == pytest.approx(f, rel=1e-12)


def test_the_plain_c_build_gives_the_avx2_builds_bits(plain_c_build, monkeypatch):
    shape = (57, 300)  # rows with and without a multiple of 4 kept entries, a tail past 32 bytes
    for dtype in (torch.float32, torch.bfloat16):
        mask, tau = _case(shape, 0.4, seed=3, dtype=dtype)
        g = torch.Generator().manual_seed(2)
        x, q = torch.randn(shape[1], 32, generator=g), torch.randn(shape[0], 32, generator=g)
        runs = []
        for lib in (native.lib(), plain_c_build):
            with monkeypatch.context() as mp:
                mp.setitem(native._STATE, "lib", lib)
                idx = sketches.MaskIndex.build(mask, int(mask.sum()), tau)
                out = [idx.row_ptr, idx.col, idx.val, torch.tensor(idx.fro2)]
                for op in (sketches.SparseRows(idx, values=True), sketches.SparseRows(idx, values=False)):
                    out += [op.mm(x)[0], op.rmm(q)]
                runs.append(out)
        for a, b in zip(*runs):
            assert torch.equal(a, b)


def test_the_index_is_declined_where_dense_products_are_used(monkeypatch):
    mask, tau = _case((40, 50), 0.3, seed=0)
    n = int(mask.sum())
    assert sketches.MaskIndex.build(mask, n) is not None
    assert sketches.MaskIndex.build(torch.ones(40, 50, dtype=torch.bool), 2000) is None  # over half kept
    assert sketches.MaskIndex.build(mask.T, n) is None  # not contiguous
    assert sketches.MaskIndex.build(mask, n, tau.double()) is None  # a dtype the kernels do not read
    assert sketches.MaskIndex.build(mask, 0) is None
    with pytest.raises(CurvlensError, match="no values"):
        sketches.SparseRows(sketches.MaskIndex.build(mask, n), values=True)
    wide = torch.zeros(1, 70000, dtype=torch.bool)
    wide[0, -5:] = True
    assert sketches.MaskIndex.build(wide, 5) is None  # past uint16 column indices
    monkeypatch.setenv("CURVLENS_NATIVE", "0")
    assert sketches.MaskIndex.build(mask, n) is None


@pytest.mark.parametrize("claimed", [-1, +1, -50])
def test_a_wrong_kept_count_is_an_error_not_a_write_past_the_index(claimed):
    mask, _ = _case((40, 50), 0.3, seed=4)
    n = int(mask.sum())
    with pytest.raises(CurvlensError, match=f"n_kept={n + claimed}"):
        sketches.MaskIndex.build(mask, n + claimed)


def test_the_index_kernel_never_writes_past_its_capacity():
    mask, tau = _case((40, 50), 0.3, seed=5)
    n = int(mask.sum())
    for cap in (n - 1, n - 30, 0):
        col = torch.full((n + 64,), -7, dtype=torch.int16)  # room past cap, filled with a sentinel
        row_ptr = torch.empty(41, dtype=torch.int64)
        val = torch.full((n + 64,), -7.0)
        got = native.lib().cl_sp_index(mask.view(torch.uint8).data_ptr(), 40, 50, cap, row_ptr.data_ptr(),
                                       col.data_ptr(), tau.data_ptr(), 0, val.data_ptr(), None)
        assert got == -1 and (col[cap:] == -7).all() and (val[cap:] == -7.0).all()


@pytest.mark.parametrize("shape, density", [((400, 300), 0.1), ((300, 400), 0.3), ((2000, 64), 0.5), ((90, 700), 0.2)])
def test_mask_structure_sparse_path_agrees_with_the_dense_one(monkeypatch, shape, density):
    g = torch.Generator().manual_seed(7)
    mask = torch.rand(*shape, generator=g) < density
    low = torch.zeros(*shape, dtype=torch.bool)
    low[: shape[0] // 3] = torch.rand(shape[1], generator=g) < density  # rank 1
    for m in (mask, low):
        tau = torch.randn(*shape, generator=g)
        opts = dict(rank_exact_max=0, sketch_size=32, power_iters=1, rng=11)
        for fro2 in (None, float((m * tau).double().square().sum())):
            sparse = mask_structure(m, tau, fro2=fro2, **opts)
            with monkeypatch.context() as mp:
                mp.setattr(sketches.MaskIndex, "build", classmethod(lambda cls, *a, **k: None))
                dense = mask_structure(m, tau, fro2=fro2, **opts)
            assert sparse["rank_method"] == dense["rank_method"] == "randomized"
            for key in ("mask_rank", "rank_capped", "rank_cap", "kept_frac", "row_sparsity", "col_sparsity"):
                assert sparse[key] == dense[key], key
            for key in ("stable_rank", "mask_effective_rank"):
                if math.isnan(dense[key]):
                    assert math.isnan(sparse[key])
                else:
                    assert sparse[key] == pytest.approx(dense[key], rel=1e-4), key


def test_rank_at_least_proves_with_the_gram_matrix_and_falls_back_to_the_svd(monkeypatch):
    g = torch.Generator().manual_seed(8)
    noise = torch.rand(600, 200, generator=g) < 0.3  # rank 200: 32 of any 128 rows are independent
    low = torch.rand(5, 200, generator=g)[torch.randint(5, (600,), generator=g)] < 0.5  # rank <= 5
    calls = []
    svd = torch.linalg.svdvals
    monkeypatch.setattr(torch.linalg, "svdvals", lambda *a, **k: calls.append(1) or svd(*a, **k))
    assert sketches.rank_at_least(noise, 32, int(noise.sum()), 0, torch.float64) is True
    assert calls == []  # the Gram matrix proved it
    assert sketches.rank_at_least(low, 32, int(low.sum()), 0, torch.float64) is False
    assert calls == [1]  # rank-deficient: the SVD decided


@pytest.mark.parametrize("shape", [(32, 1000), (1000, 32), (1, 5), (3, 3)])
def test_top_singular_value_and_eigenvalue_match_lapack(shape):
    b = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0]))
    assert sketches.top_singular_value(b) == pytest.approx(float(torch.linalg.svdvals(b.double())[0]), rel=1e-12)
    gram = b.double() @ b.double().T
    assert sketches.top_eigenvalue(gram) == pytest.approx(float(torch.linalg.eigvalsh(gram)[-1]), rel=1e-12)
    assert sketches.top_singular_value(torch.zeros(4, 9)) == 0.0
