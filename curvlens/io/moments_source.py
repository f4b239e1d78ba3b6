"""Where a :class:`~curvlens.io.moments.Moments` comes from, told without reading data.

Every reader of second moments (an exported safetensors file, a ``torch.optim``
state, a Trainer dir, a distributed checkpoint's shards) records the same few
facts, so a summary before a merge (:func:`curvlens.preflight`) and
``curvlens inspect`` describe any source alike.
"""
from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class MomentsSource:
    """What a reader knows about the moments it opened.

    Attributes
    ----------
    format : str
        The layout read, e.g. ``"exported exp_avg_sq (safetensors)"``,
        ``"torch.optim state dict (optimizer.pt)"``.
    file : Path or None
        The file (or dir) read; None in memory.
    names : str
        How tensors got their parameter names: ``"keys are parameter names"``,
        or the parameter order that matched an index-keyed state and how its
        names are saved (the tier).
    dtypes : tuple of str
        The stored dtypes of the moments (they are read as fp32).
    betas : tuple or None
        Adam's ``(beta1, beta2)`` when recorded (either may be None).
    details : dict
        Anything else a reader reports (strings), e.g. a distributed
        checkpoint's world size.
    """

    format: str
    file: Path | None = None
    names: str = "keys are parameter names"
    dtypes: tuple[str, ...] = ()
    betas: tuple | None = None
    details: dict[str, str] = field(default_factory=dict)


def dtype_names(dtypes) -> tuple[str, ...]:
    """Sorted distinct dtype names (``float32``, ``bfloat16``) of torch dtypes.

    Examples
    --------
    >>> import torch
    >>> dtype_names([torch.float32, torch.bfloat16, torch.float32])
    ('bfloat16', 'float32')
    """
    return tuple(sorted({str(d).replace("torch.", "") for d in dtypes}))


def group_betas(groups: list) -> tuple | None:
    """Adam's ``(beta1, beta2)`` of a ``torch.optim`` state's param groups, when
    every group that records them agrees.

    Examples
    --------
    >>> group_betas([{"betas": (0.9, 0.999)}, {"betas": [0.9, 0.999]}]), group_betas([{}])
    ((0.9, 0.999), None)
    """
    pairs = {tuple(g["betas"]) for g in groups
             if isinstance(g, dict) and isinstance(g.get("betas"), (list, tuple)) and len(g["betas"]) == 2}
    return tuple(float(b) for b in pairs.pop()) if len(pairs) == 1 else None


def meta_betas(meta: dict, beta2: float | None) -> tuple | None:
    """``(beta1, beta2)`` from a safetensors file's metadata (``betas`` as a JSON
    list, checked by the reader), beta1 None when only beta2 is recorded.

    Examples
    --------
    >>> meta_betas({"betas": "[0.9, 0.999]"}, 0.999), meta_betas({}, 0.99), meta_betas({}, None)
    ((0.9, 0.999), (None, 0.99), None)
    """
    try:
        b1 = float(json.loads(meta["betas"])[0]) if "betas" in meta else None
    except (ValueError, TypeError, IndexError, KeyError):
        b1 = None
    return None if b1 is None and beta2 is None else (b1, beta2)


def warn_untrained(label: str, untrained: Sequence[str]) -> None:
    """Say which saved tensors no optimizer state covers (taken as untrained)."""
    if untrained:
        warnings.warn(f"{label}: {len(untrained)} saved tensor(s) are buffers with no optimizer state, e.g. "
                      f"{list(untrained)[:3]}: taken as untrained (zero second moment in analyses, the base's "
                      "value in a merge; Moments.untrained lists them)", stacklevel=4)
