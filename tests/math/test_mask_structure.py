import math

import numpy as np
import pytest
import torch

from curvlens.errors import CurvlensError
from curvlens.math.mask_structure import mask_jaccard, mask_structure
from curvlens.math.sketches import full_rank_singular_values as _full_rank_singular_values


def _low_rank_mask(m, n, r, seed, drop_rows=0.2):
    """Each row is one of ``r`` random 0/1 template rows (or empty): rank <= r."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(r, n, generator=g) < 0.4
    mask = templates[torch.randint(r, (m,), generator=g)]
    mask[torch.rand(m, generator=g) < drop_rows] = False
    return mask


def test_outer_product_mask_has_rank_one_on_both_paths():
    rows = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.bool)
    cols = torch.tensor([0, 1, 1, 0, 1], dtype=torch.bool)
    mask = rows[:, None] & cols[None, :]
    exact = mask_structure(mask)
    rand = mask_structure(mask, rank_exact_max=0, sketch_size=4)
    for s, method in ((exact, "exact"), (rand, "randomized")):
        assert s["mask_rank"] == 1.0
        assert s["mask_effective_rank"] == pytest.approx(1.0, abs=1e-5)
        assert s["rank_method"] == method
    assert rand["rank_cap"] == 4.0 and rand["rank_capped"] is False
    assert math.isnan(exact["rank_cap"])


def test_known_row_and_col_sparsity_and_density():
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[0, 1:] = True
    mask[2, [1, 3]] = True
    s = mask_structure(mask)
    assert s["kept_frac"] == 6 / 20
    assert s["row_sparsity"] == 2 / 4  # rows 1 and 3 empty
    assert s["col_sparsity"] == 1 / 5  # column 0 empty
    assert s["mask_rank"] == 2.0


def test_exact_rank_matches_numpy_matrix_rank():
    g = torch.Generator().manual_seed(0)
    for m, n, p in ((30, 20, 0.3), (25, 25, 0.05), (40, 12, 0.9)):
        mask = torch.rand(m, n, generator=g) < p
        assert mask_structure(mask)["mask_rank"] == np.linalg.matrix_rank(mask.numpy().astype(float))
    lr = _low_rank_mask(60, 40, 5, seed=1)
    assert mask_structure(lr)["mask_rank"] == np.linalg.matrix_rank(lr.numpy().astype(float)) == 5


def test_effective_rank_of_identity_and_block_masks():
    s = mask_structure(torch.eye(6, dtype=torch.bool))
    assert s["mask_effective_rank"] == pytest.approx(6.0)  # six equal singular values
    # Two disjoint all-ones blocks 2x2 and 4x4: singular values 2 and 4 (p = 1/3, 2/3).
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[:2, :2] = True
    mask[2:, 2:] = True
    p = np.array([1 / 3, 2 / 3])
    assert mask_structure(mask)["mask_effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))


def test_randomized_path_agrees_with_exact_on_low_rank_mask():
    mask = _low_rank_mask(300, 200, 7, seed=2)
    g = torch.Generator().manual_seed(3)
    # A task vector dominated by a few directions: the randomized norm is then tight.
    tau = torch.randn(300, 4, generator=g) @ torch.randn(4, 200, generator=g) + 0.01 * torch.randn(300, 200, generator=g)
    exact = mask_structure(mask, tau)
    rand = mask_structure(mask, tau, rank_exact_max=100, sketch_size=32, rng=5)
    assert exact["rank_method"] == "exact" and rand["rank_method"] == "randomized"
    assert rand["mask_rank"] == exact["mask_rank"] == 7.0
    assert rand["rank_capped"] is False
    assert rand["mask_effective_rank"] == pytest.approx(exact["mask_effective_rank"], rel=1e-4)
    assert rand["stable_rank"] == pytest.approx(exact["stable_rank"], rel=1e-3)
    assert rand["stable_rank"] >= exact["stable_rank"] * (1 - 1e-6)  # an upper estimate
    for key in ("kept_frac", "row_sparsity", "col_sparsity"):
        assert rand[key] == exact[key]


def test_randomized_rank_reports_the_cap():
    g = torch.Generator().manual_seed(4)
    mask = torch.rand(120, 80, generator=g) < 0.5  # full rank 80
    s = mask_structure(mask, rank_exact_max=0, sketch_size=16)
    assert s["mask_rank"] == 16.0 and s["rank_cap"] == 16.0 and s["rank_capped"] is True
    assert math.isnan(s["mask_effective_rank"])


def test_randomized_path_is_reproducible():
    mask = _low_rank_mask(100, 60, 3, seed=6)
    tau = torch.randn(100, 60, generator=torch.Generator().manual_seed(7))
    a = mask_structure(mask, tau, rank_exact_max=0, sketch_size=8)
    b = mask_structure(mask, tau, rank_exact_max=0, sketch_size=8)
    assert a == b


def test_stable_rank_and_saliency_kept_known_values():
    u = torch.tensor([1.0, 2.0, 3.0])
    w = torch.tensor([1.0, -1.0, 2.0, 0.5])
    tau = torch.outer(u, w)
    full = torch.ones(3, 4, dtype=torch.bool)
    assert mask_structure(full, tau)["stable_rank"] == pytest.approx(1.0)
    diag = torch.eye(3, 4, dtype=torch.bool)  # A = diag(1, -2, 6): ||A||_F^2 = 41, ||A||_2 = 6
    assert mask_structure(diag, tau)["stable_rank"] == pytest.approx(41 / 36)
    sal = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert mask_structure(diag, saliency=sal)["saliency_kept"] == pytest.approx((0 + 5 + 10) / 66)


def test_one_dimensional_mask_gets_density_only():
    mask = torch.tensor([True, False, True, True])
    s = mask_structure(mask, tau=torch.ones(4), saliency=torch.tensor([1.0, 1.0, 1.0, 1.0]))
    assert s["kept_frac"] == 0.75 and s["saliency_kept"] == 0.75
    for key in ("row_sparsity", "col_sparsity", "mask_rank", "mask_effective_rank", "stable_rank"):
        assert math.isnan(s[key])
    assert s["rank_method"] == "none"


def test_empty_mask_and_higher_dimensional_mask():
    s = mask_structure(torch.zeros(3, 4, dtype=torch.bool), tau=torch.ones(3, 4))
    assert s["mask_rank"] == 0.0 and s["mask_effective_rank"] == 0.0
    assert math.isnan(s["stable_rank"]) and s["row_sparsity"] == 1.0
    conv = torch.zeros(2, 3, 2, dtype=torch.bool)  # viewed as 2 x 6
    conv[0] = True
    s = mask_structure(conv)
    assert s["mask_rank"] == 1.0 and s["row_sparsity"] == 0.5


def test_numeric_zero_one_masks_are_accepted_others_rejected():
    assert mask_structure(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))["mask_rank"] == 2.0
    with pytest.raises(CurvlensError, match="0/1"):
        mask_structure(torch.tensor([[0.5, 1.0]]))


def test_shape_mismatch_names_every_shape():
    with pytest.raises(CurvlensError, match=r"mask \(2, 3\).*tau \(3, 2\)"):
        mask_structure(torch.ones(2, 3, dtype=torch.bool), tau=torch.ones(3, 2))
    with pytest.raises(CurvlensError, match=r"mask_a \(2,\).*mask_b \(3,\)"):
        mask_jaccard(torch.ones(2, dtype=torch.bool), torch.ones(3, dtype=torch.bool))


def test_mask_overlap_known_values():
    a = torch.tensor([[1, 1, 0], [0, 1, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 0, 0], [0, 1, 1]], dtype=torch.bool)
    assert mask_jaccard(a, b) == pytest.approx(2 / 4)
    assert mask_jaccard(a, a) == 1.0
    empty = torch.zeros(2, 3, dtype=torch.bool)
    assert mask_jaccard(empty, empty) == 1.0
    assert mask_jaccard(a, empty) == 0.0


def test_zero_task_vector_on_kept_entries_gives_nan_stable_rank():
    mask = _low_rank_mask(50, 40, 3, seed=8)
    tau = torch.ones(50, 40)
    tau[mask] = 0.0
    for limit in (10**6, 0):  # exact and randomized paths
        s = mask_structure(mask, tau, rank_exact_max=limit, sketch_size=8)
        assert math.isnan(s["stable_rank"]) and s["mask_rank"] == 3.0


@pytest.mark.parametrize("shape,p,seed", [((256, 1024), 0.3, 0), ((1024, 256), 0.1, 1), ((100, 300), 0.02, 2),
                                          ((64, 64), 0.5, 3), ((33, 7), 0.9, 4)])
def test_exact_rank_by_gram_equals_the_svd(shape, p, seed):
    """Full-rank masks are decided from their integer Gram matrix: the same rank as
    numpy's matrix_rank, the effective rank within rounding."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(*shape, generator=g) < p
    out = mask_structure(m, rank_exact_max=10**9)
    red = m[m.any(1)][:, m.any(0)].double()
    s = torch.linalg.svdvals(red)
    assert out["mask_rank"] == float(np.linalg.matrix_rank(m.double().numpy()))
    q = s / s.sum()
    assert out["mask_effective_rank"] == pytest.approx(float(torch.exp(-(q * torch.log(q)).sum())), rel=1e-9)


