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
(:func:`_rank_at_least`). Measured (2 shared EPYC cores, load ~5, torch 2.13) on
a 128256 x 4096 mask of rank 20: 25 s mask only, 53 s with ``tau`` (the stable
rank's Krylov passes), +0.34 GB peak RSS either way (a float32 copy of the mask
alone would take 2.1 GB). On a GPU the same code runs on the mask's device.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from curvlens.errors import CurvlensError
from curvlens.math.checks import as_bytes, as_tensor, check_same_shape, chunks, ratio

__all__ = ["mask_structure", "mask_jaccard", "saliency_share"]

# Exact float64 SVD up to this many entries (after dropping all-zero rows/columns).
# A 2048 x 2048 float64 SVD takes a few seconds on 2 CPU cores; 4096 x 4096 takes
# about a minute, too slow to do for every tensor of a model on a CPU.
RANK_EXACT_MAX = 2048 * 2048

# Entries per float block in the randomized path: 8M float64 = 64 MB.
_BLOCK = 1 << 23

# Block size of the block Krylov estimate of ||mask * tau||_2: only the top
# singular value is needed, so a thin block suffices.
_NORM_BLOCK = 16


def _as_mask(name: str, mask) -> torch.Tensor:
    """A bool tensor from a bool or 0/1 numeric tensor (anything else is an error)."""
    mask = as_tensor(name, mask)
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise CurvlensError(f"{name} must be a bool or 0/1 tensor; got dtype {mask.dtype} "
                            "with values other than 0 and 1")
    return mask != 0


def _generator(rng) -> torch.Generator:
    """A CPU generator from None (seed 0: reproducible by default), an int, or a Generator."""
    if rng is None:
        return torch.Generator().manual_seed(0)
    if isinstance(rng, int):
        return torch.Generator().manual_seed(rng)
    if isinstance(rng, torch.Generator):
        if rng.device.type != "cpu":
            raise CurvlensError(f"rng must be a CPU torch.Generator; got one on {rng.device}")
        return rng
    raise CurvlensError(f"rng must be None, an int seed or a torch.Generator; got {type(rng).__name__}")


class _Draws:
    """A seeded CPU generator whose draws are remembered: a second generator with
    the same seed making the same calls (every mask of one tensor: twelve in a
    default ``mask_stats``) gets the same tensors back without drawing them again,
    and ends in the same state. Draws are only read by their callers."""

    _memo: dict = {}
    _MAX = 64

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.key: tuple = (seed,)

    def initial_seed(self) -> int:
        return self.gen.initial_seed()

    def randn(self, *shape: int, dtype: torch.dtype) -> torch.Tensor:
        return self._draw(("randn", shape, dtype), lambda: torch.randn(*shape, generator=self.gen, dtype=dtype))

    def randperm(self, n: int) -> torch.Tensor:
        return self._draw(("randperm", n), lambda: torch.randperm(n, generator=self.gen))

    def _draw(self, call: tuple, make) -> torch.Tensor:
        self.key = self.key + (call,)
        hit = self._memo.get(self.key)
        if hit is not None:
            self.gen.set_state(hit[1])
            return hit[0]
        out = make()
        if len(self._memo) >= self._MAX:
            self._memo.clear()
        self._memo[self.key] = (out, self.gen.get_state())
        return out


def _draws(rng):
    """A :class:`_Draws` for a seed (None: 0), else the caller's own Generator
    (its draws are not remembered)."""
    if rng is None or (isinstance(rng, int) and not isinstance(rng, bool)):
        return _Draws(0 if rng is None else rng)
    return _generator(rng)


