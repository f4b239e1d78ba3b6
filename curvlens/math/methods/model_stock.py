"""Model Stock (Jang et al., 2024): interpolate between the base and the experts'
average by a factor set from the angle between their task vectors (mergekit
0.1.5's ``model_stock``, docs/merge_methods.md)."""
from __future__ import annotations

import torch

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
    w0 = base.float()
    ws = [e.float() for e in experts]
    if p["filter_wise"]:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    taus = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(taus):
        for b in taus[i + 1:]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    c = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    den = 1 + (n - 1) * c
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), (n * c) / torch.where(singular, torch.ones_like(den), den))
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(base.shape)
