"""What a reader of sharded optimizer states hands to :class:`curvlens.Moments`
(which then describes itself with a :class:`~curvlens.io.moments_source.MomentsSource`).

The DeepSpeed and ``torch.distributed.checkpoint`` readers index their shards at
open time (headers and small pickled metadata only) and return a
:class:`ShardedSource`: the shape of every moment, a function that assembles one
full fp32 moment on demand, and what the files say about the run. They never
construct ``Moments`` themselves, so :mod:`curvlens.io.moments` depends on them and
not the other way round.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from curvlens.errors import CurvlensError


@dataclass
class ShardedSource:
    """Second moments indexed across shards, read one parameter at a time.

    Attributes
    ----------
    shapes : dict
        Parameter name -> full shape.
    read : callable
        ``read(name)`` -> the full fp32 moment, assembled from its pieces only.
    label : str
        What to call the source in messages (the dir and its layout).
    path : Path
        The dir the shards are in.
    step, beta2 : int or float or None
        Adam's step count and beta2 where the files record them.
    metadata : dict of str
        The source's description: ``format``, and e.g. ``zero_stage``,
        ``world_size``, ``step``, ``betas``, ``ds_version``, ``tag``.
    """

    shapes: dict[str, torch.Size]
    read: Callable[[str], torch.Tensor]
    label: str
    path: Path
    step: int | None = None
    beta2: float | None = None
    metadata: dict[str, str] = field(default_factory=dict)


def step_count(x: Any, where: str) -> int:
    """An optimizer step count (int, float or 0-d tensor) as a whole number >= 0.

    Examples
    --------
    >>> step_count(torch.tensor(3.0), "file")
    3
    """
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise CurvlensError(f"{where}: 'step' must be a number; got a tensor of shape {tuple(x.shape)}")
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x != int(x) or x < 0:
        raise CurvlensError(f"{where}: 'step' must be a whole number >= 0; got {x!r}")
    return int(x)


def betas_of(groups: Any, where: str) -> tuple[float, float] | None:
    """The ``betas`` every param group shares, checked (``None`` when absent or
    when groups differ, as for ``optimizer.pt``)."""
    if not isinstance(groups, (list, tuple)):
        raise CurvlensError(f"{where}: 'param_groups' must be a list of dicts; got a {type(groups).__name__}")
    found = set()
    for g in groups:
        if not isinstance(g, Mapping):
            raise CurvlensError(f"{where}: 'param_groups' must be a list of dicts; holds a {type(g).__name__}")
        if "betas" not in g:
            continue
        b = g["betas"]
        if not isinstance(b, (list, tuple)) or len(b) != 2 or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in b):
            raise CurvlensError(f"{where}: param_groups 'betas' must be (beta1, beta2); got {b!r}")
        if not (0.0 <= b[0] < 1.0 and 0.0 <= b[1] < 1.0):
            raise CurvlensError(f"{where}: param_groups 'betas' must lie in [0, 1); got {tuple(b)!r}")
        found.add((float(b[0]), float(b[1])))
    return found.pop() if len(found) == 1 else None


def describe(fmt: str, step: int | None, betas: tuple[float, float] | None, **fields: Any) -> dict[str, str]:
    """The ``metadata`` strings a reader attaches (``None`` fields left out)."""
    out = {"format": fmt}
    if step is not None:
        out["step"] = str(step)
    if betas is not None:
        out["betas"] = f"[{betas[0]}, {betas[1]}]"
    out.update({k: str(v) for k, v in fields.items() if v is not None})
    return out
