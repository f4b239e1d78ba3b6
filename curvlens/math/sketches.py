"""Randomized and exact linear algebra behind :func:`curvlens.math.mask_structure.mask_structure`:
a 0/1 mask (or ``mask * tau``) read as float blocks of rows, a randomized range
finder (Halko, Martinsson & Tropp 2011), a block Krylov estimate of the top
singular value (Musco & Musco 2015), a sampled proof of "rank >= cap", the
integer Gram matrix's proof of full rank, and seeded draws shared by the masks
of one tensor.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch

from curvlens.errors import CurvlensError
from curvlens.math.checks import as_bytes
from curvlens.math.sparse_rows import MaskIndex, SparseRows

__all__ = ["ROW_BLOCK", "WHOLE_MAX", "NORM_BLOCK", "Draws", "MaskIndex", "RowBlocks", "SparseRows", "draws", "float64_ok", "full_rank_singular_values",
           "gaussian", "generator", "krylov_top_sv", "range_finder_svdvals", "rank_and_effective_rank",
           "rank_at_least", "top_eigenvalue", "top_singular_value"]

# Entries per float block in the randomized path: 512K, a 2 MiB float32 block
# (Krylov) or 4 MiB float64 one, small enough to stay in the core's cache between
# being built (mask, times tau) and its GEMM. Each pass then reads the mask and
# tau once instead of also writing and re-reading a block from memory: measured
# on a 32000 x 1024 mask x tau, one thread, the Krylov estimate took 0.18-0.19 s
# against 0.29-0.41 s with 4M-entry blocks, the range finder 0.56 s against
# 0.82-0.87 s (``1 << 18`` is as fast, ``1 << 16`` slower again: per-call
# overhead). Blocks stay far below glibc's 32 MiB mmap threshold
# (curvlens.runtime.keep_freed_memory), above which they were faulted in afresh
# every pass.
ROW_BLOCK = 1 << 19

# A matrix of at most this many entries (a 16 MiB float32 block) is built once,
# as one block, and that block is handed to every pass: rebuilding it in cache-
# sized blocks every pass costs more than the cache saves (a 2816 x 1024 mask x
# tau: 8.1-8.4 ms per Krylov estimate built once, 10.9-12.5 ms streamed).
WHOLE_MAX = 1 << 22

# Block size of the block Krylov estimate of ||mask * tau||_2: only the top
# singular value is needed, so a thin block suffices.
NORM_BLOCK = 16

def generator(rng) -> torch.Generator:
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


class Draws:
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


def draws(rng):
    """A :class:`Draws` for a seed (None: 0), else the caller's own Generator
    (its draws are not remembered)."""
    if rng is None or (isinstance(rng, int) and not isinstance(rng, bool)):
        return Draws(0 if rng is None else rng)
    return generator(rng)


def gaussian(gen, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(gen, Draws):
        return gen.randn(*shape, dtype=dtype)
    return torch.randn(*shape, generator=gen, dtype=dtype)


def float64_ok(device: torch.device) -> torch.dtype:
    """float64 where the device has it (MPS does not: fall back to float32)."""
    return torch.float32 if device.type == "mps" else torch.float64


#: the integer type whose bits a float's are (RowBlocks masks tau through them)
_SAME_SIZE_INT = {torch.float32: torch.int32, torch.float64: torch.int64}


class RowBlocks:
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
        whole = self.m * self.n <= WHOLE_MAX
        self.block_rows = max(1, self.m) if whole else max(1, ROW_BLOCK // max(1, self.n))

    def _take(self, t, start, stop):
        t = t[start:stop] if self.rows is None else t.index_select(0, self.rows[start:stop])
        return t if self.cols is None else t.index_select(1, self.cols)

    def __iter__(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        if self.block_rows >= self.m:
            # One block holds the whole matrix (at most WHOLE_MAX entries): build it
            # once and hand the same one to every pass (callers only read blocks).
            if getattr(self, "_single", None) is None:
                self._single = self._build(0, self.m)
            yield 0, self.m, self._single
            return
        for start in range(0, self.m, self.block_rows):
            stop = min(self.m, start + self.block_rows)
            yield start, stop, self._build(start, stop)

    def _build(self, start: int, stop: int) -> torch.Tensor:
        m = self._take(self.mask2d, start, stop)
        if self.tau2d is None:
            return m.to(self.dtype)
        # tau's bits where kept, else 0: not mask * tau (0 * inf and 0 * NaN are NaN,
        # and an entry the mask drops must not reach the products), and not
        # torch.where (10x slower than this on a CPU: 10 ms against 1 ms for a
        # 2816 x 1024 fp32 block, one thread). The AND goes into a fresh integer
        # tensor: tau itself (already in this dtype, .to() copies nothing) is only read.
        t = self._take(self.tau2d, start, stop).to(self.dtype)
        ints = _SAME_SIZE_INT[self.dtype]
        keep = m.to(ints).neg_()  # 1 -> all bits set
        return keep.bitwise_and_(t.view(ints)).view(self.dtype)

    def dense(self) -> torch.Tensor:
        """The whole matrix (callers only read it): one block is that block, uncopied."""
        blocks = [blk for _, _, blk in self]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=0)

    def mm(self, x: torch.Tensor, with_fro2: bool = False) -> tuple[torch.Tensor, float]:
        """``A @ x`` (``m x k``), and with ``with_fro2`` ``||A||_F^2`` summed from the
        same blocks (float32 blocks, torch's cascaded sums, float64 across blocks)."""
        y = torch.empty(self.m, x.shape[1], dtype=self.dtype, device=self.device)
        fro2 = 0.0
        for s, e, blk in self:
            torch.matmul(blk, x, out=y[s:e])
            if with_fro2:
                fro2 += float(blk.square().sum())
        return y, fro2

    def rmm(self, q: torch.Tensor) -> torch.Tensor:
        """``A^T @ q`` (``n x k``), as the transpose of ``q^T A``: that product is
        twice as fast with ``A``'s rows contiguous."""
        zt = torch.zeros(q.shape[1], self.n, dtype=self.dtype, device=self.device)
        for s, e, blk in self:
            zt.addmm_(q[s:e].T, blk)
        return zt.T


def range_finder_svdvals(mat: RowBlocks | SparseRows, ell: int, gen: torch.Generator) -> torch.Tensor:
    """Singular values of ``B = Q^T A`` with ``Q`` an orthonormal basis of ``A @ Omega``
    (``Omega``: ``n x ell`` Gaussian). Two passes over the rows.

    Each returned value is <= the matching true one, so the count above a
    tolerance is a lower bound on the numerical rank; when ``rank(A) < ell`` the
    range is captured and the non-zero values are ``A``'s, exactly up to rounding.
    """
    return torch.linalg.svdvals(_range_finder(mat, ell, gen))


def _range_finder(mat: RowBlocks | SparseRows, ell: int, gen: torch.Generator) -> torch.Tensor:
    """``B = Q^T A`` of :func:`range_finder_svdvals` (``ell x n``)."""
    omega = gaussian(gen, mat.n, ell, dtype=mat.dtype).to(mat.device)
    y = mat.mm(omega)[0]
    q = torch.linalg.qr(y)[0]
    del y
    return mat.rmm(q).T


def top_singular_value(b: torch.Tensor) -> float:
    """The largest singular value of a short, wide (or tall, thin) matrix, from the
    top eigenvalue of its small Gram matrix in float64 (where the device has it):
    within ``k eps64`` of the truth in relative terms (``k`` the short side), where
    an SVD of a float32 ``b`` is within float32's; and a fraction of its cost on a
    32 x 1024 block (0.1-0.2 ms against 0.45-0.5 ms, one CPU thread)."""
    w = b.to(float64_ok(b.device))
    g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    return math.sqrt(max(0.0, top_eigenvalue(g)))


def top_eigenvalue(g: torch.Tensor) -> float:
    """The largest eigenvalue of a symmetric matrix, as ``eigvalsh`` would give it.

    On the CPU LAPACK's ``syevr`` finds that one eigenvalue alone (scipy): half the
    cost of all of them on a 256 x 256 Gram matrix (1.3 ms against 2.7 ms, one
    thread), the exact stable rank's share of a GQA k/v projection's mask.
    """
    if g.device.type == "cpu" and g.dtype == torch.float64 and g.shape[0] > 1:
        import scipy.linalg

        k = g.shape[0]
        return float(scipy.linalg.eigh(g.numpy(), eigvals_only=True, subset_by_index=[k - 1, k - 1], driver="evr",
                                       check_finite=False)[0])
    return float(torch.linalg.eigvalsh(g)[-1])


def krylov_top_sv(mat: RowBlocks | SparseRows, block: int, iters: int,
                   gen: torch.Generator, fro2: float | None = None) -> tuple[float, float]:
    """Estimate of the largest singular value by randomized block Krylov iteration
    (Musco & Musco 2015): ``Q`` spans ``A Omega, (A A^T) A Omega, ...`` and the
    answer is the top singular value of ``Q^T A``. ``2 iters + 2`` passes, the
    last one over ``block * iters`` columns only.

    Never above the truth (but for float32 rounding). Keeping every iterate, not only the last (plain
    subspace iteration), halves the error for the same passes on flat spectra.
    Also returns ``||A||_F^2``, summed from the first pass's blocks (float32 blocks,
    torch's cascaded sums, float64 across blocks) to save a pass of its own,
    unless the caller knows it (``fro2``).
    """
    right = gaussian(gen, mat.n, block, dtype=mat.dtype).to(mat.device)
    basis = []
    first = None  # q0^T A, the first iterate's rows of the answer
    known = fro2 is not None
    for it in range(iters + 1):
        y, f = mat.mm(right, with_fro2=not known)
        if it == 0 and not known:
            fro2 = f
        q = torch.linalg.qr(y)[0]
        del y
        basis.append(q)
        if it == iters:
            break
        zt = mat.rmm(q).T  # Q^T A
        if it == 0:
            first = zt.clone()
        right = torch.linalg.qr(zt.T)[0]
    q = torch.linalg.qr(torch.cat(basis, dim=1))[0]
    del basis
    # Q's first columns span q0 and the rest are orthonormal to it, so
    # [q0, Q[:, block:]] is an orthonormal basis of the same space: q0's rows of
    # the answer were computed in the first iteration, the pass needs the rest.
    rest = q if first is None else q[:, block:]
    b = mat.rmm(rest).T
    if first is not None:
        b = torch.cat([first, b], dim=0)
    return top_singular_value(b), fro2


def rank_at_least(m2: torch.Tensor, ell: int, n_kept: int, seed: int, dt: torch.dtype) -> bool:
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
    gen = Draws((seed + 0x5EED) % (2**63))
    rows = gen.randperm(big_m)[: 4 * ell].sort().values.to(m2.device)
    sample = m2.index_select(0, rows)  # 4 ell rows of bytes
    index = MaskIndex.build(sample, int(torch.count_nonzero(sample))) if dt == torch.float64 else None
    b = _range_finder(SparseRows(index, values=False) if index is not None
                      else RowBlocks(sample, None, None, None, dt), ell, gen)
    eps = torch.finfo(dt).eps
    tol = math.sqrt(n_kept) * max(big_m, big_n) * eps
    # First from B B^T's eigenvalues (a fraction of an SVD's cost): the computed
    # Gram matrix is within (n ell) eps lambda_max of the true one in 2-norm (a
    # length-n inner product per entry, ||B||_F^2 <= ell lambda_max) and eigvalsh
    # adds ~ell eps lambda_max, so a smallest eigenvalue above tol^2 plus twice
    # that proves all ell singular values above tol. Else the SVD decides.
    g = b @ b.T
    lam = torch.linalg.eigvalsh(g)
    top = float(lam[-1])
    if float(lam[0]) > tol * tol + 2 * (big_n + 16) * ell * eps * top:
        return True
    s = torch.linalg.svdvals(b)
    return int(torch.count_nonzero(s > tol)) >= ell


def full_rank_singular_values(m: torch.Tensor) -> torch.Tensor | None:
    """Singular values of a 0/1 matrix from its Gram matrix when that proves it
    has full rank, else None.

    ``G = M M^T`` (the smaller side) of a 0/1 matrix has integer entries no
    larger than the longer side, so float32 computes it exactly in any order
    while that side is below 2**24 (float64 beyond), at half float64's cost;
    ``eigvalsh`` (float64 where the device has it) finds its eigenvalues within ``k eps lambda_max`` (``k``
    its size). When every one is well above that (``16 k eps lambda_max``), every
    singular value is far above the rank tolerance ``s_max max(M, N) eps`` and
    the rank is ``k``, as the SVD would say; the values are ``sqrt(lambda)`` (to
    ~1e-12 relative). Measured on a 256 x 1024 mask, one CPU thread: 6.7 ms
    against 34 ms for ``svdvals``, the bulk of a default ``mask_stats`` over k/v
    projections. A rank-deficient mask (all FFG masks the paper calls low-rank)
    gets None: the SVD decides there.
    """
    wide = float64_ok(m.device)
    f = m.to(torch.float32 if max(m.shape) < 2**24 else wide)
    g = (f @ f.T if m.shape[0] <= m.shape[1] else f.T @ f).to(wide)
    del f
    lam = torch.linalg.eigvalsh(g)
    top = float(lam[-1])
    if not top > 0 or float(lam[0]) <= 16 * g.shape[0] * torch.finfo(g.dtype).eps * top:
        return None
    return torch.sqrt(lam.flip(0))


def rank_and_effective_rank(s: torch.Tensor, tol: float) -> tuple[int, float]:
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