def _randn(gen, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(gen, _Draws):
        return gen.randn(*shape, dtype=dtype)
    return torch.randn(*shape, generator=gen, dtype=dtype)


def _float64_ok(device: torch.device) -> torch.dtype:
    """float64 where the device has it (MPS does not: fall back to float32)."""
    return torch.float32 if device.type == "mps" else torch.float64


class _RowBlocks:
    """``mask`` (or ``mask * tau``) restricted to ``rows`` x ``cols``, as float blocks
    of rows.

    Iterating yields ``(start, stop, block)`` in the reduced row index space.
    Blocks are built on the fly, so neither a float mask nor a float copy of ``tau``
    is ever held whole. ``rows``/``cols`` None means all (no index copies).
    """

    def __init__(self, mask2d, tau2d, rows, cols, dtype):
        self.mask2d, self.tau2d, self.rows, self.cols, self.dtype = as_bytes(mask2d), tau2d, rows, cols, dtype
        self.device = mask2d.device
        self.m = mask2d.shape[0] if rows is None else rows.numel()
        self.n = mask2d.shape[1] if cols is None else cols.numel()
        self.block_rows = max(1, _BLOCK // max(1, self.n))

    def _take(self, t, start, stop):
        t = t[start:stop] if self.rows is None else t.index_select(0, self.rows[start:stop])
        return t if self.cols is None else t.index_select(1, self.cols)

    def __iter__(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        if self.block_rows >= self.m:
            # One block holds the whole matrix (at most _BLOCK entries): build it
            # once and hand the same one to every pass (callers only read blocks).
            if getattr(self, "_single", None) is None:
                self._single = self._build(0, self.m)
            yield 0, self.m, self._single
            return
        for start in range(0, self.m, self.block_rows):
            stop = min(self.m, start + self.block_rows)
            yield start, stop, self._build(start, stop)

    def _build(self, start: int, stop: int) -> torch.Tensor:
        blk = self._take(self.mask2d, start, stop).to(self.dtype)
        if self.tau2d is not None:
            blk.mul_(self._take(self.tau2d, start, stop).to(self.dtype))
        return blk

    def dense(self) -> torch.Tensor:
        return torch.cat([blk for _, _, blk in self], dim=0)


def _range_finder_svdvals(mat: _RowBlocks, ell: int, gen: torch.Generator) -> torch.Tensor:
    """Singular values of ``B = Q^T A`` with ``Q`` an orthonormal basis of ``A @ Omega``
    (``Omega``: ``n x ell`` Gaussian). Two passes over the rows.

    Each returned value is <= the matching true one, so the count above a
    tolerance is a lower bound on the numerical rank; when ``rank(A) < ell`` the
    range is captured and the non-zero values are ``A``'s, exactly up to rounding.
    """
    omega = _randn(gen, mat.n, ell, dtype=mat.dtype).to(mat.device)
    y = torch.empty(mat.m, ell, dtype=mat.dtype, device=mat.device)
    for s, e, blk in mat:
        torch.matmul(blk, omega, out=y[s:e])
    q = torch.linalg.qr(y)[0]
    del y
    b = torch.zeros(ell, mat.n, dtype=mat.dtype, device=mat.device)
    for s, e, blk in mat:
        b.addmm_(q[s:e].T, blk)
    return torch.linalg.svdvals(b)


def _krylov_top_sv(mat: _RowBlocks, block: int, iters: int,
                   gen: torch.Generator, fro2: float | None = None) -> tuple[float, float]:
    """Estimate of the largest singular value by randomized block Krylov iteration
    (Musco & Musco 2015): ``Q`` spans ``A Omega, (A A^T) A Omega, ...`` and the
    answer is the top singular value of ``Q^T A``. ``2 iters + 2`` passes.

    Never above the truth. Keeping every iterate, not only the last (plain
    subspace iteration), halves the error for the same passes on flat spectra.
    Also returns ``||A||_F^2``, summed from the first pass's blocks (float32 blocks,
    torch's cascaded sums, float64 across blocks) to save a pass of its own,
    unless the caller knows it (``fro2``).
    """
    n, dt, dev = mat.n, mat.dtype, mat.device
    y = torch.empty(mat.m, block, dtype=dt, device=dev)
    right = _randn(gen, n, block, dtype=dt).to(dev)
    basis = []
    known = fro2 is not None
    fro2 = fro2 if known else 0.0
    for it in range(iters + 1):
        for s, e, blk in mat:
            torch.matmul(blk, right, out=y[s:e])
            if it == 0 and not known:
                fro2 += float(blk.square().sum())
        q = torch.linalg.qr(y)[0]
        basis.append(q)
        if it == iters:
            break
        z = torch.zeros(n, block, dtype=dt, device=dev)
        for s, e, blk in mat:
            z.addmm_(blk.T, q[s:e])
        right = torch.linalg.qr(z)[0]
    del y
    q = torch.linalg.qr(torch.cat(basis, dim=1))[0]
    del basis
    b = torch.zeros(q.shape[1], n, dtype=dt, device=dev)
    for s, e, blk in mat:
        b.addmm_(q[s:e].T, blk)
    return float(torch.linalg.svdvals(b)[0]), fro2


def _rank_at_least(m2: torch.Tensor, ell: int, n_kept: int, seed: int, dt: torch.dtype) -> bool:
    """Whether ``4 ell`` random rows of the mask already prove its numerical rank
    is at least ``ell``, for a fraction of the full sketch's cost.

    The range finder's singular values of the sampled rows are at most those of
    the rows, which are at most the mask's (interlacing), and the tolerance used,
    ``sqrt(n_kept) max(M, N) eps``, is at least the mask's own (``||M||_2 <=
    ||M||_F = sqrt(n_kept)``): so ``ell`` values above it are ``ell`` of the mask's
    above its tolerance. False when it cannot tell (a low-rank mask: then the
    full sketch decides, as before).
    """
    big_m, big_n = m2.shape
    if 8 * ell >= big_m:
        return False
    gen = _Draws((seed + 0x5EED) % (2**63))
    rows = gen.randperm(big_m)[: 4 * ell].sort().values.to(m2.device)
    s = _range_finder_svdvals(_RowBlocks(m2, None, rows, None, dt), ell, gen)
    tol = math.sqrt(n_kept) * max(big_m, big_n) * torch.finfo(dt).eps
    return int(torch.count_nonzero(s > tol)) >= ell


def _rank_and_effective_rank(s: torch.Tensor, tol: float) -> tuple[int, float]:
    """Numerical rank (count of singular values above ``tol``) and the effective rank
    of Roy & Vetterli (2007): exp of the Shannon entropy of ``s / sum(s)``.

    Values at or below ``tol`` are rounding noise of zero singular values and are
    left out of both. An all-zero matrix has rank 0 and effective rank 0.0.
    """
    s = s.to(torch.float64)
    s = s[s > tol]
    if s.numel() == 0:
        return 0, 0.0
    p = s / s.sum()
    return s.numel(), math.exp(float(-(p * torch.log(p)).sum()))


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

    dt = _float64_ok(m2.device)
    eps = torch.finfo(dt).eps
    if m_red * n_red <= int(rank_exact_max):
        s = torch.linalg.svdvals(_RowBlocks(m2, None, rows, cols, dt).dense())
        rank, erank = _rank_and_effective_rank(s, float(s[0]) * max(big_m, big_n) * eps)
        out.update(mask_rank=float(rank), mask_effective_rank=erank, rank_method="exact")
        if t2 is not None:
            a = _RowBlocks(m2, t2, rows, cols, dt).dense()
            # ||A||_2^2 is the top eigenvalue of the smaller Gram matrix: exact to
            # float64 rounding, and cheaper than an SVD of A.
            gram = a.T @ a if a.shape[1] <= a.shape[0] else a @ a.T
            fro2 = float(a.square().sum())
            del a
            out["stable_rank"] = ratio(fro2, float(torch.linalg.eigvalsh(gram)[-1]))
        return out

    # Randomized path. No power iterations for the mask: the reported values are
    # exact whenever rank < ell (the range is captured) and only "rank >= ell" is
    # claimed otherwise, so extra passes would buy nothing. Float64, so the
    # tolerance is the exact path's. All-zero rows/columns are kept: they cost
    # nothing here, while re-indexing every block would.
    gen = _draws(rng)
    ell = min(int(sketch_size), big_m, big_n)
    if ell < min(big_m, big_n) and _rank_at_least(m2, ell, n_kept, gen.initial_seed(), dt):
        # proven capped by a sample of rows; the full sketch's draw is made all
        # the same, so the stable rank's estimate below sees the same randomness
        _randn(gen, big_n, ell, dtype=dt)
        rank, erank, capped = ell, nan, True
    else:
        s = _range_finder_svdvals(_RowBlocks(m2, None, None, None, dt), ell, gen)
        rank, erank = _rank_and_effective_rank(s, float(s[0]) * max(big_m, big_n) * eps)
        capped = rank >= ell and ell < min(big_m, big_n)
    out.update(mask_rank=float(rank), mask_effective_rank=nan if capped else erank,
               rank_method="randomized", rank_cap=float(ell), rank_capped=capped)
    if t2 is not None:
        # Only the top singular value is needed and its precision is not critical,
        # so float32 (2-3x faster on CPUs) with Krylov iterations for flat spectra.
        top, fro2 = _krylov_top_sv(_RowBlocks(m2, t2, None, None, torch.float32),
                                   min(_NORM_BLOCK, ell), int(power_iters), gen, fro2)
        out["stable_rank"] = ratio(fro2, top**2)
    return out


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
