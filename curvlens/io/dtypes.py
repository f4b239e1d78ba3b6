"""dtypes as users name them, and the dtype every written tensor gets.

One rule for every writer of model weights (a merge, a passthrough stack, a sparse
soup): a requested output dtype applies to floating tensors only; integer and bool
tensors (position ids, masks) keep their own. ``config.json`` then states the
written dtype, as transformers reads the weights' dtype from it.
"""
from __future__ import annotations

import torch

from curvlens.errors import CurvlensError

__all__ = ["DTYPES", "parse_dtype", "output_dtype", "dtype_name", "dtype_overrides", "holds_every_value",
           "reads_as_stored"]

#: The names a config or a call may give a floating dtype by.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
          "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"``/``"bf16"``/``torch.bfloat16`` -> ``torch.bfloat16``; None stays None.

    Examples
    --------
    >>> parse_dtype("bf16"), parse_dtype("torch.float16"), parse_dtype(None)
    (torch.bfloat16, torch.float16, None)
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[str(dtype).lower().replace("torch.", "")]
    except KeyError:
        raise CurvlensError(f"dtype={dtype!r} is not valid; expected one of {sorted(DTYPES)}") from None


def output_dtype(stored: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor stored as ``stored`` is written in: ``requested`` for a
    floating tensor (when given), its own otherwise.

    Examples
    --------
    >>> output_dtype(torch.float32, torch.bfloat16), output_dtype(torch.int64, torch.bfloat16)
    (torch.bfloat16, torch.int64)
    """
    return stored if requested is None or not stored.is_floating_point else requested


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"`` (as configs write it)."""
    return str(dtype).replace("torch.", "")


def dtype_overrides(dtype: torch.dtype | None) -> dict:
    """The ``config.json`` keys that state a written dtype (none when the
    tensors keep their stored dtypes)."""
    if dtype is None:
        return {}
    name = dtype_name(dtype)
    return {"torch_dtype": name, "dtype": name}


def holds_every_value(wide: torch.dtype, narrow: torch.dtype) -> bool:
    """Whether every value of floating dtype ``narrow`` is also a value of ``wide``
    (so a cast from ``narrow`` to ``wide`` changes no value): at least its
    precision, its largest value and its smallest subnormal.

    Examples
    --------
    >>> holds_every_value(torch.float32, torch.bfloat16), holds_every_value(torch.float32, torch.float16)
    (True, True)
    >>> holds_every_value(torch.float16, torch.bfloat16), holds_every_value(torch.bfloat16, torch.float32)
    (False, False)
    """
    if not (wide.is_floating_point and narrow.is_floating_point):
        return False
    w, n = torch.finfo(wide), torch.finfo(narrow)
    return w.eps <= n.eps and w.max >= n.max and w.smallest_normal * w.eps <= n.smallest_normal * n.eps


#: Stored dtypes the merge methods and the selection sweeps are tested to take as
#: they are (fp8 checkpoints, whose values fp32 also holds, keep the cast: torch
#: has few fp8 operations).
_COMPUTED_AS_STORED = (torch.bfloat16, torch.float16)


def reads_as_stored(stored: torch.dtype, round_to: torch.dtype) -> bool:
    """Whether a stream asked to round ``stored`` weights to ``round_to``
    (:meth:`curvlens.passes.Experts.rounded`, a mergekit config's ``dtype``) hands
    them on as stored: the rounding would change no value (bf16 or fp16 to fp32),
    and what takes the stored dtype (the merge methods, the selection sweeps)
    computes in fp32 (so only fp32 qualifies).

    Measured on a 250M x 3 bf16 zoo, one run each: the cast took 1.6 s of the
    read-ahead thread in a TIES merge, which went from 8.1-9.1 s to 6.2-6.6 s
    (OTA+FFG 11.5-11.7 s to 9.2-9.3 s), with the same bytes written and max RSS
    down by a third (no fp32 copy of every input).

    Examples
    --------
    >>> reads_as_stored(torch.bfloat16, torch.float32), reads_as_stored(torch.float32, torch.bfloat16)
    (True, False)
    """
    return round_to == torch.float32 and stored in _COMPUTED_AS_STORED and holds_every_value(round_to, stored)
