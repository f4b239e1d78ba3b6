"""Linear merging (model soups): the weighted average of the experts."""
from __future__ import annotations

import torch

from curvlens.errors import CurvlensError
from curvlens.math.blocks import block_size, blocks
from curvlens.math.methods.params import WEIGHT, ParamSpec, boolean
from curvlens.math.methods.registry import register

Tensor = torch.Tensor


@register(
    "linear",
    params=(
        WEIGHT,
        ParamSpec("normalize", True, "Divide by the sum of the weights.", validate=boolean),
    ),
    description="Weighted average of the experts (model soup); the base is ignored.",
    needs_base=False,
    base_role="input",
)
def linear(base, experts, moments, p, *, rng, counts) -> Tensor:
    """Linear merge ``sum_i w_i theta_i`` (divided by ``sum_i w_i`` if ``normalize``).

    The base tensor is ignored (list the base model as an expert to include it,
    as mergekit does when a config lists it under ``models``).

    Raises
    ------
    CurvlensError
        If ``normalize`` is on and the weights sum to 0 (mergekit would return
        inf/NaN).

    Examples
    --------
    >>> from curvlens.math.methods import get_method
    >>> get_method("linear")(None, [torch.tensor([0.0, 4.0]), torch.tensor([4.0, 0.0])], weight=[1, 3])
    tensor([3., 1.])
    """
    thetas = experts
    if p["normalize"] and sum(p["weight"]) == 0:
        raise CurvlensError(
            f"linear: weights sum to 0 with normalize=True; got weight={p['weight']}"
        )
    # fp32 weights and a fused multiply-add, in mergekit's order, so both give
    # the same bits on the same inputs.
    weights = torch.tensor(p["weight"], dtype=torch.float32, device=thetas[0].device)
    total = weights.sum()
    flats = [t.reshape(-1) for t in thetas]
    out = torch.empty(flats[0].numel(), dtype=torch.float32, device=thetas[0].device)
    for sl in blocks(out.numel(), block_size(out.device)):
        result = torch.zeros(sl.stop - sl.start, dtype=torch.float32, device=out.device)
        for theta, w in zip(flats, weights):
            result = torch.addcmul(result, theta[sl].float(), w)
        out[sl] = result / total if p["normalize"] else result
    return out.reshape(thetas[0].shape)
