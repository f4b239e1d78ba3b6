"""Input checks shared by every merge method (run once, by the registry, before a
method's body), the per-expert weight column, the random generator and the
checked read of one block of second moments."""
from __future__ import annotations

import math

from typing import Any, Optional, Sequence

import torch

from curvlens.errors import CurvlensError

Tensor = torch.Tensor


def check_inputs(
    method: str,
    base: Optional[Tensor],
    experts: Sequence[Tensor],
    moments: Optional[Sequence[Tensor]],
    *,
    needs_base: bool,
    needs_moments: bool,
):
    """Check types, shapes, devices and dtypes; return ``(base, experts, moments)``
    as lists in their stored dtypes (methods cast block by block; moments are
    checked block by block by :func:`moment_block`). Never writes into them."""
    if isinstance(experts, Tensor) or not isinstance(experts, Sequence) or len(experts) == 0:
        raise CurvlensError(
            f"{method}: experts must be a non-empty sequence of tensors; got "
            f"{type(experts).__name__}" + (" of length 0" if isinstance(experts, Sequence) else "")
        )
    ref = experts[0]
    _check_float(method, "experts[0]", ref)
    for i, e in enumerate(experts):
        _check_like(method, f"experts[{i}]", e, ref)
    if base is None:
        if needs_base:
            raise CurvlensError(f"{method}: needs a base tensor; got base=None")
    else:
        _check_like(method, "base", base, ref)
    if not needs_moments:
        return base, list(experts), None
    if moments is None or isinstance(moments, Tensor) or not isinstance(moments, Sequence):
        raise CurvlensError(f"{method}: needs one second-moment tensor per expert; got {type(moments).__name__}")
    if len(moments) != len(experts):
        raise CurvlensError(f"{method}: expected {len(experts)} moment tensors (one per expert); got {len(moments)}")
    for i, v in enumerate(moments):
        _check_like(method, f"moments[{i}]", v, ref)
    return base, list(experts), list(moments)


def check_arity(method, has_base: bool, n_experts: int) -> None:
    """Check the number of experts and the presence of a base against what
    ``method`` (a :class:`~curvlens.math.methods.registry.MergeMethod`) takes."""
    lo, hi = method.min_experts, method.max_experts
    if n_experts < lo or (hi is not None and n_experts > hi):
        if lo == hi:
            want = f"exactly {lo} expert{'s' if lo != 1 else ''}"
        elif hi is None:
            want = f"at least {lo} experts"
        else:
            want = f"{lo} to {hi} experts"
        base = " besides the base" if method.needs_base else ""
        raise CurvlensError(f"{method.name}: takes {want}{base}; got {n_experts}")
    if has_base and not method.allows_base:
        raise CurvlensError(f"{method.name}: takes no base tensor (list the model as the one expert); got a base")


def _check_float(method: str, label: str, t: Any) -> None:
    if not isinstance(t, Tensor):
        raise CurvlensError(f"{method}: {label} must be a torch.Tensor; got {type(t).__name__}")
    if not t.is_floating_point():
        raise CurvlensError(f"{method}: {label} must be floating point; got dtype {t.dtype}")


def _check_like(method: str, label: str, t: Any, ref: Tensor) -> None:
    _check_float(method, label, t)
    if t.shape != ref.shape:
        raise CurvlensError(
            f"{method}: {label} has shape {tuple(t.shape)}; expected {tuple(ref.shape)} "
            "(the shape of experts[0])"
        )
    if t.device != ref.device:
        raise CurvlensError(f"{method}: {label} is on {t.device}; expected {ref.device}")


def per_expert_column(values: Sequence[float], like: Tensor) -> Tensor:
    """Values as an fp32 tensor shaped to broadcast against a stack of ``like``."""
    return torch.tensor(values, dtype=torch.float32, device=like.device).reshape(
        (-1,) + (1,) * like.ndim
    )


def generator(rng: Optional[torch.Generator], seed: int, device: torch.device) -> torch.Generator:
    if rng is None:
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        return gen
    if not isinstance(rng, torch.Generator):
        raise CurvlensError(f"rng must be a torch.Generator or None; got {type(rng).__name__}")
    gdev = torch.device(rng.device)
    if gdev.type != device.type or (
        gdev.index is not None and device.index is not None and gdev.index != device.index
    ):
        raise CurvlensError(f"rng is on {gdev}; expected a generator on the tensors' device {device}")
    return rng



def moment_block(v: Tensor, sl: slice, i: int, method: str) -> Tensor:
    """One block of a flat second-moment tensor in fp32, checked to be nonnegative
    and finite (a NaN weight would otherwise vanish behind a mask that drops it)."""
    block = v[sl].float()
    if block.numel():
        lo, hi = (float(x) for x in torch.aminmax(block))  # float reductions: ~10x a bool any()
        if lo < 0:
            raise CurvlensError(f"{method}: moments[{i}] must be nonnegative; got minimum {lo:.3g}")
        if not (math.isfinite(lo) and math.isfinite(hi)):
            bad = int((~torch.isfinite(block)).sum())
            raise CurvlensError(f"{method}: moments[{i}] must be finite; {bad} entries of a block are NaN or "
                                "infinite")
    return block