def test_rank_deficient_masks_go_to_the_svd():
    """A mask whose Gram matrix has (numerically) zero eigenvalues is left to the SVD."""
    g = torch.Generator().manual_seed(5)
    rows = torch.rand(300, 4, generator=g) < 0.5
    cols = torch.rand(4, 500, generator=g) < 0.5
    m = (rows.double() @ cols.double()) > 0  # a union of 4 rectangles: rank <= 15
    out = mask_structure(m, rank_exact_max=10**9)
    assert out["mask_rank"] == float(np.linalg.matrix_rank(m.double().numpy())) <= 15
    red = m[m.any(1)][:, m.any(0)].double()
    assert _full_rank_singular_values(red) is None


@pytest.mark.parametrize("rows, cols", [(None, None), ([0, 2, 3, 5, 8, 9, 10], [1, 4, 6, 7])])
def test_row_blocks_are_whole_up_to_a_size_and_cache_sized_above(monkeypatch, rows, cols):
    from curvlens.math import sketches
    g = torch.Generator().manual_seed(3)
    mask, tau = torch.rand(11, 8, generator=g) < 0.5, torch.randn(11, 8, generator=g)
    r = None if rows is None else torch.tensor(rows)
    c = None if cols is None else torch.tensor(cols)
    want = (mask * tau)[r if r is not None else slice(None)][:, c if c is not None else slice(None)]
    n = want.shape[1]
    monkeypatch.setattr(sketches, "ROW_BLOCK", 3 * n)
    monkeypatch.setattr(sketches, "WHOLE_MAX", want.numel())  # fits: one block, built once
    whole = sketches.RowBlocks(mask, tau, r, c, torch.float64)
    first, again = list(whole), list(whole)
    assert [(s, e) for s, e, _ in first] == [(0, want.shape[0])] and first[0][2] is again[0][2]
    monkeypatch.setattr(sketches, "WHOLE_MAX", want.numel() - 1)  # one entry more: blocks of 3 rows
    blocks = list(sketches.RowBlocks(mask, tau, r, c, torch.float64))
    assert [e - s for s, e, _ in blocks] == [3] * (want.shape[0] // 3) + [want.shape[0] % 3] * (want.shape[0] % 3 > 0)
    for got in (first, blocks):
        assert torch.equal(torch.cat([b for _, _, b in got]), want.double())


@pytest.mark.parametrize("iters", [0, 1, 2])
@pytest.mark.parametrize("shape", [(300, 200), (64, 900), (900, 64)])
def test_krylov_top_singular_value_is_a_lower_bound_whatever_the_blocks(monkeypatch, shape, iters):
    from curvlens.math import sketches
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(*shape, generator=g) < 0.3
    flat = torch.randn(*shape, generator=g)  # a flat spectrum: the hard case
    spiked = flat + 20 * torch.randn(shape[0], 1, generator=g) @ torch.randn(1, shape[1], generator=g)
    for tau in (flat, spiked):
        a = (mask * tau).double()
        true = float(torch.linalg.matrix_norm(a, 2))
        fro2 = float(a.square().sum())
        one, f1 = sketches.krylov_top_sv(sketches.RowBlocks(mask, tau, None, None, torch.float32), 16, iters,
                                          sketches.Draws(0))
        monkeypatch.setattr(sketches, "ROW_BLOCK", 7 * shape[1])  # several blocks, the last one short
        monkeypatch.setattr(sketches, "WHOLE_MAX", 0)
        many, f2 = sketches.krylov_top_sv(sketches.RowBlocks(mask, tau, None, None, torch.float32), 16, iters,
                                           sketches.Draws(0))
        monkeypatch.undo()
        assert one <= true * (1 + 1e-5) and many <= true * (1 + 1e-5)
        assert many == pytest.approx(one, rel=1e-5) and f1 == pytest.approx(fro2, rel=1e-6) == f2
        # a dominant direction is found; more iterations never lose ground
        if tau is spiked:
            assert one == pytest.approx(true, rel=0.1 if iters == 0 else 1e-4)
        else:
            assert one > 0.8 * true


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("opts", [{}, {"rank_exact_max": 0}, {"rank_exact_max": 0, "fro2": 1.0}])
def test_a_non_finite_task_vector_where_kept_is_named_on_every_path(bad, opts, monkeypatch):
    from curvlens.math import sketches
    g = torch.Generator().manual_seed(9)
    mask = torch.rand(60, 40, generator=g) < 0.3
    tau = torch.randn(60, 40, generator=g)
    mask[3, 5], tau[3, 5] = True, bad
    for sparse in (True, False):
        with monkeypatch.context() as mp:
            if not sparse:
                mp.setattr(sketches.MaskIndex, "build", classmethod(lambda cls, *a, **k: None))
            with pytest.raises(CurvlensError, match="tau has 1 non-finite value"):
                mask_structure(mask, tau, **opts)
    mask[3, 5] = False  # where the mask keeps nothing, a bad value is not read
    s = mask_structure(mask, tau, **opts)
    assert math.isfinite(s["stable_rank"])
    tau.zero_()  # a zero task vector where kept: NaN, not an error
    assert math.isnan(mask_structure(mask, tau, **{k: v for k, v in opts.items() if k != "fro2"})["stable_rank"])
