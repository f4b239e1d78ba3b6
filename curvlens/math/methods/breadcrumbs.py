"""Model Breadcrumbs: ``breadcrumbs`` and ``breadcrumbs_ties`` (mergekit 0.1.5's
``magnitude_outliers`` sparsification inside its generalized task arithmetic).

Each task vector drops its largest-magnitude outliers (a share ``gamma``) and its
smallest entries, keeping a band of ``int(density * numel)`` entries in between;
the kept task vectors are then combined as in ``task_arithmetic``
(``breadcrumbs``) or with TIES's sign election (``breadcrumbs_ties``).
docs/merge_methods.md states the exact rule."""
from __future__ import annotations

from typing import Optional

import torch

from curvlens.math.methods.params import (
    DENSITY, INT8_MASK, LAMBDA, WEIGHT, ParamSpec, normalize_param, real, rescale_param,
)
from curvlens.math.methods.registry import register
from curvlens.math.methods.sparsify import Sparsifier, topk_keeper
from curvlens.math.methods.task_arithmetic import generalized_task_arithmetic

Tensor = torch.Tensor

GAMMA = ParamSpec(
    "gamma", 0.01, "Share of each task vector's largest-|tau| entries dropped as outliers, in [0, 1].",
    per_expert=True, validate=real(lo=0.0, hi=1.0),
)


def band(n: int, density: float, gamma: float) -> tuple[int, int]:
    """``(skip, keep)``: how many of the largest ``|delta|`` are dropped as outliers
    and how many entries after them are kept (mergekit's counts: ``keep =
    int(density * n)``, ``skip = min(int(gamma * n), n - keep)``, i.e. the outlier
    cut shrinks when it would leave fewer than ``keep`` entries)."""
    keep = int(density * n)
    bottom = max(0, n - keep - int(gamma * n))
    return n - bottom - keep, keep


class OutlierBand(Sparsifier):
    """Keep the entries ranked ``skip + 1 .. skip + keep`` by ``|delta|`` (largest
    first): the top-``(skip + keep)`` mask minus the top-``skip`` mask. Both use
    the lowest-index tie rule, so the second is a subset of the first."""

    def __init__(self, delta_at, n: int, density: float, gamma: float, rescale: bool, size: int, device):
        skip, keep = band(n, density, gamma)
        score = lambda ix: delta_at(ix).abs()  # noqa: E731
        self.upper = topk_keeper(score, n, skip + keep, size) if keep > 0 else None
        self.lower = topk_keeper(score, n, skip, size) if keep > 0 and skip > 0 else None
        if rescale:
            self._rescale_from_pass(delta_at, n, size, device, [self.upper, self.lower])

    def keep(self, delta: Tensor) -> Tensor:
        if self.upper is None:
            return torch.zeros_like(delta)
        a = delta.abs()
        mask = self.upper(a)
        return mask if self.lower is None else mask - self.lower(a)


def _outliers(p: dict, device):
    def make(i, delta_at, shape, density, size, gen, budget) -> Optional[Sparsifier]:
        return OutlierBand(delta_at, shape.numel(), density, p["gamma"][i], p["rescale"], size, device)

    return make


_PARAMS = (WEIGHT, DENSITY, GAMMA, normalize_param(False), LAMBDA, rescale_param(False), INT8_MASK)


@register(
    "breadcrumbs",
    params=_PARAMS,
    description="Model Breadcrumbs: drop each tau_i's top-gamma outliers and its smallest entries, add.",
    needs_base=True,
)
def breadcrumbs(base, experts, moments, p, *, rng, counts) -> Tensor:
    """Breadcrumbs sparsification, then task arithmetic (mergekit's ``breadcrumbs``).

    Examples
    --------
    >>> from curvlens.math.methods import get_method
    >>> tau = torch.tensor([5.0, -4.0, 3.0, 2.0, 1.0])
    >>> get_method("breadcrumbs")(torch.zeros(5), [tau], density=0.4, gamma=0.2)
    tensor([ 0., -4.,  3.,  0.,  0.])
    """
    return generalized_task_arithmetic(base, experts, p, sparsify=_outliers(p, base.device),
                                       consensus=False, counts=counts)


@register(
    "breadcrumbs_ties",
    params=_PARAMS,
    description="Model Breadcrumbs sparsification, then TIES sign election and disjoint merge.",
    needs_base=True,
)
def breadcrumbs_ties(base, experts, moments, p, *, rng, counts) -> Tensor:
    """Breadcrumbs sparsification, then the TIES combine (mergekit's
    ``breadcrumbs_ties``; ``normalize`` defaults to False as there).

    Examples
    --------
    >>> from curvlens.math.methods import get_method
    >>> base = torch.zeros(2)
    >>> get_method("breadcrumbs_ties")(base, [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 1.0])])
    tensor([ 4., -2.])
    """
    return generalized_task_arithmetic(base, experts, p, sparsify=_outliers(p, base.device),
                                       consensus=True, counts=counts)
