"""mergekit's generalized task arithmetic: ``task_arithmetic``, ``ties``,
``dare_linear`` and ``dare_ties`` (mergekit 0.1.5 semantics, docs/merge_methods.md).

All four add a weighted combination of the experts' task vectors to the base; they
differ in how each task vector is sparsified (none, top-k magnitude, random drop)
and whether signs are elected (TIES's disjoint mean)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from curvlens.math.blocks import block_size, blocks
from curvlens.math.methods.inputs import per_expert_column
from curvlens.math.methods.native_paths import ties_native
from curvlens.math.methods.params import (
    DENSITY, INT8_MASK, LAMBDA, SEED, WEIGHT, normalize_param, rescale_param,
)
from curvlens.math.methods.registry import MaskCounts, register
from curvlens.math.methods import sparsify as _sparsify
from curvlens.math.methods.sparsify import Magnitude, RandomDrop, Sparsifier, disjoint_mean_parts

Tensor = torch.Tensor


def generalized_task_arithmetic(
    base: Tensor,
    experts: Sequence[Tensor],
    p: dict,
    *,
    sparsify,
    consensus: bool,
    gen: Optional[torch.Generator] = None,
    counts: Optional[MaskCounts] = None,
) -> Tensor:
    """mergekit's generalized task arithmetic (task_arithmetic, ties, dare_*).

    Inputs may be in any float dtype; they are read and cast to fp32 one block at
    a time (:mod:`curvlens.math.blocks`), so no fp32 copy of a whole tensor is
    made. Sparsification needs whole-tensor quantities, found in a first pass.

    ``sparsify`` is None (keep everything), ``"magnitude"`` (TIES), ``"random"``
    (DARE) or a callable ``make(i, delta_at, shape, density, size, gen, budget)``
    returning expert ``i``'s :class:`Sparsifier` (breadcrumbs, DELLA); random
    sparsifiers draw from ``gen`` expert by expert, as mergekit does.
    """
    if sparsify == "magnitude" and consensus:
        fast = ties_native(base, experts, p, counts)
        if fast is not None:  # the C kernel: the same bits in one sweep
            return fast.reshape(base.shape)
    fb = base.reshape(-1)
    flats = [e.reshape(-1) for e in experts]
    n, dev = fb.numel(), base.device
    size = block_size(dev)
    sparsifiers: list[Optional[Sparsifier]] = []
    budget = _sparsify.DARE_MASK_BUDGET  # read at call time (tests lower it)
    for i, fe in enumerate(flats):
        density = p["density"][i] if sparsify else 1.0
        if density >= 1 or n == 0:
            sparsifiers.append(None)  # no draw: later experts see mergekit's random stream
            continue

        def delta_at(ix, fe=fe):
            return fe[ix].float() - fb[ix].float()

        if sparsify == "magnitude":
            sparsifiers.append(Magnitude(delta_at, n, density, p["rescale"], size, dev))
        elif sparsify == "random":
            sparsifiers.append(RandomDrop(delta_at, n, density, p["rescale"], size, gen, budget, dev))
            budget -= n
        else:
            sparsifiers.append(sparsify(i, delta_at, base.shape, density, size, gen, budget))
            budget -= n
    weights = per_expert_column(p["weight"], fb[:1])
    unit = all(w == 1.0 for w in p["weight"])
    total = weights.sum(dim=0)
    # mergekit's guard against dividing by (nearly) zero total weight
    total = torch.where(total.abs() < 1e-8, torch.ones_like(total), total)
    out = torch.empty(n, dtype=torch.float32, device=dev)
    for sl in blocks(n, size):
        b = fb[sl].float()
        deltas, keeps = [], []
        for fe, sp in zip(flats, sparsifiers):
            d = fe[sl].float() - b
            if sp is not None:
                d, keep = sp.apply(d)
                keeps.append(keep)
            else:
                keeps.append(None)
            deltas.append(d)
        if counts is not None:
            counts.add(keeps)
        # x * 1.0 == x exactly: unit weights (the default) skip the product
        weighted = torch.stack(deltas) if unit else torch.stack(deltas) * weights
        if consensus:
            mixed, divisor = disjoint_mean_parts(weighted, None if unit else weights)
        else:
            mixed = weighted.sum(dim=0)
            divisor = total
        if p["normalize"]:
            mixed = mixed / divisor
        if p["lambda"] != 1:
            mixed = mixed * p["lambda"]
        out[sl] = b + mixed
    return out.reshape(base.shape)




@register(
    "task_arithmetic",
    params=(WEIGHT, LAMBDA, normalize_param(False), INT8_MASK),
    description="base + lambda * sum_i w_i tau_i (divided by sum_i w_i if normalize).",
    needs_base=True,
)
def task_arithmetic(base, experts, moments, p, *, rng, counts) -> Tensor:
    """Task arithmetic: ``theta0 + lambda * sum_i w_i (theta_i - theta0)``.

    Examples
    --------
    >>> from curvlens.math.methods import get_method
    >>> get_method("task_arithmetic")(torch.zeros(2), [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0])])
    tensor([4., 2.])
    """
    return generalized_task_arithmetic(base, experts, p, sparsify=None, consensus=False, counts=counts)


@register(
    "ties",
    params=(WEIGHT, DENSITY, normalize_param(True), LAMBDA, rescale_param(False), INT8_MASK),
    description="TIES: keep top-density |tau_i| per tensor, elect signs, average agreeing entries.",
    needs_base=True,
)
def ties(base, experts, moments, p, *, rng, counts) -> Tensor:
    """TIES merging as in mergekit 0.1.5.

    Each task vector keeps its ``k = max(1, int(density * numel))`` largest
    ``|tau_i|`` entries; the weighted task vectors elect a sign per entry (sign of
    their sum, + on a tie); entries whose sign agrees are summed and divided by
    the sum of the agreeing weights (1 where none agree).

    Examples
    --------
    >>> from curvlens.math.methods import get_method
    >>> base = torch.zeros(2)
    >>> get_method("ties")(base, [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])])
    tensor([ 2., -2.])
    """
    return generalized_task_arithmetic(base, experts, p, sparsify="magnitude", consensus=True, counts=counts)


_DARE_PARAMS = (WEIGHT, DENSITY, normalize_param(False), LAMBDA, rescale_param(True), SEED, INT8_MASK)


@register(
    "dare_linear",
    params=_DARE_PARAMS,
    description="DARE: drop task-vector entries at random (keep prob. density), rescale, add.",
    needs_base=True,
    uses_rng=True,
)
def dare_linear(base, experts, moments, p, *, rng, counts) -> Tensor:
    """DARE with a linear combine, as mergekit 0.1.5's ``dare_linear``.

    Each entry of ``tau_i`` is kept with probability ``density`` (one Bernoulli
    draw per entry from ``rng``, experts in order); with ``rescale`` the kept
    entries are scaled so the task vector keeps its L1 norm (about
    ``1 / density``). ``rng=None`` uses a generator seeded with ``seed``.

    Examples
    --------
    >>> from curvlens.math.methods import get_method
    >>> base, e = torch.zeros(4), torch.ones(4)
    >>> torch.equal(get_method("dare_linear")(base, [e], density=0.5, seed=1),
    ...             get_method("dare_linear")(base, [e], density=0.5, seed=1))
    True
    """
    return generalized_task_arithmetic(base, experts, p, sparsify="random", consensus=False, gen=rng, counts=counts)


@register(
    "dare_ties",
    params=_DARE_PARAMS,
    description="DARE drop-and-rescale, then TIES sign election and disjoint mean.",
    needs_base=True,
    uses_rng=True,
)
def dare_ties(base, experts, moments, p, *, rng, counts) -> Tensor:
    """DARE sparsification followed by the TIES combine (mergekit's ``dare_ties``).

    Note mergekit's default ``normalize`` is False here, unlike ``ties``.

    Examples
    --------
    >>> from curvlens.math.methods import get_method
    >>> base = torch.zeros(2)
    >>> get_method("dare_ties")(base, [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])])
    tensor([ 4., -2.])
    """
    return generalized_task_arithmetic(base, experts, p, sparsify="random", consensus=True, gen=rng, counts=counts)
