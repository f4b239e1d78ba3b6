"""Structure of one FFG mask: density, row/column sparsity, rank, effective rank.

The paper finds FFG masks "extremely low-rank, with rows/columns almost entirely on
or off". :func:`mask_structure` measures exactly those properties for one 2-D mask (and
the task vector it keeps); :func:`mask_overlap` compares two masks.

Rank needs singular values. Small masks get an exact float64 SVD. Large ones (a
128256 x 4096 embedding) get a randomized range finder (Halko, Martinsson & Tropp
2011) that reads the mask one block of rows at a time (memory: one float block
plus an ``m x sketch_size`` sketch). It is exact when the rank is below the
sketch size; above it only "rank >= cap" is known and reported, and a sample of
``4 * sketch_size`` rows usually proves that first, for a fraction of the cost
(:func:`rank_at_least`). Measured (2 shared EPYC cores, load ~5, torch 2.13) on
a 128256 x 4096 mask of rank 20: 25 s mask only, 53 s with ``tau`` (the stable
rank's Krylov passes), +0.34 GB peak RSS either way (a float32 copy of the mask
alone would take 2.1 GB). On a GPU the same code runs on the mask's device.

On the CPU, a mask that keeps at most half its entries (every FFG mask at the
usual densities) is first indexed: each row's kept columns and ``tau``'s values
there (:class:`~curvlens.math.sketches.MaskIndex`, 6 bytes per kept entry), and
both sketches' products visit only those entries (``native/sparse.c``). Measured
on a 2816 x 1024 mask, one thread: the stable rank's Krylov estimate takes
2.3-2.5 ms at 10% kept and 4.4-4.5 ms at 30%, against 8-11 ms dense.
"""
from __future__ import annotations

import math
import torch

from curvlens.errors import CurvlensError
from curvlens.math.checks import as_bytes, as_tensor, check_same_shape, chunks, ratio
from curvlens.math.sketches import (
    NORM_BLOCK, MaskIndex, RowBlocks, SparseRows, draws, float64_ok, full_rank_singular_values, gaussian, krylov_top_sv,
    range_finder_svdvals, rank_and_effective_rank, rank_at_least, top_eigenvalue,
)

__all__ = ["mask_structure", "mask_jaccard", "saliency_share"]

# Exact float64 SVD up to this many entries (after dropping all-zero rows/columns).
# A 2048 x 2048 float64 SVD takes a few seconds on 2 CPU cores; 4096 x 4096 takes
# about a minute, too slow to do for every tensor of a model on a CPU.
RANK_EXACT_MAX = 2048 * 2048


def _as_mask(name: str, mask) -> torch.Tensor:
    """A bool tensor from a bool or 0/1 numeric tensor (anything else is an error)."""
    mask = as_tensor(name, mask)
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise CurvlensError(f"{name} must be a bool or 0/1 tensor; got dtype {mask.dtype} "
                            "with values other than 0 and 1")
    return mask != 0


