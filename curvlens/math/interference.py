"""Task interference between two experts, and the loss a merge costs an expert.

Merging fails where experts pull one parameter in opposite directions *and* both
care about it. :func:`pair_interference` measures that for one tensor of one pair
of experts: plain sign conflicts (as TIES counts them), and the share of the
experts' joint curvature-weighted edit mass that sits on conflicting entries.
:func:`predicted_loss_increase` is the diagonal-Fisher quadratic model of how much
an expert's loss rises when its parameters are replaced by the merged ones.

Every sum is accumulated in float64, chunk by chunk, so a 50M-entry tensor never
needs a whole float64 copy.
"""
from __future__ import annotations

import math

import torch

from curvlens.errors import CurvlensError
from curvlens.math.checks import (
    as_tensor,
    check_moments,
    check_nonempty,
    check_same_shape,
    chunks,
    corr,
    ratio,
)

__all__ = ["pair_interference", "predicted_loss_increase"]


def pair_interference(tau_a, tau_b, v_a=None, v_b=None) -> dict:
    """Sign conflicts and curvature-weighted conflict of two task vectors.

    Parameters
    ----------
    tau_a, tau_b : torch.Tensor
        Task vectors ``theta_i - theta_0`` of the same shape (any float dtype).
    v_a, v_b : torch.Tensor, optional
        The experts' second moments (same shape, non-negative). Pass both or
        neither; they enable ``curvature_weighted_conflict``.

    Returns
    -------
    dict
        ``tv_cosine``
            Cosine similarity of ``tau_a`` and ``tau_b``; nan if either is zero.
        ``sign_conflict``
            Fraction of *all* entries where both are non-zero with opposite signs.
        ``both_nonzero_frac``
            Fraction of all entries where both are non-zero.
        ``sign_conflict_of_both_nonzero``
            Conflicting entries / entries where both are non-zero (nan if none):
            the conflict rate among entries both experts edited.
        ``magnitude_weighted_conflict``
            ``sum_conflict |tau_a tau_b| / sum_all |tau_a tau_b|`` (nan if the
            denominator is 0): the curvature-free version of the next key.
        ``curvature_weighted_conflict``
            ``sum_conflict w / sum_all w`` with
            ``w = sqrt(v_a v_b) |tau_a| |tau_b|`` (nan without moments or if
            ``sum w = 0``).

    Notes
    -----
    Why this weight: ``w = sqrt(s_a s_b)`` with ``s_i = v_i tau_i^2`` the FFG
    saliency of the entry for expert ``i`` (its diagonal-Fisher loss increase if
    that edit is reverted). The geometric mean is large only where the entry
    matters to *both* experts. A conflict on an entry only one expert cares about
    is cheap to resolve (give it to that expert, as OTA's curvature weights do);
    a conflict where both care forces a trade-off that costs at least one of them
    loss. So the key is the share of the pair's jointly salient edit mass that
    lies on such trade-offs, in [0, 1], and invariant to rescaling either expert's
    moments or task vector.

    Raises
    ------
    CurvlensError
        Shapes that differ (all are named), empty tensors, only one of
        ``v_a``/``v_b``, NaN/Inf or negative moments.

    Examples
    --------
    >>> import torch
    >>> ta = torch.tensor([1.0, -1.0, 2.0, 0.0])
    >>> tb = torch.tensor([1.0, 1.0, -1.0, 3.0])
    >>> r = pair_interference(ta, tb)
    >>> r["sign_conflict"], r["sign_conflict_of_both_nonzero"]
    (0.5, 0.6666666666666666)
    >>> r = pair_interference(ta, tb, v_a=torch.ones(4), v_b=torch.tensor([1.0, 0.0, 1.0, 1.0]))
    >>> round(r["curvature_weighted_conflict"], 6)  # conflict w = 2 of total 1 + 2
    0.666667
    """
    tau_a = as_tensor("tau_a", tau_a)
    tau_b = as_tensor("tau_b", tau_b)
    if (v_a is None) != (v_b is None):
        raise CurvlensError("pass both v_a and v_b or neither; got only "
                            + ("v_a" if v_b is None else "v_b"))
    names, tensors = ["tau_a", "tau_b"], [tau_a, tau_b]
    with_v = v_a is not None
    if with_v:
        v_a = as_tensor("v_a", v_a)
        v_b = as_tensor("v_b", v_b)
        names += ["v_a", "v_b"]
        tensors += [v_a, v_b]
    check_same_shape(names, tensors)
    check_nonempty("tau_a", tau_a)
    n = tau_a.numel()

    dot = na = nb = 0.0
    n_both = n_conf = 0
    mag_conf = mag_all = curv_conf = curv_all = 0.0
    for parts in chunks(*tensors):
        a, b = parts[0], parts[1]
        dot += float(a @ b)
        na += float(a @ a)
        nb += float(b @ b)
        prod = a * b
        # In float64 the product of two non-zero fp32/bf16 entries never
        # underflows, so prod < 0 is exactly "both non-zero, opposite signs".
        conf = prod < 0
        n_both += int(torch.count_nonzero(prod))
        n_conf += int(torch.count_nonzero(conf))
        mag = prod.abs_()
        mag_all += float(mag.sum())
        mag_conf += float(mag[conf].sum())
        if with_v:
            check_moments("v_a", parts[2])
            check_moments("v_b", parts[3])
            # sqrt of each factor, not of the product: v_a * v_b can underflow.
            w = mag.mul_(parts[2].sqrt()).mul_(parts[3].sqrt())
            curv_all += float(w.sum())
            curv_conf += float(w[conf].sum())
    return {
        "tv_cosine": corr(dot, na, nb),
        "sign_conflict": n_conf / n,
        "both_nonzero_frac": n_both / n,
        "sign_conflict_of_both_nonzero": n_conf / n_both if n_both else math.nan,
        "magnitude_weighted_conflict": ratio(mag_conf, mag_all),
        "curvature_weighted_conflict": ratio(curv_conf, curv_all) if with_v else math.nan,
    }


