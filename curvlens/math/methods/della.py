"""DELLA: ``della`` and ``della_linear`` (mergekit 0.1.5's ``della_magprune``
sparsification inside its generalized task arithmetic).

Each task-vector entry is kept at random with a probability that grows with its
magnitude rank within its row: from ``density - epsilon`` for the smallest to
``density + epsilon`` for the largest; the kept entries are rescaled (L1, as
mergekit's ``rescale``) and combined with TIES's sign election (``della``) or
summed (``della_linear``). docs/merge_methods.md states the exact rule."""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch

from curvlens.errors import CurvlensError
from curvlens.math.methods.params import (
    DENSITY, INT8_MASK, LAMBDA, SEED, WEIGHT, ParamSpec, normalize_param, real, rescale_param,
)
from curvlens.math.methods.registry import register
from curvlens.math.methods.sparsify import Sparsifier
from curvlens.math.methods.task_arithmetic import generalized_task_arithmetic

Tensor = torch.Tensor

EPSILON = ParamSpec(
    "epsilon", 0.15,
    "Half-width of the keep probabilities: density -/+ epsilon from the smallest to the largest |tau|, >= 0.",
    per_expert=True, validate=real(lo=0.0),
)


def ranked_layout(shape: torch.Size) -> tuple[int, int, int]:
    """``(rows, length, inner)``: the tensor seen as ``(rows, length, inner)``, ranked
    along ``length`` (mergekit ranks along dim 1, a 0-D or 1-D tensor being one row)."""
    if len(shape) <= 1:
        return 1, math.prod(shape), 1
    return shape[0], shape[1], math.prod(shape[2:])


def keep_probabilities(delta: Tensor, length: int, inner: int, density: float, epsilon: float) -> Tensor:
    """Flat keep probabilities of a block of whole rows of ``delta`` (flat, fp32).

    The rank of ``|delta|`` within its row (1 = smallest; equal magnitudes ranked
    by index) is mapped linearly onto ``[density - epsilon, density + epsilon]``,
    with mergekit's fp32 operations. A row of one entry (mergekit: NaN) gets
    ``density``.
    """
    if length <= 1:
        return torch.full_like(delta, density)
    mags = delta.abs().reshape(-1, length, inner)
    order = torch.argsort(mags, dim=1, stable=True)
    # the inverse permutation by one scatter (a second argsort costs 1.6x as much)
    steps = torch.arange(1, length + 1, dtype=torch.float32, device=delta.device).view(1, -1, 1)
    ranks = torch.empty(order.shape, dtype=torch.float32, device=delta.device).scatter_(1, order,
                                                                                      steps.expand(order.shape))
    spread = ((ranks - 1.0) / (length - 1.0)).clamp(0, 1)
    return ((density - epsilon) + spread * 2 * epsilon).reshape(-1)


