"""Model Stock (Jang et al., 2024): interpolate between the base and the experts'
average by a factor set from the angle between their task vectors (mergekit
0.1.5's ``model_stock``, docs/merge_methods.md)."""
from __future__ import annotations

import torch

from curvlens.math.blocks import block_size, blocks
from curvlens.math.methods.params import ParamSpec, boolean
from curvlens.math.methods.registry import register

Tensor = torch.Tensor


@register(
    "model_stock",
    params=(
        ParamSpec("filter_wise", False,
                  "One angle per row (slice along the last dim) instead of one for the whole tensor.",
                  validate=boolean),
    ),
    description="Model Stock: t * mean(experts) + (1 - t) * base, t from the mean cosine between task vectors.",
    needs_base=True,
    min_experts=2,
)
def model_stock(base, experts, moments, p, *, rng, counts) -> Tensor:
    """Model Stock as mergekit 0.1.5 computes it.

    With ``c`` the mean over expert pairs of ``cos(tau_i, tau_j)`` (norm product
    floored at 1e-6, each cosine clipped to [-1, 1]) and ``N`` experts,
    ``t = N c / (1 + (N - 1) c)`` (0 where ``|1 + (N - 1) c| < 1e-6``) and the
    result is ``t * mean_i theta_i + (1 - t) * theta_0``. ``filter_wise`` takes
    one ``c`` per slice along the last dim (a 1-D tensor is one slice).

    Examples
    --------
    >>> from curvlens.math.methods import get_method
    >>> base = torch.zeros(2)
    >>> # orthogonal task vectors: c = 0, t = 0, the base
    >>> get_method("model_stock")(base, [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])])
    tensor([0., 0.])
    """
    n = len(experts)
    if p["filter_wise"]:
        # one angle per slice along the last dim: every statistic stays within a
        # row, so row blocks give exactly the whole tensor's numbers
        b2 = base.reshape(1, -1) if base.dim() <= 1 else base.reshape(-1, base.shape[-1])
        e2 = [e.reshape(b2.shape) for e in experts]
        out = torch.empty(b2.shape, dtype=torch.float32, device=base.device)
        step = max(1, block_size(base.device) // max(1, b2.shape[1]))
        for r in range(0, b2.shape[0], step):
            rows = slice(r, r + step)
            w0 = b2[rows].float()
            ws = [e[rows].float() for e in e2]
            t = _interpolation(_mean_cosine([w - w0 for w in ws], dim=-1).unsqueeze(-1), n)
            out[rows] = t * (sum(ws) / n) + (1 - t) * w0
        return out.reshape(base.shape)
    # One angle for the whole tensor: its norms and dot products are whole-tensor
    # reductions (so the numbers are mergekit's, bit for bit), taken one task
    # vector at a time; the interpolation is elementwise, in blocks.
    w0 = base.float().reshape(-1)
    norms = [torch.norm(e.float().reshape(-1) - w0, dim=-1) for e in experts]
    cosines = []
    for i in range(n):
        a = experts[i].float().reshape(-1) - w0
        for j in range(i + 1, n):
            b = experts[j].float().reshape(-1) - w0
            cosines.append(((a * b).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
            del b
        del a
    t = _interpolation(torch.stack(cosines).mean(dim=0).unsqueeze(-1), n) if cosines else None
    out = torch.empty(w0.shape, dtype=torch.float32, device=base.device)
    flats = [e.reshape(-1) for e in experts]
    for sl in blocks(w0.numel(), block_size(base.device)):
        ws = [f[sl].float() for f in flats]
        out[sl] = t * (sum(ws) / n) + (1 - t) * w0[sl]
    return out.reshape(base.shape)


def _mean_cosine(taus: list[Tensor], dim: int) -> Tensor:
    """Mean over pairs of ``cos(tau_i, tau_j)`` along ``dim`` (norm product floored
    at 1e-6, each cosine clipped to [-1, 1]), as mergekit computes it."""
    cosines = []
    for i, a in enumerate(taus):
        for b in taus[i + 1:]:
            norms = torch.norm(a, dim=dim) * torch.norm(b, dim=dim)
            cosines.append(((a * b).sum(dim=dim) / norms.clamp(min=1e-6)).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0)


def _interpolation(c: Tensor, n: int) -> Tensor:
    """``t = N c / (1 + (N - 1) c)``, 0 where the denominator is below 1e-6."""
    den = 1 + (n - 1) * c
    singular = den.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(c), (n * c) / torch.where(singular, torch.ones_like(den), den))
