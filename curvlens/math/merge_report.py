"""What the merge report measures about each merged tensor, block by block: how far
the merge moved it from its reference (the base, or the experts' mean), and the
cast to the output dtype, which must not overflow."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from curvlens.errors import CurvlensError

__all__ = ["ChangeNorms", "reference_block", "cast_checked", "cast_words"]


def reference_block(base: Optional[torch.Tensor], experts: Sequence[torch.Tensor], sl: slice) -> torch.Tensor:
    """Block ``sl`` (flat) of what a merge is measured against, in fp32: the base,
    or the experts' mean when there is no base."""
    if base is not None:
        return base.reshape(-1)[sl].float()
    return torch.stack([e.reshape(-1)[sl].float() for e in experts]).mean(dim=0)


class ChangeNorms:
    """``||merged - reference||`` and ``||reference||`` of one tensor, added block by
    block (sums of squares in double).

    Examples
    --------
    >>> c = ChangeNorms()
    >>> c.add(torch.tensor([3.0, 4.0]), torch.zeros(2)); c.add(torch.tensor([0.0]), torch.tensor([1.0]))
    >>> round(c.delta, 6), c.relative() > 1
    (5.09902, True)
    """

    def __init__(self):
        self.sq_delta = 0.0
        self.sq_ref = 0.0

    def add(self, merged: torch.Tensor, ref: torch.Tensor) -> None:
        self.sq_delta += float(torch.linalg.vector_norm(merged - ref)) ** 2
        self.sq_ref += float(torch.linalg.vector_norm(ref)) ** 2

    @property
    def finite(self) -> bool:
        return math.isfinite(self.sq_delta)

    @property
    def delta(self) -> float:
        return self.sq_delta ** 0.5

    def relative(self) -> float:
        """``delta / ||reference||``; NaN when the reference is all zero (a bias the
        base has at 0: a relative change is undefined there, not 1e26)."""
        return self.delta / self.sq_ref ** 0.5 if self.sq_ref > 0 else math.nan


def cast_words(input_dtype: torch.dtype | None, output_dtype: torch.dtype) -> dict:
    """How :func:`cast_checked` names the dtype a merge is first cast to: the
    output dtype, or (a config's ``dtype`` other than its ``out_dtype``) the input
    dtype, in which mergekit computes before casting to the output dtype.

    Examples
    --------
    >>> cast_words(torch.float16, torch.float32)["what"]
    'the input dtype'
    """
    if input_dtype is None or input_dtype == output_dtype:
        return {"what": "the output dtype"}
    out = str(output_dtype).replace("torch.", "")
    return {"what": "the input dtype",
            "hint": f"; it is the config's dtype, in which each tensor is merged before the cast to out_dtype {out}"}


def cast_checked(block: torch.Tensor, target: torch.dtype, name: str, *, what: str = "the output dtype",
                 hint: str = "") -> torch.Tensor:
    """``block`` (fp32) cast to ``target`` on the CPU; a value the target cannot
    hold (beyond fp16's 65504) is a CurvlensError naming tensor ``name``, never an Inf.
    ``what`` says which dtype ``target`` is to the user (the output's, or the
    input dtype a config computes in first), ``hint`` ends the message.

    Examples
    --------
    >>> cast_checked(torch.tensor([1.0, 7e4]), torch.float16, "w")
    Traceback (most recent call last):
    ...
    curvlens.errors.CurvlensError: tensor 'w': a merged value (7e+04) overflows the output dtype float16 (largest 6.55e+04); choose a wider dtype (float32 or bfloat16)
    """
    cast = block.to("cpu").to(target)
    if cast.numel() and target.itemsize < 4:
        lo, hi = torch.aminmax(cast)
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            big = float(block.abs().max())
            raise CurvlensError(f"tensor {name!r}: a merged value ({big:.4g}) overflows {what} "
                                f"{str(target).replace('torch.', '')} (largest {torch.finfo(target).max:.4g}); "
                                f"choose a wider dtype (float32 or bfloat16){hint}")
    return cast