def mask_structure(mask, tau=None, saliency=None, rank_exact_max: int = RANK_EXACT_MAX,
               rng=None, *, sketch_size: int = 128, power_iters: int = 2, n_kept: int | None = None,
               row_counts=None, col_counts=None, fro2: float | None = None) -> dict:
    """Density, row/column sparsity and rank of one mask, and how much it keeps.

    Parameters
    ----------
    mask : torch.Tensor
        Bool (or 0/1) mask, True = entry kept. 2-D masks get every statistic; masks
        with more dimensions are viewed as ``(shape[0], -1)`` (output x input);
        0-D/1-D masks (biases, norms) get only ``kept_frac`` and ``saliency_kept``.
    tau : torch.Tensor, optional
        Task vector of the same shape; enables ``stable_rank``.
    saliency : torch.Tensor, optional
        Saliency of the same shape (e.g. ``v * tau**2``); enables ``saliency_kept``.
    rank_exact_max : int
        Use an exact float64 SVD when the mask, after dropping its all-zero rows and
        columns (which changes no non-zero singular value), has at most this many
        entries; otherwise the randomized path.
    rng : None, int or torch.Generator
        Randomness of the randomized path (a CPU generator). None means seed 0,
        so results are reproducible by default.
    sketch_size : int
        Columns of the random sketch in the randomized path; also the cap on the
        rank it can report. Cost grows linearly with it.
    power_iters : int
        Iterations of the block Krylov estimate of ``||mask * tau||_2`` in the
        randomized path (2 passes over the rows each); only used with ``tau``.
    n_kept, row_counts, col_counts, fro2 : optional
        The mask's kept entries, per row / column of its 2-D view, and (with
        ``tau``) ``||mask * tau||_F^2``, when the caller already has them
        (:func:`curvlens.passes.analyze_masks.mask_sweep` counts and sums them,
        in float64, in the sweep that builds the mask): not computed again (the
        randomized path's stable rank uses that ``fro2``).

    Returns
    -------
    dict
        ``kept_frac``
            Fraction of entries kept.
        ``row_sparsity``, ``col_sparsity``
            Fraction of rows / columns with no kept entry.
        ``mask_rank``
            Numerical rank of the 0/1 mask as a float matrix, with numpy's
            ``matrix_rank`` tolerance ``S.max() * max(M, N) * eps`` (float64 eps,
            ``M, N`` the full shape). Exact path: float64 SVD. Randomized path:
            float64 range finder with ``sketch_size`` columns; exact when the rank
            is below ``sketch_size``, else ``rank_cap`` with ``rank_capped``
            True (the true rank is at least that).
        ``mask_effective_rank``
            ``exp(H)`` with ``H`` the entropy of the singular values above the
            rank tolerance, normalised to sum 1 (Roy & Vetterli 2007); 0.0 for an
            empty mask. Exact in both paths when not capped; nan when
            ``rank_capped``: it depends on the whole spectrum, and an uncaptured
            tail of many small singular values can carry much of the sum (the top
            128 of a random 4000 x 1000 mask give 104 where the truth is 925).
        ``stable_rank``
            ``||A||_F^2 / ||A||_2^2`` for ``A = mask * tau`` (nan without ``tau`` or
            when ``A`` is zero). ``||A||_F`` is exact (float64). Exact path:
            ``||A||_2`` from the float64 Gram matrix. Randomized path: from a
            float32, 16-column block Krylov sketch, which can only underestimate
            it, so the stable rank is then an upper estimate: within 0.01% when a
            few directions dominate ``A``, up to ~10% high (``power_iters=2``) for
            a noise-like ``A`` with a flat spectrum (measured on masked
            4000 x 1000 Gaussian matrices); raise ``power_iters`` to tighten it.
        ``saliency_kept``
            ``sum(saliency[mask]) / sum(saliency)`` (nan without ``saliency`` or when
            its sum is 0).
        ``rank_method``
            ``'exact'``, ``'randomized'``, or ``'none'`` for 0-D/1-D masks.
        ``rank_cap``
            ``sketch_size`` (after clipping to the matrix size) in the randomized
            path, nan otherwise.
        ``rank_capped``
            True when the randomized rank hit ``rank_cap``: the true rank is then at
            least ``rank_cap``.

        Not-applicable statistics are nan (floats throughout, so they stack into
        a DataFrame column).

    Raises
    ------
    CurvlensError
        A non-0/1 mask, shapes that differ (all are named), or bad parameters.

    Examples
    --------
    A mask that is the outer product of two 0/1 vectors has rank 1:

    >>> import torch
    >>> rows = torch.tensor([True, False, True, True])
    >>> cols = torch.tensor([False, True, True])
    >>> s = mask_structure(rows[:, None] & cols[None, :])
    >>> s["mask_rank"], s["row_sparsity"], s["col_sparsity"], s["rank_method"]
    (1.0, 0.25, 0.3333333333333333, 'exact')
    >>> s["kept_frac"]
    0.5
    """
    mask = _as_mask("mask", mask)
    names, tensors = ["mask"], [mask]
    if tau is not None:
        tau = as_tensor("tau", tau)
        names.append("tau")
        tensors.append(tau)
    if saliency is not None:
        saliency = as_tensor("saliency", saliency)
        names.append("saliency")
        tensors.append(saliency)
    check_same_shape(names, tensors)
    if mask.numel() == 0:
        raise CurvlensError(f"mask is empty (shape {tuple(mask.shape)}); expected at least one entry")
    if int(rank_exact_max) < 0:
        raise CurvlensError(f"rank_exact_max must be >= 0; got {rank_exact_max!r}")
    if int(sketch_size) < 1:
        raise CurvlensError(f"sketch_size must be >= 1; got {sketch_size!r}")
    if int(power_iters) < 0:
        raise CurvlensError(f"power_iters must be >= 0; got {power_iters!r}")

    nan = math.nan
    # count_nonzero, not sum: a bool sum materialises an int64 copy (8x the mask).
    n_kept = int(torch.count_nonzero(mask)) if n_kept is None else int(n_kept)
    out = {"kept_frac": n_kept / mask.numel(), "row_sparsity": nan, "col_sparsity": nan,
           "mask_rank": nan, "mask_effective_rank": nan, "stable_rank": nan,
           "saliency_kept": nan, "rank_method": "none", "rank_cap": nan, "rank_capped": False}

    if saliency is not None:
        kept = total = 0.0
        for s, k in chunks(saliency, mask):
            total += float(s.sum())
            kept += float(s @ k)
        out["saliency_kept"] = ratio(kept, total)

    if mask.dim() < 2:
        return out

    m2 = mask.reshape(mask.shape[0], -1)
    t2 = None if tau is None else tau.reshape(tau.shape[0], -1)
    big_m, big_n = m2.shape
    row_any = as_bytes(m2).amax(dim=1) != 0 if row_counts is None else row_counts.to(m2.device) > 0
    col_any = as_bytes(m2).amax(dim=0) != 0 if col_counts is None else col_counts.to(m2.device) > 0
    out["row_sparsity"] = (big_m - int(torch.count_nonzero(row_any))) / big_m
    out["col_sparsity"] = (big_n - int(torch.count_nonzero(col_any))) / big_n

    if n_kept == 0:  # nothing kept: rank 0, and A = mask * tau = 0
        out.update(mask_rank=0.0, mask_effective_rank=0.0, rank_method="exact")
        return out

    # All-zero rows/columns carry no singular value, so the exact path drops them
    # (FFG masks have many) and decides on the reduced size. The randomized path
    # keeps them: they cost nothing there, while re-indexing every block would.
    rows = None if bool(row_any.all()) else row_any.nonzero().flatten()
    cols = None if bool(col_any.all()) else col_any.nonzero().flatten()
    m_red = big_m if rows is None else rows.numel()
    n_red = big_n if cols is None else cols.numel()

    dt = float64_ok(m2.device)
    eps = torch.finfo(dt).eps
    if m_red * n_red <= int(rank_exact_max):
        dense = RowBlocks(m2, None, rows, cols, torch.float32).dense()  # 0/1: exact in any float
        s = full_rank_singular_values(dense)
        if s is None:  # rank-deficient (or too close to tell): the SVD decides
            s = torch.linalg.svdvals(dense.to(dt))
        del dense
        rank, erank = rank_and_effective_rank(s, float(s[0]) * max(big_m, big_n) * eps)
        out.update(mask_rank=float(rank), mask_effective_rank=erank, rank_method="exact")
        if t2 is not None:
            def exact_stable_rank() -> float:
                a = RowBlocks(m2, t2, rows, cols, dt).dense()
                # ||A||_2^2 is the top eigenvalue of the smaller Gram matrix: exact to
                # float64 rounding, and cheaper than an SVD of A.
                gram = a.T @ a if a.shape[1] <= a.shape[0] else a @ a.T
                del a
                fro2 = float(gram.diagonal().sum())  # the trace: ||A||_F^2, in float64
                return ratio(fro2, top_eigenvalue(gram))

            out["stable_rank"] = _checked(exact_stable_rank, m2, t2)
        return out

    # Randomized path. No power iterations for the mask: the reported values are
    # exact whenever rank < ell (the range is captured) and only "rank >= ell" is
    # claimed otherwise, so extra passes would buy nothing. Float64, so the
    # tolerance is the exact path's. All-zero rows/columns are kept: they cost
    # nothing here, while re-indexing every block would.
    gen = draws(rng)
    ell = min(int(sketch_size), big_m, big_n)
    # the kept entries' column indices, when the sparse products pay (CPU, at
    # most half kept): both sketches below then visit only the kept entries
    index = MaskIndex.build(m2, n_kept, t2, with_fro2=fro2 is None)
    if index is not None and fro2 is None:
        fro2 = index.fro2
    if ell < min(big_m, big_n) and rank_at_least(m2, ell, n_kept, gen.initial_seed(), dt):
        # proven capped by a sample of rows; the full sketch's draw is made all
        # the same, so the stable rank's estimate below sees the same randomness
        gaussian(gen, big_n, ell, dtype=dt)
        rank, erank, capped = ell, nan, True
    else:
        mat = SparseRows(index, values=False) if index is not None else RowBlocks(m2, None, None, None, dt)
        s = range_finder_svdvals(mat, ell, gen)
        rank, erank = rank_and_effective_rank(s, float(s[0]) * max(big_m, big_n) * eps)
        capped = rank >= ell and ell < min(big_m, big_n)
    out.update(mask_rank=float(rank), mask_effective_rank=nan if capped else erank,
               rank_method="randomized", rank_cap=float(ell), rank_capped=capped)
    if t2 is not None:
        # Only the top singular value is needed and its precision is not critical,
        # so float32 (2-3x faster on CPUs) with Krylov iterations for flat spectra.
        mat = SparseRows(index, values=True) if index is not None else RowBlocks(m2, t2, None, None, torch.float32)

        def estimated_stable_rank() -> float:
            top, f = krylov_top_sv(mat, min(NORM_BLOCK, ell), int(power_iters), gen, fro2)
            return ratio(f, top**2)

        out["stable_rank"] = _checked(estimated_stable_rank, m2, t2)
    return out


