"""Streaming analyses: what the experts' curvature, masks and edits look like.

Each function here is one or two streaming passes over the models
(:meth:`curvlens.passes.experts.Experts.iter_tensors`, reading only the inputs it
needs), does its tensor math on the analysis device (``device="auto"``: CUDA when
present) and returns a tidy pandas DataFrame, one row per tensor (x expert, x pair,
x criterion, x density), identity columns first. Only scalars go to the CPU.
:func:`aggregate` pools any of them by layer, role or the whole model. (Grafting
masks into models and scoring them is a study: :mod:`curvlens.studies.graft`.)

=========================  ======================================================
curvature                  :func:`curvature_stats`, :func:`curvature_overlap`,
                           :func:`moment_compression`, :func:`pooled_moments`,
                           :func:`log10_histogram`, :func:`moment_levels`
masks                      :func:`ffg_masks`, :func:`mask_stats`,
                           :func:`mask_overlap`, :func:`mask_thresholds`
interference               :func:`interference`, :func:`predicted_loss`,
                           :func:`compare_merges`
pooling                    :func:`aggregate`
all at once                :func:`analyze` (one pass feeds every analysis)
=========================  ======================================================

The exact column list of each frame is a constant in
:mod:`curvlens.passes.analysis_common` (``CURVATURE_OVERLAP_COLUMNS`` ...).
"""
from curvlens.passes.analysis_common import aggregate
from curvlens.passes.analyze import analyze
from curvlens.passes.analysis_curvature import (
    curvature_overlap,
    curvature_stats,
    log10_histogram,
    moment_compression,
    moment_levels,
    pooled_moments,
)
from curvlens.passes.analysis_interference import compare_merges, interference, predicted_loss
from curvlens.passes.analysis_masks import FFGMasks, ffg_masks, mask_overlap, mask_stats, mask_thresholds

__all__ = [
    "FFGMasks", "aggregate", "analyze", "compare_merges", "curvature_overlap", "curvature_stats", "ffg_masks", "moment_levels",
    "interference", "log10_histogram", "mask_overlap",
    "mask_stats", "mask_thresholds", "moment_compression", "pooled_moments", "predicted_loss",
]
