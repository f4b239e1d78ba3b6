"""Passes: streaming loops over experts, one tensor name at a time.

:class:`Experts` is the stream; model-wide selections (``thresholds``), the
analyses (``analysis*``), the merge driver (``merge``), the empirical-Fisher
estimate (``fisher_estimate``) and the sparse soup (``sparse_soup``) are loops
over it. No tensor math lives here (that is ``curvlens.math``).
"""
from curvlens.passes.experts import Expert, Experts, TensorGroup

__all__ = ["Expert", "Experts", "TensorGroup"]
