"""Memory-light approximations of a 2-D second-moment matrix.

An 8B model's Adam second moments take as much memory as its fp32 weights. The
paper shows OTA keeps its gains when each 2-D moment matrix ``V`` (m x n) is
replaced by a low-rank, nonnegative stand-in:

* :func:`rank1` -- the AdaFactor-style factorisation from row and column sums,
  ``V_hat[r, c] = rowsum[r] * colsum[c] / sum(V)``; it stores ``m + n`` numbers.
* :func:`rank_r` -- the truncated SVD of ``V`` with negative entries clipped to 0.

Both return a dense tensor of ``V``'s shape (what the merge math consumes);
:func:`compressed_bytes` says what the compressed form would cost to store.
Tensors that are not 2-D (biases, norms, scalars) are returned unchanged, as in
the OTA authors' code, because there is nothing to factorise.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from curvlens.errors import CurvlensError
from curvlens.math.checks import float_tensor

__all__ = ["rank1", "rank_r", "compressed_bytes", "relative_error"]


def rank1(v: torch.Tensor) -> torch.Tensor:
    """Rank-1 AdaFactor-style approximation of a nonnegative 2-D matrix.

    Parameters
    ----------
    v : torch.Tensor
        Second moments, nonnegative. Only 2-D tensors are approximated.

    Returns
    -------
    torch.Tensor
        For a 2-D ``v``: the fp32 matrix ``outer(rowsum, colsum) / sum(v)``, which
        is exact when ``v`` itself has rank 1; all zeros when ``sum(v) == 0``.
        Tensors of any other dimension are returned unchanged (the same object).

    Raises
    ------
    CurvlensError
        If ``v`` is not a floating-point tensor, or a 2-D ``v`` has a negative
        entry (the factorisation is only meaningful for nonnegative matrices).

    Examples
    --------
    >>> v = torch.outer(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0, 1.0]))
    >>> torch.equal(rank1(v), v)
    True
    >>> rank1(torch.zeros(2, 2))
    tensor([[0., 0.],
            [0., 0.]])
    """
    v = float_tensor("v", v)
    if v.ndim != 2:
        return v
    v = v.float()
    if v.numel() and bool((v < 0).any()):
        raise CurvlensError(
            f"rank1 expects a nonnegative moment matrix; got minimum {v.min().item():.3g}"
        )
    total = v.sum()
    if total == 0:
        # Every entry is 0 (nonnegative with zero sum): the exact answer.
        return torch.zeros_like(v)
    row = v.sum(dim=1)
    col = v.sum(dim=0)
    # Divide the column sums first, as the OTA authors do, so both agree to the
    # last bit on the same inputs.
    return torch.outer(row, col / total)


def rank_r(v: torch.Tensor, r: int) -> torch.Tensor:
    """Rank-``r`` truncated SVD of a 2-D matrix, clipped at 0.

    Parameters
    ----------
    v : torch.Tensor
        Second moments. Only 2-D tensors are approximated.
    r : int
        Number of singular triplets kept, at least 1. ``r >= min(v.shape)`` keeps
        them all, which reproduces ``v`` up to rounding.

    Returns
    -------
    torch.Tensor
        For a 2-D ``v``: ``relu(U[:, :r] diag(S[:r]) Vh[:r])`` in fp32 (moments
        cannot be negative, but a truncated SVD can be). Other tensors are
        returned unchanged.

    Raises
    ------
    CurvlensError
        If ``v`` is not a floating-point tensor or ``r`` is not a positive int.

    Examples
    --------
    >>> v = torch.tensor([[4.0, 1.0], [2.0, 3.0]])
    >>> torch.allclose(rank_r(v, 2), v, atol=1e-5)
    True
    >>> rank_r(torch.tensor([1.0, 2.0]), 1)
    tensor([1., 2.])
    """
    v = float_tensor("v", v)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise CurvlensError(f"rank r must be an int >= 1; got {r!r}")
    if v.ndim != 2:
        return v
    v = v.float()
    if v.numel() == 0:
        return v.clone()
    u, s, vh = torch.linalg.svd(v, full_matrices=False)
    approx = (u[:, :r] * s[:r]) @ vh[:r, :]
    return torch.clamp_min(approx, 0.0)


def compressed_bytes(
    shape: Sequence[int], rank: Optional[int], *, itemsize: int = 4
) -> int:
    """Bytes needed to store one moment tensor, dense or compressed.

    Parameters
    ----------
    shape : sequence of int
        Shape of the moment tensor.
    rank : int or None
        ``None``: dense. ``1``: the AdaFactor row and column sums (``m + n``
        numbers). ``r > 1``: SVD factors ``U_r``, ``S_r``, ``Vh_r``
        (``r * (m + n + 1)`` numbers). A compressed form is never counted as
        larger than the dense tensor, since one would then store it dense; tensors
        that are not 2-D are always dense.
    itemsize : int, default 4
        Bytes per stored number (4 for fp32).

    Returns
    -------
    int

    Examples
    --------
    >>> compressed_bytes((4096, 4096), None)
    67108864
    >>> compressed_bytes((4096, 4096), 1)
    32768
    >>> compressed_bytes((4096, 4096), 16)
    524352
    >>> compressed_bytes((4096,), 1)
    16384
    """
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError) as err:
        raise CurvlensError(f"shape must be a sequence of ints; got {shape!r}") from err
    if any(d < 0 for d in dims):
        raise CurvlensError(f"shape must have nonnegative sizes; got {dims}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise CurvlensError(f"rank must be None or an int >= 1; got {rank!r}")
    if isinstance(itemsize, bool) or not isinstance(itemsize, int) or itemsize < 1:
        raise CurvlensError(f"itemsize must be an int >= 1; got {itemsize!r}")
    dense = math.prod(dims)
    if rank is None or len(dims) != 2:
        return dense * itemsize
    m, n = dims
    stored = m + n if rank == 1 else rank * (m + n + 1)
    return min(stored, dense) * itemsize


def relative_error(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """``||approx - ref|| / ||ref||`` in float64 (0 when both are 0, inf when only
    ``ref`` is).

    Examples
    --------
    >>> relative_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.5]))
    0.1
    """
    den = float(torch.linalg.vector_norm(ref, dtype=torch.float64))
    num = float(torch.linalg.vector_norm(approx.double() - ref.double()))
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den
