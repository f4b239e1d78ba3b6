"""Fisher-weighted averaging (Matena & Raffel) with a diagonal Fisher per expert:
the Adam second moments, or a Fisher estimated from data in the same layout."""
from __future__ import annotations

import torch

from curvlens.errors import CurvlensError
from curvlens.math.blocks import block_size, blocks
from curvlens.math.methods.inputs import moment_block, per_expert_column
from curvlens.math.methods.params import ParamSpec, real
from curvlens.math.methods.registry import register
from curvlens.math.methods.sparsify import one_where_zero

Tensor = torch.Tensor


@register(
    "fisher",
    params=(
        ParamSpec(
            "weight", 1.0, "Weight of each expert's Fisher, >= 0.",
            per_expert=True, validate=real(lo=0.0),
        ),
        ParamSpec(
            "fisher_floor", 0.0, "Lower bound applied to every Fisher entry, >= 0.",
            validate=real(lo=0.0),
        ),
    ),
    description="Fisher merging: sum_i w_i F_i theta_i / sum_i w_i F_i with F_i the moments.",
    needs_base=False,
    base_role="ignored",
    needs_moments=True,
)
def fisher(base, experts, moments, p, *, rng, counts) -> Tensor:
    """Diagonal Fisher merging with the second moments as the Fisher.

    ``F_i = max(moments_i, fisher_floor)``; entries where ``sum_i w_i F_i == 0``
    get the plain weighted mean ``sum_i w_i theta_i / sum_i w_i``. The base is
    ignored.

    Examples
    --------
    >>> from curvlens.math.methods import get_method
    >>> thetas = [torch.tensor([1.0, 1.0]), torch.tensor([4.0, 4.0])]
    >>> get_method("fisher")(None, thetas, [torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])])
    tensor([2.0000, 2.5000])
    """
    thetas, vs = experts, moments
    if sum(p["weight"]) == 0:
        raise CurvlensError(f"fisher: weights must not all be 0; got weight={p['weight']}")
    floor = p["fisher_floor"]
    flats, vflats = [t.reshape(-1) for t in thetas], [v.reshape(-1) for v in vs]
    weights = per_expert_column(p["weight"], flats[0])
    total = sum(p["weight"])
    out = torch.empty(flats[0].numel(), dtype=torch.float32, device=flats[0].device)
    for sl in blocks(out.numel(), block_size(out.device)):
        fis = torch.stack([moment_block(v, sl, i, "fisher") for i, v in enumerate(vflats)])
        if floor > 0:
            fis = torch.clamp_min(fis, floor)
        stacked = torch.stack([t[sl].float() for t in flats])
        wf = weights * fis
        den = wf.sum(dim=0)  # >= 0: weights and Fisher are
        if den.numel() and float(den.min()) == 0.0:
            merged = (wf * stacked).sum(dim=0) / one_where_zero(den)
            plain = (weights * stacked).sum(dim=0) / total
            out[sl] = torch.where(den == 0, plain, merged)
        else:
            out[sl] = (wf * stacked).sum(dim=0) / den
    return out.reshape(thetas[0].shape)
