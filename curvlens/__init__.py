"""curvlens: see why a model merge works, then run it, using the experts' curvature.

Everything a notebook needs is here, flat::

    import curvlens as cl

    experts = cl.Experts.from_dirs("base", ["math", "code"])
    overlap = cl.curvature_overlap(experts)          # a tidy DataFrame
    cl.aggregate(overlap, by=("role",))              # pooled by role
    result = cl.merge(experts, "ota", "merged", ffg_density=0.3)
    cl.views.layer_role_heatmap(overlap, "spearman_log")   # drawing lives in cl.views

=====================  ==========================================================
open and line up       :class:`Checkpoint`, :class:`Moments`, :class:`Experts`,
                       :func:`export_moments`, :func:`estimate_fisher` (a data Fisher
                       in the moments layout)
merge                  :func:`merge`, :func:`load_merge_config`, :func:`list_methods`, :func:`method_params`,
                       :func:`sparse_soup` / :func:`sparsity_check` (sparse experts keep their mask)
curvature              :func:`curvature_stats`, :func:`curvature_overlap`, :func:`moment_levels`,
                       :func:`moment_compression`, :func:`pooled_moments`,
                       :func:`log10_histogram`, :func:`fisher_vs_adam`
masks                  :func:`ffg_masks`, :func:`mask_stats`, :func:`mask_overlap`,
                       :func:`mask_thresholds`, :func:`graft_sweep`,
                       :func:`ffg_vs_magnitude_summary`
interference           :func:`interference`, :func:`predicted_loss`,
                       :func:`compare_merges`, :func:`split_merges` (coherent and residual parts),
                       :func:`prediction_agreement`, :func:`agreement_by_family`, :func:`prediction_study`
scores                 :func:`merge_gain` (gain kept over the base, the one yardstick),
                       :func:`gain_interval` (with 95% intervals over items), :func:`merge_retention`,
                       :func:`spearman_interval` (a rank correlation with its p-value and 95% interval)
sweeps, soups, fronts  :func:`sweep`, :func:`sweep_grid` (many merge + evaluate jobs, serially or on
                       a dask cluster), :func:`greedy_soup`, :func:`pareto_front`, :func:`gram_matrices`
regime and findings    :func:`edit_norms`, :func:`relative_edit`, :func:`regime_table`,
                       :func:`findings`, :func:`findings_with_intervals` (the paper's claims, decided
                       from the frames only where 95% intervals decide them)
tensor control         ``Experts(..., exclude=)``, :meth:`Experts.without`,
                       ``merge(..., tensors=)``, :class:`TensorFilter`
pooling                :func:`aggregate`
threads                :func:`set_threads` (CPU passes use 1 by default: see ``curvlens.runtime``)
drawing                ``cl.views`` (figures and explorers, imported on first use)
the demo zoo           ``cl.zoo`` (imported on first use; needs ``transformers``)
=====================  ==========================================================

Internals live in layered modules: ``curvlens.io`` (read/write), ``curvlens.math``
(pure tensor functions), ``curvlens.streams`` (model-wide passes).
"""
import importlib

from curvlens.errors import CurvlensError
from curvlens.io import Checkpoint, Moments, export_moments, write_model
from curvlens.math.bootstrap import spearman_interval
from curvlens.math.methods import list_methods, method_params
from curvlens.roles import ROLES, param_role
from curvlens.runtime import set_threads
from curvlens.streams import Expert, Experts
from curvlens.streams.analysis import (
    aggregate,
    compare_merges,
    curvature_overlap,
    curvature_stats,
    ffg_masks,
    ffg_vs_magnitude_summary,
    graft_sweep,
    interference,
    log10_histogram,
    mask_overlap,
    mask_stats,
    mask_thresholds,
    moment_compression,
    moment_levels,
    pooled_moments,
    predicted_loss,
)
from curvlens.streams.fisher import estimate_fisher
from curvlens.streams.fisher_compare import fisher_vs_adam
from curvlens.streams.merge import MergeResult, merge
from curvlens.streams.sparse_soup import SparseSoupResult, sparse_soup, sparsity_check
from curvlens.streams.merge_config import load_merge_config
from curvlens.streams.findings import findings, findings_with_intervals
from curvlens.streams.findings_stats import gain_interval
from curvlens.streams.gain import merge_gain
from curvlens.streams.fronts import FrontResult, gram_matrices, pareto_front
from curvlens.streams.soup import SoupResult, greedy_soup
from curvlens.streams.sweep import sweep, sweep_grid
from curvlens.streams.prediction import (
    agreement_by_family, merge_retention, prediction_agreement, prediction_study, split_merges,
)
from curvlens.streams.regime import edit_norms, regime_table, relative_edit
from curvlens.tensor_filter import TensorFilter

__version__ = "0.1.0"

__all__ = [
    "Checkpoint", "CurvlensError", "Expert", "Experts", "FrontResult", "MergeResult", "Moments", "ROLES",
    "SoupResult", "SparseSoupResult", "TensorFilter", "gram_matrices", "greedy_soup", "pareto_front", "sweep", "sweep_grid",
    "aggregate", "compare_merges", "edit_norms", "estimate_fisher", "fisher_vs_adam", "findings", "regime_table", "relative_edit", "curvature_overlap", "curvature_stats", "export_moments",
    "ffg_masks", "ffg_vs_magnitude_summary", "graft_sweep", "interference", "list_methods", "method_params",
    "load_merge_config", "log10_histogram", "mask_overlap", "mask_stats", "mask_thresholds",
    "merge", "merge_retention", "moment_compression", "moment_levels", "param_role", "pooled_moments", "predicted_loss",
    "prediction_agreement", "prediction_study", "set_threads", "agreement_by_family", "findings_with_intervals",
    "gain_interval", "merge_gain", "spearman_interval", "split_merges", "sparse_soup", "sparsity_check", "views",
    "write_model", "zoo", "__version__",
]

# Heavy or optional: matplotlib/plotly for views, transformers for the zoo.
_LAZY = ("views", "zoo")


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"curvlens.{name}")
    raise AttributeError(f"module 'curvlens' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
