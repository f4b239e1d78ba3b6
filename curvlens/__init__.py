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
                       in the moments layout), :func:`inspect` (what dirs hold, headers only),
                       :func:`preflight` (each expert's moments source and level)
merge                  :func:`merge` (:class:`WriteOptions`, :class:`TokenizerOptions`),
                       :func:`load_merge_config`, :func:`list_methods`, :func:`method_params`,
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
                       a dask cluster, :func:`local_client`), :func:`greedy_soup`, :func:`pareto_front`,
                       :func:`gram_matrices`, :func:`front_distance`
regime and findings    :func:`edit_norms`, :func:`relative_edit`, :func:`regime_table`,
                       :func:`findings` (the paper's claims, decided from the frames; one claim:
                       :func:`finding_grafting`, :func:`finding_masks`, :func:`finding_overlap`,
                       :func:`finding_merges`), :func:`findings_with_intervals` (decided only
                       where 95% intervals decide them)
tensor control         ``Experts(..., exclude=)``, :meth:`Experts.without`,
                       ``merge(..., tensors=)``, :class:`TensorFilter`
pooling                :func:`aggregate`
statistics             :func:`spearman_test` (a rank correlation's permutation p-value and
                       bootstrap interval: is a correlation over a few dozen tensors real?)
threads                :func:`set_threads` (CPU passes use 1 by default: see ``curvlens.runtime``)
drawing                ``cl.views`` (figures and explorers, imported on first use)
the demo zoo           ``cl.zoo`` (imported on first use; needs ``transformers``)
evaluators             ``cl.evaluators`` (``lm_eval(...)``: lm-evaluation-harness for sweeps; the
                       ``eval`` extra)
=====================  ==========================================================

Internals live in rooms that import only the rooms below them (``docs/architecture.md``):
``curvlens.io`` (read/write), ``curvlens.math`` (pure tensor functions),
``curvlens.passes`` (streaming loops over the experts), ``curvlens.config`` (merge
configs, parameter forms, slices, tokenizer), ``curvlens.studies`` (sweeps, soups,
fronts, findings), ``curvlens.views`` (drawing).
"""
import importlib

from curvlens.config.merge import merge
from curvlens.config.merge_config import load_merge_config
from curvlens.config.options import TokenizerOptions, WriteOptions
from curvlens.errors import CurvlensError
from curvlens.io import Checkpoint, Moments, export_moments, write_model
from curvlens.io.inspection import inspect
from curvlens.math.bootstrap import spearman_interval
from curvlens.math.fronts import front_distance
from curvlens.math.methods import list_methods, method_params
from curvlens.math.rank_stats import spearman_test
from curvlens.passes import Expert, Experts
from curvlens.passes.analyze import analyze
from curvlens.passes.analysis import (
    aggregate,
    compare_merges,
    curvature_overlap,
    curvature_stats,
    ffg_masks,
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
from curvlens.passes.fisher_estimate import estimate_fisher
from curvlens.passes.merge_result import MergeResult
from curvlens.passes.preflight import preflight
from curvlens.passes.sparse_soup import SparseSoupResult, sparse_soup, sparsity_check
from curvlens.roles import ROLES, param_role
from curvlens.runtime import set_threads
from curvlens.studies.findings import (
    finding_grafting, finding_masks, finding_merges, finding_overlap, findings, findings_with_intervals,
)
from curvlens.studies.findings_stats import gain_interval
from curvlens.studies.gain import merge_gain
from curvlens.studies.fisher_vs_adam import fisher_vs_adam
from curvlens.studies.fronts import FrontResult, gram_matrices, pareto_front
from curvlens.studies.graft import ffg_vs_magnitude_summary, graft_sweep
from curvlens.studies.prediction import (
    agreement_by_family, merge_retention, prediction_agreement, prediction_study, split_merges,
)
from curvlens.studies.regime import edit_norms, regime_table, relative_edit
from curvlens.studies.soup import SoupResult, greedy_soup
from curvlens.studies.sweep import local_client, sweep, sweep_grid
from curvlens.tensor_filter import TensorFilter

__version__ = "0.1.0"

__all__ = [
    "Checkpoint", "CurvlensError", "Expert", "Experts", "FrontResult", "MergeResult", "Moments", "ROLES",
    "SoupResult", "SparseSoupResult", "TensorFilter", "TokenizerOptions", "WriteOptions",
    "aggregate", "analyze", "compare_merges", "curvature_overlap", "curvature_stats", "edit_norms", "estimate_fisher",
    "export_moments", "ffg_masks", "ffg_vs_magnitude_summary", "finding_grafting", "finding_masks",
    "finding_merges", "finding_overlap", "findings", "fisher_vs_adam", "front_distance", "graft_sweep",
    "gram_matrices", "greedy_soup", "inspect", "interference", "list_methods", "load_merge_config", "local_client",
    "log10_histogram", "mask_overlap", "mask_stats", "mask_thresholds", "merge", "merge_retention",
    "method_params", "moment_compression", "moment_levels", "param_role", "pareto_front", "pooled_moments",
    "predicted_loss", "prediction_agreement", "prediction_study", "preflight", "regime_table", "relative_edit",
    "set_threads", "sparse_soup", "sparsity_check", "spearman_test", "sweep", "sweep_grid", "views", "write_model", "zoo",
    "agreement_by_family", "findings_with_intervals", "gain_interval", "merge_gain", "spearman_interval",
    "split_merges", "evaluators", "__version__",
]


def _merge_result_html(result: MergeResult) -> str:
    # Views sit above every other room and import matplotlib: the entry layer
    # wires them into the result's notebook display, imported on first display.
    from curvlens.views.rich import merge_result_html

    return merge_result_html(result)


MergeResult.html_renderer = _merge_result_html

# Heavy or optional: matplotlib/plotly for views, transformers for the zoo, lm-eval for evaluators.
_LAZY = ("views", "zoo", "evaluators")


def __getattr__(name: str):
    if name in _LAZY:
        return importlib.import_module(f"curvlens.{name}")
    raise AttributeError(f"module 'curvlens' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
