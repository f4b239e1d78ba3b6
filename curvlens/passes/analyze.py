"""``analyze``: every analysis of the experts in one pass over the models.

``cl.analyze(experts)`` returns the frames of :func:`curvature_stats`,
:func:`moment_levels`, :func:`curvature_overlap`, :func:`log10_histogram`,
:func:`edit_norms`, :func:`interference`, :func:`mask_stats` and
:func:`mask_overlap` (and, given merged models, :func:`compare_merges` /
:func:`predicted_loss`), computing all of them from ONE read of each tensor
(:func:`curvlens.passes.fused.run_pass`) where calling them one by one reads
every tensor once per analysis. The numbers are the same: each of those
functions is this pass with one statistic requested.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from curvlens.errors import CurvlensError
from curvlens.runtime import use_threads
from curvlens.passes.analysis_common import (
    check_criteria, check_densities, need_base, need_experts, need_moments, resolve_pairs,
)
from curvlens.passes.analyze_masks import POWER_ITERS, SKETCH_SIZE, MaskOverlap, MaskStats
from curvlens.passes.analyze_stats import (
    CompareMerges, CurvatureOverlap, CurvatureStats, EditNorms, Interference, Log10Histogram, MomentLevels,
    PredictedLoss, histogram_edges,
)
from curvlens.passes.experts import Experts
from curvlens.passes.fused import merged_checkpoints, run_pass

__all__ = ["analyze", "ANALYSES"]

#: Every analysis :func:`analyze` can compute, in the order of its result.
ANALYSES = ("curvature_stats", "moment_levels", "curvature_overlap", "log10_histogram", "edit_norms",
            "interference", "mask_stats", "mask_overlap", "predicted_loss", "compare_merges")
_MOMENTS = {"curvature_stats", "moment_levels", "curvature_overlap", "log10_histogram", "predicted_loss",
            "compare_merges"}
_BASE = {"edit_norms", "interference", "mask_stats", "mask_overlap"}
_MERGES = {"predicted_loss", "compare_merges"}

#: What each frame's numbers are: exact, or how far from it (``frame.attrs["accuracy"]``).
ACCURACY = {
    "curvature_stats": "exact: quantiles are torch.quantile's of the float64 logs (histogram-located order "
                       "statistics), means float64 sums",
    "moment_levels": "exact (float64 sums)",
    "curvature_overlap": "exact (float64 sums) except spearman_log where spearman_sampled: a seeded sample of "
                         "spearman_max entries, standard error about (1 - rho**2) / sqrt(spearman_max)",
    "log10_histogram": "exact counts",
    "edit_norms": "exact (float64 sums)",
    "interference": "exact (float64 sums)",
    "mask_stats": "masks exact (model-wide selections); mask_rank exact where given (a full-rank mask's from "
                  "its integer Gram matrix, effective rank within 1e-12 of the SVD's; a rank-deficient one's from "
                  "the SVD), else NaN with "
                  "mask_rank_at_least a lower bound; stable_rank exact where the rank is taken exactly, else an "
                  "upper estimate (randomized block Krylov: within 0.01% when a few directions dominate; on the "
                  "noise-like masked task vectors of benchmarks/make_zoo zoos 4-19% high at the default "
                  "power_iters=1, 0.4-2% at power_iters=2)",
    "mask_overlap": "exact",
    "predicted_loss": "exact (float64 sums)",
    "compare_merges": "exact (float64 sums)",
}


def _default(experts: Experts, merges) -> list[str]:
    out = [a for a in ANALYSES if a not in _MERGES]
    if not experts.has_moments:
        out = [a for a in out if a not in _MOMENTS]
    if experts.base is None:
        out = [a for a in out if a not in _BASE]
    if merges is not None and experts.has_moments:
        out.append("compare_merges")
    return out


def analyze(experts: Experts, analyses: Sequence[str] | None = None, names: Sequence[str] | None = None, *,
            densities=(0.1, 0.3), criteria=("fisher", "magnitude"), overlap_density: float = 0.3,
            overlap_criterion: str = "fisher", pairs=None, merges: Mapping[str, object] | None = None,
            bins=None, by: str | None = "role", spearman_max: int | None = 1 << 16, seed: int = 0,
            log_eps: float = 1e-30, rank_exact_max: int | None = None, sketch_size: int = SKETCH_SIZE,
            power_iters: int = POWER_ITERS, ranks: bool = True, selection: str = "auto", device="auto",
            progress: bool = True,
            threads: int | None = None) -> dict[str, pd.DataFrame]:
    """Every requested analysis of the experts from one read of each tensor.

    Parameters
    ----------
    experts : Experts
    analyses : sequence of str, optional
        Any of :data:`ANALYSES`. Default: every one the inputs allow: the
        curvature analyses with moments, the edit, interference and mask
        analyses with a base, ``compare_merges`` when ``merges`` is given (the
        Fisher masks need moments; without them only magnitude masks are made).
        An analysis asked for by name whose inputs are missing is an error.
    names : sequence of str, optional
        Tensors (default: every floating tensor; mask selections stay model-wide).
    densities, criteria
        Of ``mask_stats`` (:func:`mask_stats`).
    overlap_density, overlap_criterion
        Of ``mask_overlap`` (:func:`mask_overlap`).
    pairs : sequence of (str, str), optional
        Expert pairs of ``curvature_overlap``, ``interference`` and
        ``mask_overlap`` (default all unordered pairs).
    merges : mapping label -> merged model, optional
        For ``compare_merges`` (all of them) and ``predicted_loss`` (needs exactly
        one).
    bins, by
        Of ``log10_histogram`` (:func:`log10_histogram`).
    spearman_max, seed, log_eps
        Of ``curvature_overlap``; ``seed`` also seeds the mask rank sketches.
    rank_exact_max, sketch_size, power_iters, ranks
        Of ``mask_stats`` (``ranks=False``: no singular values, the mask ranks
        NaN; on a CPU they run beside the pass on the second core and added
        5.4 s to its 31.9 s on benchmarks/README.md's 250M x 3 zoo).
    selection : {"auto", "exact", "scout"}
        How the masks' model-wide selections are found (all give the same):
        ``"exact"`` in two reads of the scores' inputs before the pass,
        ``"scout"`` in one read bracketed by a small sample
        (:func:`curvlens.passes.scout.scout_selections`), ``"auto"`` the scout
        where the files allow sampling them (safetensors) and ``names`` is every
        tensor.
    device, progress, threads
        As everywhere.

    Returns
    -------
    dict
        ``{analysis: DataFrame}``, each frame exactly what the single-analysis
        function returns. ``frame.attrs["reads"]`` is the number of reads of the
        inputs the pass took (1, plus the mask selections'); ``attrs["accuracy"]``
        says which numbers are exact.

    Examples
    --------
    >>> import torch, curvlens as cl
    >>> w = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    >>> ex = cl.Experts(w, [cl.Expert("a", cl.Checkpoint.open({"w": torch.tensor([1.5, 2.0, 2.0, 4.0])})),
    ...                     cl.Expert("b", cl.Checkpoint.open({"w": torch.tensor([1.0, 2.5, 3.5, 4.0])}))])
    >>> out = cl.analyze(ex, progress=False, device="cpu")
    >>> sorted(out), out["interference"]["sign_conflict"].tolist()  # entry 3: a moved -1, b +0.5
    (['edit_norms', 'interference', 'mask_overlap', 'mask_stats'], [0.25])
    """
    need_experts(experts, "analyze")
    if analyses is None:
        chosen = _default(experts, merges)
        if not experts.has_moments:
            criteria = [c for c in ([criteria] if isinstance(criteria, str) else criteria) if c != "fisher"]
            overlap_criterion = "magnitude"
    else:
        chosen = [analyses] if isinstance(analyses, str) else list(dict.fromkeys(analyses))
        unknown = [a for a in chosen if a not in ANALYSES]
        if unknown:
            raise CurvlensError(f"analyses: unknown {unknown}; expected some of {list(ANALYSES)}")
    if not chosen:
        raise CurvlensError("analyze: nothing to compute (no base and no moments?)")
    for a in chosen:
        if a in _MOMENTS:
            need_moments(experts, a)
        if a in _BASE:
            need_base(experts, a)
    stats = []
    ckpts = merged_checkpoints(experts, merges) if merges is not None else {}
    pair_list = resolve_pairs(experts.names, pairs)
    for a in chosen:
        stats.append(_stat(a, experts, ckpts, pair_list, densities=densities, criteria=criteria,
                           overlap_density=overlap_density, overlap_criterion=overlap_criterion, bins=bins, by=by,
                           spearman_max=spearman_max, seed=seed, log_eps=log_eps, rank_exact_max=rank_exact_max,
                           sketch_size=sketch_size, power_iters=power_iters, ranks=ranks))
    with use_threads(threads):
        out = run_pass(experts, stats, names, device=device, progress=progress, desc="analyze",
                       selection=selection)
    for k, df in out.items():
        df.attrs["accuracy"] = ACCURACY[k]
    return {a: out[a] for a in chosen}


def _stat(a: str, experts: Experts, ckpts: dict, pairs, *, densities, criteria, overlap_density,
          overlap_criterion, bins, by, spearman_max, seed, log_eps, rank_exact_max, sketch_size, power_iters,
          ranks):
    if a == "curvature_stats":
        return CurvatureStats(experts)
    if a == "moment_levels":
        return MomentLevels(experts)
    if a == "curvature_overlap":
        if spearman_max is not None and (isinstance(spearman_max, bool) or int(spearman_max) < 2):
            raise CurvlensError(f"spearman_max must be None or an int >= 2; got {spearman_max!r}")
        if not log_eps > 0:
            raise CurvlensError(f"log_eps must be > 0; got {log_eps!r}")
        return CurvatureOverlap(experts, pairs, spearman_max, seed, log_eps)
    if a == "log10_histogram":
        if by not in ("role", "layer", "name", None):
            raise CurvlensError(f"by={by!r} is not valid; expected one of ('role', 'layer', 'name', None)")
        return Log10Histogram(experts, histogram_edges(bins), by)
    if a == "edit_norms":
        return EditNorms(experts)
    if a == "interference":
        return Interference(experts, pairs)
    if a == "mask_stats":
        return MaskStats(experts, check_criteria(criteria), check_densities(densities),
                         rank_exact_max=rank_exact_max, sketch_size=sketch_size, power_iters=power_iters, seed=seed,
                         ranks=ranks)
    if a == "mask_overlap":
        (c,) = check_criteria([overlap_criterion])
        (d,) = check_densities([overlap_density], "overlap_density")
        return MaskOverlap(experts, d, c, pairs)
    if not ckpts:
        raise CurvlensError(f"{a} needs merged models: pass merges={{label: merged}}")
    if a == "compare_merges":
        return CompareMerges(experts, ckpts)
    if len(ckpts) != 1:
        raise CurvlensError(f"predicted_loss takes one merged model; merges has {len(ckpts)} "
                            "(compare_merges takes several)")
    (label, ckpt), = ckpts.items()
    return PredictedLoss(experts, ckpt, label)
