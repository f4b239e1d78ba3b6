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
from curvlens.math.checks import float_tensor

__all__ = ["saliency", "fisher_mask", "magnitude_scores", "scores_into"]


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
    v = float_tensor("v", v)
    tau = float_tensor("tau", tau)
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
    t = check_threshold("threshold", threshold)
    return saliency(v, tau) >= t


def check_threshold(param: str, threshold: object) -> float:
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
    return float_tensor("tau", tau).float().abs()


def scores_into(out: torch.Tensor, criterion: str, base: torch.Tensor, expert: torch.Tensor,
                v: torch.Tensor | None, ix: slice) -> torch.Tensor:
    """Scores of entries ``ix`` of flat tensors in their stored dtypes, written into
    the fp32 buffer ``out``: ``v * tau**2`` (``"fisher"``) or ``|tau|``
    (``"magnitude"``), with ``tau = expert - base``. The same bits as
    :func:`saliency` / :func:`magnitude_scores` on fp32 copies, without the copies.

    Examples
    --------
    >>> out = torch.empty(2)
    >>> scores_into(out, "fisher", torch.zeros(3), torch.tensor([1.0, 2.0, 3.0]), torch.ones(3), slice(1, 3))
    tensor([4., 9.])
    """
    tau = expert[ix].float() - base[ix].float()
    if criterion == "magnitude":
        return torch.abs(tau, out=out)
    return torch.mul(v[ix].float(), tau.square_(), out=out)
