"""Saliency scores and masks for Fast Fisher Grafting (FFG) and magnitude pruning.

FFG keeps the entries of an expert's edit ``tau = theta - theta0`` whose removal
would cost the most loss under a diagonal Fisher estimate ``v`` (Adam's second
moment): ``s = v * tau**2``. The magnitude baseline scores entries by ``|tau|``.
Everything is computed in fp32 on the inputs' device.
"""
from __future__ import annotations

import math

import torch

from curvlens.errors import CurvlensError

__all__ = ["saliency", "fisher_mask", "magnitude_scores", "topk_mask"]


def _as_tensor(param: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise CurvlensError(f"{param} must be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise CurvlensError(f"{param} must be a floating-point tensor; got dtype {x.dtype}")
    return x


def saliency(v: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """FFG saliency ``v * tau**2`` in fp32.

    Parameters
    ----------
    v : torch.Tensor
        Diagonal Fisher estimate (Adam ``exp_avg_sq``) of one tensor.
    tau : torch.Tensor
        The expert's edit of that tensor, ``theta - theta0``; same shape as ``v``.

    Returns
    -------
    torch.Tensor
        fp32 tensor of the same shape.

    Examples
    --------
    >>> saliency(torch.tensor([1.0, 4.0]), torch.tensor([3.0, -0.5]))
    tensor([9., 1.])
    """
    v = _as_tensor("v", v)
    tau = _as_tensor("tau", tau)
    if v.shape != tau.shape:
        raise CurvlensError(
            f"v and tau must have the same shape; got v {tuple(v.shape)} and tau {tuple(tau.shape)}"
        )
    return v.float() * tau.float().square()


def fisher_mask(v: torch.Tensor, tau: torch.Tensor, threshold: float) -> torch.Tensor:
    """Boolean FFG mask ``v * tau**2 >= threshold``.

    Parameters
    ----------
    v, tau : torch.Tensor
        See :func:`saliency`.
    threshold : float
        Saliency threshold ``t`` (one per expert for a whole model in the paper).

    Returns
    -------
    torch.Tensor
        bool tensor, True where the edit is kept.

    Examples
    --------
    >>> fisher_mask(torch.tensor([1.0, 4.0]), torch.tensor([3.0, -0.5]), 2.0)
    tensor([ True, False])
    """
    t = _check_threshold("threshold", threshold)
    return saliency(v, tau) >= t


def _check_threshold(param: str, threshold: object) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise CurvlensError(f"{param} must be a real number; got {threshold!r}")
    t = float(threshold)
    if math.isnan(t):
        raise CurvlensError(f"{param} must not be NaN")
    return t


def magnitude_scores(tau: torch.Tensor) -> torch.Tensor:
    """Magnitude-pruning scores ``|tau|`` in fp32.

    Examples
    --------
    >>> magnitude_scores(torch.tensor([-2.0, 0.5]))
    tensor([2.0000, 0.5000])
    """
    return _as_tensor("tau", tau).float().abs()


def kth_largest(flat: torch.Tensor, k: int, *, sample: int = 1 << 14) -> torch.Tensor:
    """The exact ``k``-th largest entry of a 1-D tensor, as a 0-d tensor.

    Large tensors use sample-select: a seeded sample brackets the answer between
    two sample quantiles, one counting pass finds how many entries lie above the
    bracket, and ``kthvalue`` runs only on the few entries inside it. The result is
    exact (a bracket that misses falls back to a full ``kthvalue``); on a
    32M-entry tensor it is several times faster than ``kthvalue`` alone.

    Examples
    --------
    >>> kth_largest(torch.tensor([0.1, 3.0, 2.0, 0.5]), 2)
    tensor(2.)
    """
    n = flat.numel()
    if not 1 <= k <= n:
        raise CurvlensError(f"k must be in [1, {n}]; got {k}")
    if n <= 64 * sample:
        return torch.kthvalue(flat, n - k + 1).values
    gen = torch.Generator(device=flat.device).manual_seed(n)
    idx = torch.randint(0, n, (sample,), generator=gen, device=flat.device)
    s = torch.sort(flat[idx]).values
    # the k-th largest sits near sample quantile 1 - k/n; widen by ~6 std errors
    q = 1.0 - k / n
    half = 6.0 * (q * (1.0 - q) / sample) ** 0.5 + 2.0 / sample
    lo = s[max(0, int((q - half) * sample))]
    hi = s[min(sample - 1, int((q + half) * sample) + 1)]
    above = int(torch.count_nonzero(flat > hi))  # count_nonzero: ~6x a bool sum()
    inside = flat[(flat >= lo) & (flat <= hi)]
    r = k - above  # rank of the answer among the bracketed entries, from the top
    if 1 <= r <= inside.numel():
        return torch.kthvalue(inside, inside.numel() - r + 1).values
    return torch.kthvalue(flat, n - k + 1).values


def topk_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``k`` highest-scoring entries of one tensor.

    ``k = max(1, int(density * numel))`` for ``0 < density < 1``, exactly as
    mergekit 0.1.5's magnitude sparsification (a positive density always keeps
    at least one entry); ``density >= 1`` keeps everything and ``density == 0``
    nothing. Entries are selected with ``torch.kthvalue``; among entries equal to the
    k-th largest score the lowest indices are kept (mergekit's argsort breaks such
    ties in an unspecified order).

    Parameters
    ----------
    scores : torch.Tensor
        Any floating-point tensor (``saliency`` or ``magnitude_scores``).
    density : float
        Fraction of entries to keep, in ``[0, 1]``.

    Returns
    -------
    torch.Tensor
        bool tensor of ``scores``' shape.

    Examples
    --------
    >>> topk_mask(torch.tensor([0.1, 3.0, 2.0, 0.5]), 0.5)
    tensor([False,  True,  True, False])
    >>> topk_mask(torch.tensor([0.1, 3.0, 2.0, 0.5]), 0.1)  # int(0.4) = 0, kept 1
    tensor([False,  True, False, False])
    """
    scores = _as_tensor("scores", scores)
    d = _check_threshold("density", density)
    if not 0.0 <= d <= 1.0:
        raise CurvlensError(f"density must be in [0, 1]; got {density!r}")
    n = scores.numel()
    if d >= 1.0:
        return torch.ones_like(scores, dtype=torch.bool)
    if d == 0.0 or n == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    k = max(1, int(d * n))
    flat = scores.reshape(-1).float()
    # Selection, not sorting: kthvalue is O(n) where mergekit's argsort is
    # O(n log n) (0.7 s vs 5 s for a 32M-entry tensor on 2 cores). Entries above
    # the k-th largest value are kept; if several entries equal it and only some
    # fit, the lowest indices are kept. That is deterministic on every device,
    # whereas mergekit's choice among equal scores follows its unstable sort (and
    # differs between its CPU and GPU runs); without such a split tie the masks
    # are identical.
    kth = kth_largest(flat, k)
    mask = flat > kth
    missing = k - int(torch.count_nonzero(mask))
    if missing > 0:
        tied = torch.nonzero(flat == kth).flatten()[:missing]
        mask[tied] = True
    return mask.reshape(scores.shape)