class RankedDrop(Sparsifier):
    """One expert's DELLA drop mask, drawn row block by row block.

    One Bernoulli draw per entry from ``gen`` in index order (the stream of
    mergekit's whole-tensor ``torch.bernoulli(probs)``), over blocks of whole rows
    so the ranks are exact. The first pass draws (advancing ``gen`` past this
    expert) and sums the L1 norms of ``rescale``; masks are kept as uint8 within
    ``budget`` entries, else redrawn from the generator state saved before the
    first pass. :meth:`keep` hands them out for blocks of any length, in order.
    """

    def __init__(self, delta_at, shape: torch.Size, density: float, epsilon: float, rescale: bool,
                 size: int, gen: torch.Generator, budget: int, device):
        rows, self.length, self.inner = ranked_layout(shape)
        self.density, self.epsilon = density, epsilon
        row = self.length * self.inner
        step = max(1, size // max(row, 1)) * row
        self.slices = [slice(a, min(a + step, rows * row)) for a in range(0, rows * row, max(step, 1))]
        self.delta_at, self.device = delta_at, device
        self.start = gen.get_state()
        n = rows * row
        stored: Optional[list] = [] if n <= budget else None
        before = after = 0.0
        for keep, d in self._draw(gen):
            if stored is not None:
                stored.append(keep.to(torch.uint8))
            if rescale:
                before += float(d.abs().sum())
                after += float((d * keep).abs().sum())
        if rescale:
            self._set_factor(before, after, device)
        self.stored = stored
        self.source: Optional[Iterator[Tensor]] = None
        self.pending = torch.empty(0, device=device)

    def _draw(self, gen: torch.Generator):
        for sl in self.slices:
            d = self.delta_at(sl)
            probs = keep_probabilities(d, self.length, self.inner, self.density, self.epsilon)
            yield torch.bernoulli(probs, generator=gen), d

    def _masks(self) -> Iterator[Tensor]:
        if self.stored is not None:
            for m in self.stored:
                yield m.float()
            return
        replay = torch.Generator(device=self.device)
        replay.set_state(self.start)
        for keep, _ in self._draw(replay):
            yield keep

    def keep(self, delta: Tensor) -> Tensor:
        if self.source is None:
            self.source = self._masks()
        need = delta.numel()
        parts, have = [self.pending], self.pending.numel()
        while have < need:
            nxt = next(self.source)
            parts.append(nxt)
            have += nxt.numel()
        joined = parts[0] if len(parts) == 1 else torch.cat(parts)
        self.pending = joined[need:]
        return joined[:need]


def _ranked(p: dict, device):
    def make(i, delta_at, shape, density, size, gen, budget) -> Sparsifier:
        eps = p["epsilon"][i]
        if not (density - eps > 0 and density + eps < 1):
            raise CurvlensError(
                f"epsilon[{i}]={eps} with density[{i}]={density}: density -/+ epsilon must lie "
                "strictly inside (0, 1) (as mergekit requires)"
            )
        return RankedDrop(delta_at, shape, density, eps, p["rescale"], size, gen, budget, device)

    return make


def _params(normalize: bool) -> tuple:
    return (WEIGHT, DENSITY, EPSILON, normalize_param(normalize), LAMBDA, rescale_param(True), SEED, INT8_MASK)


@register(
    "della",
    params=_params(True),
    description="DELLA: drop tau_i entries at random, keep prob. rising with |tau| rank; rescale; TIES merge.",
    needs_base=True,
    uses_rng=True,
)
def della(base, experts, moments, p, *, rng, counts) -> Tensor:
    """DELLA (MAGPRUNE sparsification, then the TIES combine), as mergekit 0.1.5's
    ``della``; ``normalize`` defaults to True there.

    Examples
    --------
    >>> from curvlens.math.methods import get_method
    >>> base, e = torch.zeros(6), torch.arange(1.0, 7.0)
    >>> torch.equal(get_method("della")(base, [e], density=0.5, epsilon=0.2, seed=3),
    ...             get_method("della")(base, [e], density=0.5, epsilon=0.2, seed=3))
    True
    """
    return generalized_task_arithmetic(base, experts, p, sparsify=_ranked(p, base.device),
                                       consensus=True, gen=rng, counts=counts)


@register(
    "della_linear",
    params=_params(False),
    description="DELLA's magnitude-ranked random drop and rescale, then a weighted sum (no sign election).",
    needs_base=True,
    uses_rng=True,
)
def della_linear(base, experts, moments, p, *, rng, counts) -> Tensor:
    """DELLA's sparsification with a linear combine (mergekit's ``della_linear``).

    Examples
    --------
    >>> from curvlens.math.methods import get_method
    >>> get_method("della_linear")(torch.zeros(2), [torch.tensor([1.0, -2.0])])  # density 1: unchanged
    tensor([ 1., -2.])
    """
    return generalized_task_arithmetic(base, experts, p, sparsify=_ranked(p, base.device),
                                       consensus=False, gen=rng, counts=counts)