def _checked(stable_rank, m2: torch.Tensor, t2: torch.Tensor) -> float:
    """``stable_rank()``, with a task vector that is not finite where the mask keeps
    it named in a CurvlensError: LAPACK fails on such input (or returns NaN) with a
    message about convergence. The entries are checked only then, so a finite
    input pays nothing; any other failure is raised as it came."""
    try:
        value = stable_rank()
    except (RuntimeError, ValueError):  # torch's LinAlgError, numpy's and scipy's
        _finite_where_kept(m2, t2)
        raise
    if math.isnan(value):  # also the answer for a task vector that is 0 where kept
        _finite_where_kept(m2, t2)
    return value


def _finite_where_kept(m2: torch.Tensor, t2: torch.Tensor) -> None:
    bad = int(torch.count_nonzero(~torch.isfinite(t2[m2])))
    if bad:
        raise CurvlensError(f"tau has {bad} non-finite value(s) (NaN or infinity) where the mask keeps entries; "
                            "the stable rank needs finite values")


def mask_jaccard(mask_a, mask_b) -> float:
    """Jaccard index ``|A & B| / |A | B|`` of two masks of the same shape.

    Two empty masks agree perfectly, so the result is 1.0 when both keep nothing.

    Examples
    --------
    >>> import torch
    >>> mask_jaccard(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 1, 0]))
    0.3333333333333333
    >>> mask_jaccard(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool))
    1.0
    """
    a = _as_mask("mask_a", mask_a)
    b = _as_mask("mask_b", mask_b)
    check_same_shape(("mask_a", "mask_b"), (a, b))
    union = int(torch.count_nonzero(a | b))
    if union == 0:
        return 1.0
    return int(torch.count_nonzero(a & b)) / union


def saliency_share(mask: torch.Tensor, saliency: torch.Tensor, total: float,
                   buf: torch.Tensor | None = None) -> float:
    """The share of ``total`` (a tensor's summed saliency) that ``mask`` keeps:
    ``sum(mask * saliency) / total`` in fp32 cascade sums, NaN when ``total`` is 0.
    ``buf`` (fp32, ``mask.numel()`` entries) avoids an allocation per call.

    Examples
    --------
    >>> saliency_share(torch.tensor([True, False, True]), torch.tensor([1.0, 2.0, 1.0]), 4.0)
    0.5
    """
    flat = as_bytes(mask).reshape(-1)  # 0/1 through the uint8 view: bool kernels are slow
    buf = torch.empty(flat.numel(), dtype=torch.float32, device=mask.device) if buf is None else buf
    buf.copy_(flat)
    kept = float(buf.mul_(saliency.reshape(-1)).sum())
    return kept / total if total > 0 else math.nan
