"""Sparse model soups (Zimmer et al.): averaging models that share a sparsity mask.

Pure tensor functions for one parameter tensor of several ingredients (models):

* :func:`zero_pattern` -- how the ingredients' exact zeros agree: zeros per
  ingredient, zeros shared by all, entries zero in some but not all;
* :func:`soup_support` -- the entries the soup keeps (its mask), by rule;
* :func:`sparse_average` -- the weighted average, exactly zero outside the mask.

A *mask* is the set of entries a model keeps (its non-zero entries), as in pruning.
Mask rules, when the ingredients' masks differ:

``"union"``
    keep an entry that any ingredient keeps; the soup's zeros are exactly the
    entries zero in every ingredient (the shared zeros).
``"intersection"``
    keep only entries every ingredient keeps; the soup is zero wherever any
    ingredient is zero (at least as sparse as each ingredient).

When the masks agree both rules give the shared mask, and averaging keeps it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from curvlens.errors import CurvlensError

Tensor = torch.Tensor
MASK_RULES = ("agree", "union", "intersection")


def zero_pattern(tensors: Sequence[Tensor]) -> dict:
    """Counts of exact zeros across ingredients of one tensor.

    Returns
    -------
    dict
        ``zeros`` (list, per ingredient), ``shared_zeros`` (zero in all),
        ``any_zero`` (zero in at least one) and ``disagreeing`` (zero in some but
        not all: ``any_zero - shared_zeros``).

    Examples
    --------
    >>> zero_pattern([torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 2.0, 3.0])])
    {'zeros': [2, 1], 'shared_zeros': 1, 'any_zero': 2, 'disagreeing': 1}
    """
    _same_shapes(tensors)
    zeros = [t == 0 for t in tensors]
    shared = torch.stack(zeros).all(dim=0)
    any_zero = torch.stack(zeros).any(dim=0)
    n_shared, n_any = int(shared.sum()), int(any_zero.sum())
    return {"zeros": [int(z.sum()) for z in zeros], "shared_zeros": n_shared, "any_zero": n_any,
            "disagreeing": n_any - n_shared}


def soup_support(tensors: Sequence[Tensor], rule: str = "union") -> Tensor:
    """The entries the soup keeps (bool, the tensors' shape).

    ``"union"`` and ``"agree"``: non-zero in any ingredient; ``"intersection"``:
    non-zero in every ingredient.

    Examples
    --------
    >>> a, b = torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 2.0, 3.0])
    >>> soup_support([a, b], "union").tolist(), soup_support([a, b], "intersection").tolist()
    ([False, True, True], [False, True, False])
    """
    if rule not in MASK_RULES:
        raise CurvlensError(f"mask must be one of {list(MASK_RULES)}; got {rule!r}")
    _same_shapes(tensors)
    nonzero = torch.stack([t != 0 for t in tensors])
    return nonzero.all(dim=0) if rule == "intersection" else nonzero.any(dim=0)


def sparse_average(tensors: Sequence[Tensor], weights: Sequence[float], keep: Tensor) -> Tensor:
    """``sum_i w_i theta_i / sum_i w_i`` in fp32 where ``keep``, exactly 0 elsewhere.

    A pruned (zero) entry of an ingredient counts as 0 in the average, as plain
    averaging does.

    Examples
    --------
    >>> a, b = torch.tensor([0.0, 1.0, 0.0]), torch.tensor([0.0, 3.0, 4.0])
    >>> sparse_average([a, b], [1.0, 1.0], soup_support([a, b], "intersection"))
    tensor([0., 2., 0.])
    """
    _same_shapes(tensors)
    if len(weights) != len(tensors):
        raise CurvlensError(f"{len(weights)} weights for {len(tensors)} ingredients")
    total = float(sum(weights))
    if any(w < 0 for w in weights) or not total > 0:
        raise CurvlensError(f"weights must be >= 0 and not all 0; got {list(weights)}")
    out = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    for t, w in zip(tensors, weights):
        if w:
            out.add_(t.float(), alpha=w / total)
    return out.masked_fill_(~keep, 0.0)


def _same_shapes(tensors: Sequence[Tensor]) -> None:
    if not tensors:
        raise CurvlensError("a soup needs at least one ingredient")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise CurvlensError(f"ingredients disagree on the tensor's shape: {sorted(shapes)}")
