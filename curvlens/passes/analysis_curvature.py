"""Streaming analyses of the experts' second moments (their curvature).

* :func:`curvature_stats` -- log10 summary of every moment tensor of every expert;
* :func:`curvature_overlap` -- how similar two experts' curvature is, tensor by tensor;
* :func:`moment_levels` -- each expert's mean v over the whole model (the *level* a
  merge compares with ``normalise: none``);
* :func:`moment_compression` -- what a rank-1 / rank-r moment costs in accuracy;
* :func:`pooled_moments` -- block-pooled ``log10 v`` maps for the paper's heatmap grids;
* :func:`log10_histogram` -- histograms of ``log10 v`` per role (or layer).

All of them read only the moments (``base=False, experts=False``), except
``pooled_moments`` with ``masks_density``, which also needs the task vectors.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from curvlens.errors import CurvlensError
from curvlens.math.compress import compressed_bytes, relative_error
from curvlens.math.moment_maps import as_2d, block_means
from curvlens.passes.analysis_common import (
    CURVATURE_OVERLAP_COLUMNS,
    MOMENT_COMPRESSION_COLUMNS,
    POOLED_MOMENTS_COLUMNS,
    floating_names,
    frame,
    need_base,
    need_moments,
    resolve_pairs,
    tensor_id,
)
from curvlens.passes.fused import run_pass
from curvlens.passes.analyze_stats import (
    CurvatureOverlap, CurvatureStats, Log10Histogram, MomentLevels, histogram_edges,
)
from curvlens.passes.experts import Experts
from curvlens.runtime import resolve_device
from curvlens.passes.thresholds import compress_moments, mask_scores, model_selections

def curvature_stats(experts: Experts, names: Sequence[str] | None = None, *, device="auto",
                    progress: bool = True) -> pd.DataFrame:
    """Summary of ``log10 v`` for every moment tensor of every expert.

    Parameters
    ----------
    experts : Experts
        With moments (only the moments are read).
    names : sequence of str, optional
        Tensors to summarise (default: every floating tensor).
    device : str or torch.device
        ``"auto"``: CUDA when present.
    progress : bool
        Show a progress bar.

    Returns
    -------
    pandas.DataFrame
        One row per tensor x expert: ``expert, name, layer, role, numel,
        mean_log10, median_log10, q01, q10, q50, q90, q99, frac_zero,
        bias_corrected, sampled``. Statistics of the logs are over the positive
        entries (NaN when there are none); ``bias_corrected`` says whether the
        moments were divided by ``1 - beta2**step`` when read. The quantiles are
        exact at every size (``torch.quantile``'s linear interpolation of the
        float64 logs, bit for bit) without sorting: a 65536-bin histogram of each
        tensor locates the order statistics and a selection inside those bins
        finds them (:func:`curvlens.math.moment_sweep.log10_quantiles`), so
        ``sampled`` is always False. The mean is a float64 sum of float64 logs.
        One sweep per tensor, shared with the other analyses of
        :func:`curvlens.analyze`.
    """
    need_moments(experts, "curvature_stats")
    return run_pass(experts, [CurvatureStats(experts)], names, device=device, progress=progress,
                    desc="curvature stats")["curvature_stats"]


# ------------------------------------------------------------ curvature_overlap
def moment_levels(experts: Experts, names: Sequence[str] | None = None, *, device="auto",
                  progress: bool = True) -> pd.DataFrame:
    """Each expert's mean second moment over the model, every entry weighted equally.

    Merges that weight experts by v (``fisher``, ``ota`` with ``normalise: none``,
    the default) compare the experts' v entry by entry, so a difference of *level*
    between experts (from noise, batch size, learning rate, run length, bias
    correction) moves the merge as much as a difference of shape; this is the number
    to look at before choosing ``normalise``.

    Returns
    -------
    pandas.DataFrame
        ``expert, numel, mean_v, level_ratio`` (``mean_v`` summed in float64;
        ``level_ratio``: ``mean_v`` over the smallest expert's).
    """
    need_moments(experts, "moment_levels")
    return run_pass(experts, [MomentLevels(experts)], names, device=device, progress=progress,
                    desc="mean v")["moment_levels"]


def curvature_overlap(experts: Experts, pairs=None, names: Sequence[str] | None = None, *,
                      spearman_max: int | None = 1 << 16, seed: int = 0, log_eps: float = 1e-30,
                      device="auto", progress: bool = True) -> pd.DataFrame:
    """How similar the experts' curvature is: per tensor, for pairs of experts.

    Parameters
    ----------
    experts : Experts
        With moments (only the moments are read).
    pairs : sequence of (str, str), optional
        Expert pairs; default all unordered pairs, in expert order.
    names : sequence of str, optional
        Tensors (default: every floating tensor).
    spearman_max : int or None
        The Spearman correlation is exact (a full sort) for tensors of at most this
        many entries; above it, it is computed on a seeded uniform sample of
        ``spearman_max`` positions (with replacement, the same positions for every
        expert), which puts a standard error of about ``(1 - rho**2) /
        sqrt(spearman_max)`` on it (0.004 at the default ``2**16``), and
        ``spearman_sampled`` is True. None: always exact, i.e. a full sort of every
        tensor of every expert, which dominates the pass on a CPU (a 30M-entry
        sort takes seconds). Every other column is always exact.
    seed : int
        Seed of that sample.
    log_eps : float
        Added to ``v`` before ``log10`` (zeros stay finite).
    device : str or torch.device
        ``"auto"``: CUDA when present.
    progress : bool
        Show a progress bar.

    Returns
    -------
    pandas.DataFrame
        One row per tensor x pair: ``expert_a, expert_b, name, layer, role, numel,
        cosine, pearson_log, spearman_log, jaccard_top1, jaccard_top10,
        excluded_zero, spearman_sampled``. The metrics are those of
        :func:`curvlens.math.overlap.pair_overlaps` (cosine of ``v``, Pearson of
        ``log10(v + log_eps)``, Spearman of ``v``, Jaccard of each expert's top 1% /
        10% of its positive entries, ties broken towards the higher index).
        ``excluded_zero`` entries, exactly zero in both experts (tokens neither
        saw, parameters neither updated: most of a real model's word embeddings),
        are left out of the log, rank and top-set statistics, which would
        otherwise report the shared zeros as agreement; :func:`aggregate` weights
        those statistics by ``numel - excluded_zero``. Computed in float32
        with cascade sums (agreeing with its float64 values to ~1e-6); each
        expert's sort, logs and top-k selection are done once per tensor and
        shared by all its pairs. Pool with :func:`aggregate`.

    Notes
    -----
    Memory: besides the moments of one tensor, two float32 copies per expert
    (scaled and log) and two bool top-k masks, in buffers reused across tensors.
    """
    need_moments(experts, "curvature_overlap")
    pairs = resolve_pairs(experts.names, pairs)
    if spearman_max is not None and (isinstance(spearman_max, bool) or int(spearman_max) < 2):
        raise CurvlensError(f"spearman_max must be None or an int >= 2; got {spearman_max!r}")
    if not log_eps > 0:
        raise CurvlensError(f"log_eps must be > 0; got {log_eps!r}")
    if not pairs:
        return frame([], CURVATURE_OVERLAP_COLUMNS)
    stat = CurvatureOverlap(experts, pairs, spearman_max, seed, log_eps)
    return run_pass(experts, [stat], names, device=device, progress=progress,
                    desc="curvature overlap")["curvature_overlap"]


# ----------------------------------------------------------- moment_compression
def moment_compression(experts: Experts, rank: int = 1, names: Sequence[str] | None = None, *,
                       power: float = 0.5, device="auto", progress: bool = True) -> pd.DataFrame:
    """Error and storage of rank-1 (AdaFactor) or rank-r moments, per tensor.

    Parameters
    ----------
    experts : Experts
        With moments (only the moments are read).
    rank : int
        1: the AdaFactor row/column factorisation; r > 1: truncated SVD clipped at
        0 (:func:`curvlens.passes.thresholds.compress_moments`, as OTA uses them).
    names : sequence of str, optional
        Tensors (default: every floating tensor).
    power : float
        The OTA weight is ``v**power`` (default 0.5, the paper's).
    device, progress
        As everywhere.

    Returns
    -------
    pandas.DataFrame
        One row per tensor x expert: ``expert, name, layer, role, numel, rank,
        rel_error_v, rel_error_weights, bytes_full, bytes_compressed``, with
        ``rel_error_v = ||V - V_hat||_F / ||V||_F`` and ``rel_error_weights`` the
        same for ``V**power`` (the OTA weight each approximation induces); 0 when
        ``V`` is all zero. Tensors that are not 2-D are kept dense: ``rank`` NaN,
        errors 0, both byte counts equal.
    """
    need_moments(experts, "moment_compression")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise CurvlensError(f"rank must be an int >= 1; got {rank!r}")
    if not power > 0:
        raise CurvlensError(f"power must be > 0; got {power!r}")
    rows = []
    for g in experts.iter_tensors(floating_names(experts, names), device=device, base=False, experts=False,
                                  progress=progress, desc=f"rank-{rank} moments"):
        shape = tuple(g.moments[0].shape)
        for e, v in zip(experts.names, g.moments):
            row = {"expert": e, **tensor_id(g), "bytes_full": compressed_bytes(shape, None),
                   "bytes_compressed": compressed_bytes(shape, rank)}
            if v.ndim != 2:
                row.update(rank=math.nan, rel_error_v=0.0, rel_error_weights=0.0)
            else:
                (approx,) = compress_moments([v], rank1_approx=rank == 1, rank=None if rank == 1 else rank)
                row.update(rank=float(rank), rel_error_v=relative_error(v, approx),
                           rel_error_weights=relative_error(v.pow(power), approx.pow(power)))
                del approx
            rows.append(row)
    return frame(rows, MOMENT_COMPRESSION_COLUMNS)


# ------------------------------------------------------------- pooled_moments
def pooled_moments(experts: Experts, names: Sequence[str] | str | None, *, block: tuple[int, int] | None = None,
                   max_blocks: int = 64, masks_density: float | None = None, criterion: str = "fisher",
                   log_eps: float = 1e-30, device="auto", progress: bool = True) -> pd.DataFrame:
    """Block-pooled ``log10 v`` maps (and FFG mask density) for heatmap grids.

    A 128k x 4096 moment matrix cannot be drawn; its ``log10`` averaged over
    blocks can. This is the data of the paper's layer-by-layer grids of
    second-moment heatmaps for pairs of experts, optionally with the FFG masks.

    Parameters
    ----------
    experts : Experts
        With moments.
    names : str or sequence of str or None
        Tensors to pool (None: every floating tensor, a large frame).
    block : (int, int), optional
        Block size in rows x columns. Default: ``ceil(shape / max_blocks)``, so a
        tensor becomes at most ``max_blocks x max_blocks`` blocks.
    max_blocks : int
        See ``block``.
    masks_density : float, optional
        Also report ``mask_frac``, the fraction of entries the FFG mask at this
        model-wide density keeps in each block (the exact selection of
        :func:`curvlens.passes.thresholds.model_selections`: two extra passes
        over the whole model). Needs a base model.
    criterion : {"fisher", "magnitude"}
        Mask criterion for ``mask_frac``.
    log_eps : float
        ``log10(v + log_eps)`` keeps zeros finite.
    device, progress
        As everywhere.

    Returns
    -------
    pandas.DataFrame
        ``expert, name, layer, role, row_block, col_block, log10_v, mask_frac``:
        one row per block of each tensor x expert. Tensors with more than two
        dimensions are viewed as ``(shape[0], -1)``, 1-D ones as one row.
        ``mask_frac`` is NaN without ``masks_density``.
    """
    need_moments(experts, "pooled_moments")
    names = floating_names(experts, names)
    if block is not None:
        if len(block) != 2 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in block):
            raise CurvlensError(f"block must be two ints >= 1 (rows, columns); got {block!r}")
    if isinstance(max_blocks, bool) or not isinstance(max_blocks, int) or max_blocks < 1:
        raise CurvlensError(f"max_blocks must be an int >= 1; got {max_blocks!r}")
    if not log_eps > 0:
        raise CurvlensError(f"log_eps must be > 0; got {log_eps!r}")
    dev = resolve_device(device)
    thresholds = None
    if masks_density is not None:
        need_base(experts, "pooled_moments with masks_density")
        d = float(masks_density)
        found = model_selections(experts, d, [criterion], device=dev, progress=progress)
        thresholds = [found[criterion, e, d] for e in experts.names]
    parts = []
    for g in experts.iter_tensors(names, device=dev, base=thresholds is not None,
                                  experts=thresholds is not None, progress=progress, desc="pooled moments"):
        scores = mask_scores(g, criterion) if thresholds is not None else None
        for i, (e, v) in enumerate(zip(experts.names, g.moments)):
            v2 = as_2d(v)
            m, n = v2.shape
            bm, bn = block if block is not None else (-(-m // max_blocks), -(-n // max_blocks))
            lg = block_means(v2, bm, bn, lambda x: torch.log10(x.double() + log_eps))
            if scores is not None:
                kept = thresholds[i].mask(g.name, scores[i])
                frac = block_means(as_2d(kept), bm, bn, lambda x: x.double())
                frac = frac.reshape(-1).cpu().numpy()
            else:
                frac = np.full(lg.numel(), np.nan)
            rb, cb = np.meshgrid(np.arange(lg.shape[0]), np.arange(lg.shape[1]), indexing="ij")
            parts.append(pd.DataFrame({"expert": e, "name": g.name, "layer": g.layer, "role": g.role,
                                       "row_block": rb.reshape(-1), "col_block": cb.reshape(-1),
                                       "log10_v": lg.reshape(-1).cpu().numpy(), "mask_frac": frac}))
    if not parts:
        return frame([], POOLED_MOMENTS_COLUMNS)
    df = pd.concat(parts, ignore_index=True)[POOLED_MOMENTS_COLUMNS]
    df["layer"] = df["layer"].astype("Int64")
    return df


# ------------------------------------------------------------ log10_histogram
_BY = ("role", "layer", "name", None)


def log10_histogram(experts: Experts, bins=None, by: str | None = "role", names: Sequence[str] | None = None, *,
                    device="auto", progress: bool = True) -> pd.DataFrame:
    """Histogram of ``log10 v`` over the model, accumulated tensor by tensor.

    Parameters
    ----------
    experts : Experts
        With moments (only the moments are read).
    bins : array-like, optional
        Increasing bin edges in log10 units (default ``np.linspace(-30, 0, 121)``).
        As in ``numpy.histogram``, bins are half-open except the last, which
        includes its right edge, and values outside the edges (and zeros, whose
        log is -inf) are not counted; ``curvature_stats`` has ``frac_zero``.
    by : {"role", "layer", "name", None}
        One histogram per expert and value of this column (None: per expert).
    names : sequence of str, optional
        Tensors (default: every floating tensor).
    device, progress
        As everywhere.

    Returns
    -------
    pandas.DataFrame
        ``expert, <by>, bin_left, bin_right, count`` (``expert, bin_left,
        bin_right, count`` with ``by=None``), every bin present (counts of 0
        included), groups in model order.
    """
    need_moments(experts, "log10_histogram")
    if by not in _BY:
        raise CurvlensError(f"by={by!r} is not valid; expected one of {_BY}")
    edges = histogram_edges(bins)
    stat = Log10Histogram(experts, edges, by)
    return run_pass(experts, [stat], names, device=device, progress=progress,
                    desc="log10 histogram")["log10_histogram"]
