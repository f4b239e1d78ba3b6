"""Arcee Fusion: take the expert's value only where it moved far, as judged by an
importance score with an outlier threshold (mergekit 0.1.5's ``arcee_fusion``,
docs/merge_methods.md)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from curvlens.math.blocks import block_size
from curvlens.math.methods.registry import register

Tensor = torch.Tensor


def importance(expert: Tensor, base: Tensor) -> Tensor:
    """``|expert - base| * KL(softmax(expert) || softmax(base))``, the KL divergence
    taken over the last dim (one value per row, 1e-8 added to both
    distributions), fp32."""
    p = F.softmax(expert, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    return (expert - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def fusion_threshold(scores: Tensor) -> Tensor:
    """``median + 1.5 * (q3 - q1)`` of ``scores``, each quartile the entry at
    index ``floor(q * (n - 1))`` of the sorted scores (mergekit's rule), found
    exactly with ``kthvalue``."""
    flat = scores.reshape(-1)
    last = flat.numel() - 1
    q1, med, q3 = (torch.kthvalue(flat, i + 1).values for i in (last // 4, last // 2, 3 * last // 4))
    return med + 1.5 * (q3 - q1)


@register(
    "arcee_fusion",
    params=(),
    description="Arcee Fusion: base + tau only where |tau| * row KL reaches median + 1.5 IQR.",
    needs_base=True,
    min_experts=1,
    max_experts=1,
)
def arcee_fusion(base, experts, moments, p, *, rng, counts) -> Tensor:
    """``theta_0 + tau * [importance >= threshold]`` for the one expert
    (:func:`importance`, :func:`fusion_threshold`).

    mergekit estimates the quartiles from a random sample of 10**6 entries (drawn
    with replacement from torch's global generator) when a tensor has more;
    curvlens always uses the exact order statistics, so the two agree exactly up
    to 10**6 entries and curvlens is deterministic beyond.

    Examples
    --------
    >>> from curvlens.math.methods import get_method
    >>> base = torch.zeros(2, 4)
    >>> expert = torch.tensor([[0.0, 0.1, 0.0, 0.2], [0.0, 0.0, 3.0, 0.3]])
    >>> get_method("arcee_fusion")(base, [expert])  # the small row's edits score below the cut
    tensor([[0.0000, 0.0000, 0.0000, 0.0000],
            [0.0000, 0.0000, 3.0000, 0.3000]])
    """
    # importance is row-wise (a softmax and a KL per row), so it is taken a block
    # of rows at a time into one fp32 tensor, the only whole-tensor copy besides
    # the result; the threshold is that tensor's order statistics
    b2 = base.reshape(1, -1) if base.dim() <= 1 else base.reshape(-1, base.shape[-1])
    e2 = experts[0].reshape(b2.shape)
    step = max(1, block_size(base.device) // max(1, b2.shape[1]))
    scores = torch.empty(b2.shape, dtype=torch.float32, device=base.device)
    for r in range(0, b2.shape[0], step):
        scores[r:r + step] = importance(e2[r:r + step].float(), b2[r:r + step].float())
    cut = fusion_threshold(scores)
    out = torch.empty(b2.shape, dtype=torch.float32, device=base.device)
    for r in range(0, b2.shape[0], step):
        b, e = b2[r:r + step].float(), e2[r:r + step].float()
        keep = (scores[r:r + step] >= cut).float()
        if counts is not None:
            counts.add([keep.reshape(-1)])
        out[r:r + step] = b + (e - b) * keep
    return out.reshape(base.shape)
