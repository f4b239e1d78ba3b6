"""Passthrough: one model's tensor, optionally scaled (mergekit 0.1.5's
``passthrough``; its layer stacking with ``slices`` belongs to the config layer)."""
from __future__ import annotations

import torch

from curvlens.math.methods.params import ParamSpec, real
from curvlens.math.methods.registry import register

Tensor = torch.Tensor


@register(
    "passthrough",
    params=(ParamSpec("scale", None, "Multiply the tensor by this (None: unchanged).", per_expert=True,
                      validate=real(allow_none=True)),),
    description="Passthrough: the one model's tensor, times scale if given (no base).",
    needs_base=False,
    min_experts=1,
    max_experts=1,
    allows_base=False,
    base_role="input",  # mergekit counts a config's base_model as an input: the one model, or one too many
)
def passthrough(base, experts, moments, p, *, rng, counts) -> Tensor:
    """The single expert's tensor in fp32, times ``scale`` when it is not None.

    Examples
    --------
    >>> from curvlens.math.methods import get_method
    >>> get_method("passthrough")(None, [torch.tensor([1.0, -2.0])], scale=0.5)
    tensor([ 0.5000, -1.0000])
    """
    x = experts[0].float()
    return x.clone() if p["scale"][0] is None else x * p["scale"][0]
