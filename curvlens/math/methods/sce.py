"""SCE (Wan et al., 2024): Select the task-vector entries where the experts vary
most, Calculate per-expert weights from their squared magnitudes, Erase entries
against the elected sign (mergekit 0.1.5's ``sce``, docs/merge_methods.md)."""
from __future__ import annotations

import torch

from curvlens.math.blocks import block_size, blocks
from curvlens.math.methods.params import INT8_MASK, ParamSpec, real
from curvlens.math.methods.registry import register
from curvlens.math.topk import kth_largest, select_mask

Tensor = torch.Tensor


def variance_mask(taus: Tensor, share: float) -> Tensor:
    """fp32 0/1 mask keeping the ``k = int(count_nonzero(var) * share)`` entries of
    largest variance across experts (population variance; ties at the k-th value:
    lowest indices). ``k`` is computed as mergekit does, in fp32 (``30 * 0.3`` is
    9 there, 8 in double precision)."""
    var = torch.var(taus, dim=0, unbiased=False)
    if share <= 0:
        return torch.zeros_like(var)
    k = int(torch.count_nonzero(var) * share)
    if k == 0:
        return torch.zeros_like(var)
    flat = var.reshape(-1)
    kth = kth_largest(flat, k)
    ties = k - int(torch.count_nonzero(flat > kth))
    return select_mask(var, kth, ties).to(torch.float32)


@register(
    "sce",
    params=(
        INT8_MASK,
        ParamSpec("select_topk", 1.0, "Share of entries kept: those of largest variance across experts, in [0, 1].",
                  validate=real(lo=0.0, hi=1.0)),
    ),
    description="SCE: keep high-variance entries, weight experts by mean tau^2, TIES-style sign erase.",
    needs_base=True,
)
def sce(base, experts, moments, p, *, rng, counts) -> Tensor:
    """SCE merging as mergekit 0.1.5 computes it.

    1. ``tau_i = theta_i - theta_0``; with ``select_topk < 1`` every ``tau_i`` keeps
       only the entries of largest variance across experts (:func:`variance_mask`).
    2. ``w_i = mean(tau_i**2)`` normalised to sum 1 (all ``1/N`` if the sum is
       below 1e-6).
    3. Sign election as TIES (sign of ``sum_i tau_i``, + on a zero sum); entries
       against it, and zeros, are erased.
    4. ``theta_0 + sum_i w_i m_i tau_i / max(sum_i w_i m_i, 1e-6)``.

    Examples
    --------
    >>> from curvlens.math.methods import get_method
    >>> get_method("sce")(torch.zeros(2), [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])])
    tensor([ 2.3333, -2.0000])
    """
    # Whole-tensor quantities (the variance cut, each expert's mean tau**2) are
    # taken one expert or one block of entries at a time, in the order mergekit's
    # whole-tensor expressions take them; the combine is elementwise, in blocks.
    # Peak memory: about two fp32 copies of the tensor, not 4N.
    n = len(experts)
    fb = base.reshape(-1)
    flats = [e.reshape(-1) for e in experts]
    size = block_size(base.device)
    mask = None
    if p["select_topk"] < 1:
        var = torch.empty(fb.numel(), dtype=torch.float32, device=base.device)
        for sl in blocks(fb.numel(), size):
            b = fb[sl].float()
            var[sl] = torch.var(torch.stack([f[sl].float() - b for f in flats]), dim=0, unbiased=False)
        mask = _top_variance(var, p["select_topk"])
        del var
    w = torch.empty(n, dtype=torch.float32, device=base.device)
    for i, f in enumerate(flats):
        tau = f.float() - fb.float()
        if mask is not None:
            tau = tau * mask
        w[i] = tau.square().reshape(1, -1).mean(dim=1)[0]
        del tau
    total = float(torch.sum(w))
    w = torch.ones_like(w) / n if abs(total) < 1e-6 else w / total
    out = torch.empty(fb.numel(), dtype=torch.float32, device=base.device)
    for sl in blocks(fb.numel(), size):
        b = fb[sl].float()
        taus = torch.stack([f[sl].float() - b for f in flats])
        if mask is not None:
            taus = taus * mask[sl].unsqueeze(0)
        elected = (taus.sum(dim=0) >= 0).to(torch.float32) * 2 - 1
        wb = w.reshape(-1, 1) * (taus.sign() == elected)
        out[sl] = b + (taus * wb).sum(dim=0) / torch.sum(wb, dim=0).clamp(min=1e-6)
    return out.reshape(base.shape)


def _top_variance(var: Tensor, share: float) -> Tensor:
    """fp32 0/1 mask of :func:`variance_mask` from the variance itself."""
    if share <= 0:
        return torch.zeros_like(var)
    k = int(torch.count_nonzero(var) * share)
    if k == 0:
        return torch.zeros_like(var)
    kth = kth_largest(var, k)
    ties = k - int(torch.count_nonzero(var > kth))
    return select_mask(var, kth, ties).to(torch.float32)