def predicted_loss_increase(v, theta_merged, theta_expert) -> float:
    """Diagonal-Fisher estimate of an expert's loss increase under a merge.

    ``0.5 * sum(v * (theta_merged - theta_expert)**2)``, the second-order Taylor
    model of the expert's loss around its own optimum (where the gradient is ~0)
    with the second moment ``v`` as diagonal Fisher. Differences and the sum are in
    float64, so bf16 weights that differ in the last bit are not lost.

    Parameters
    ----------
    v : torch.Tensor
        The expert's second moments (non-negative).
    theta_merged, theta_expert : torch.Tensor
        Merged and expert parameters, same shape as ``v``.

    Returns
    -------
    float

    Raises
    ------
    CurvlensError
        Shapes that differ (all are named), empty tensors, NaN/Inf or negative
        moments.

    Examples
    --------
    >>> import torch
    >>> theta = torch.tensor([1.0, 2.0, 3.0])
    >>> predicted_loss_increase(torch.tensor([1.0, 4.0, 0.5]), theta, theta)
    0.0
    >>> predicted_loss_increase(torch.tensor([1.0, 4.0, 0.5]), theta + 1, theta)
    2.75
    """
    v = as_tensor("v", v)
    theta_merged = as_tensor("theta_merged", theta_merged)
    theta_expert = as_tensor("theta_expert", theta_expert)
    check_same_shape(("v", "theta_merged", "theta_expert"), (v, theta_merged, theta_expert))
    check_nonempty("v", v)
    total = 0.0
    for w, tm, te in chunks(v, theta_merged, theta_expert):
        check_moments("v", w)
        d = tm - te  # not in place: a float64 chunk aliases the caller's tensor
        total += float(w @ (d * d))
    return 0.5 * total
