"""The fused pass: every requested analysis of the experts from one read of each tensor.

Each analysis is a :class:`~curvlens.passes.stat.Stat`: it says which inputs it reads (base, experts,
moments, merged models) and whether it needs model-wide masks, takes every
tensor once from the pass (:meth:`Stat.tensor`; with masks, :meth:`Stat.masked`)
and turns what it gathered into its frame. :func:`run_pass` streams the union of
the inputs the requested statistics need, one tensor name at a time (reading
overlaps the math in the stream's read-ahead thread), and hands each tensor to
every statistic through a :class:`TensorContext`, which computes the shared
per-tensor sweeps (each expert's moment summary, the task-vector sums of every
pair) once, however many statistics ask for them.

Reads: one over the inputs the statistics need. Model-wide masks (``mask_stats``,
``mask_overlap``) need each expert's exact selection first: one read bracketed by
a small sample (:func:`curvlens.passes.scout.scout_selections`, when the files
allow reading a sample alone: safetensors), else two
(:func:`curvlens.passes.thresholds.model_selections`); the masks' statistics
then come from the same read as everything else. So the whole analysis is one
read without masks and two with them (plus the sample, a fraction of a percent
of the bytes). Each frame's ``attrs["reads"]`` says how many reads it took.

The single-analysis functions (:func:`curvlens.passes.analysis.curvature_stats`
and the others) are this pass with one statistic requested, so an analysis
gives the same numbers alone or fused.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import torch

from curvlens.errors import CurvlensError
from curvlens.passes.analysis_common import floating_names, need_experts, open_merged
from curvlens.passes.analyze_masks import MaskPlan
from curvlens.passes.experts import Experts
from curvlens.passes.stat import Stat, TensorContext
from curvlens.runtime import Background, background_enabled, resolve_device, threads_for, torch_threads

__all__ = ["Stat", "TensorContext", "run_pass"]


class _Run:
    """What one pass needs to know, shared by its tensor contexts."""

    def __init__(self, experts: Experts, stats: Sequence[Stat], device: torch.device):
        self.experts, self.device = experts, device
        bins = [b for b in (s.user_bins() for s in stats) if b is not None]
        if any(not torch.equal(b.edges, bins[0].edges) for b in bins[1:]):
            raise CurvlensError("one pass counts one set of log10 bins; got statistics with different bins")
        self.user_bins = bins[0] if bins else None
        self.levels = tuple(dict.fromkeys(x for s in stats for x in s.quantile_levels()))
        self.fracs = tuple(dict.fromkeys(x for s in stats for x in s.top_fracs()))
        self.merged: dict = {}
        for s in stats:
            self.merged.update(s.merged)
        pairs: list = []
        for s in stats:
            pairs += [p for p in s.tv_pairs(experts) if p not in pairs]
        self.tv_pairs = pairs
        self.tv_merged = [m for m in self.merged if any(m in p for p in pairs)]
        self._share: Background | None = None

    @property
    def share(self) -> Background:
        """The experts' per-tensor jobs (moment summaries, ranks) on both cores,
        made on first use: each use submits its jobs and takes every result
        before the next."""
        if self._share is None:
            self._share = Background(background_enabled(self.device), budget=None)
        return self._share

    def close(self) -> None:
        if self._share is not None:
            self._share.close()
            self._share = None


def run_pass(experts: Experts, stats: Sequence[Stat], names: Sequence[str] | None = None, *, device="auto",
             progress: bool = True, desc: str = "analyze", selection: str = "auto") -> dict[str, pd.DataFrame]:
    """Feed every statistic from one read of each tensor; returns ``{key: frame}``.

    Parameters
    ----------
    experts : Experts
    stats : sequence of Stat
    names : sequence of str, optional
        Tensors (default: every floating tensor).
    device, progress
        As everywhere.
    selection : {"auto", "exact", "scout"}
        How mask statistics get their model-wide selections: ``"exact"``, the
        two-read :func:`curvlens.passes.thresholds.model_selections`;
        ``"scout"``, one read bracketed by a sample
        (:func:`curvlens.passes.scout.scout_selections`); ``"auto"``, the scout
        when every input can be sampled without reading it whole and the pass
        covers every tensor. All three give the same selections.
    """
    need_experts(experts, "analyze")
    if not stats:
        raise CurvlensError("analyze: no statistic requested")
    dev = resolve_device(device)
    tensor_names = floating_names(experts, names)
    run = _Run(experts, stats, dev)
    reads = 0
    masks = None
    wanted = [(c, d) for s in stats for c, d in s.selections]
    if wanted:
        every = names is None or set(tensor_names) == set(floating_names(experts))
        masks = MaskPlan(experts, wanted, dev, progress, selection, every_tensor=every,
                         mask_bytes={k for st in stats for k in st.mask_bytes()})
        keep = {k for s in stats for k in s.kept_masks()}
        reads += masks.reads
    need_v = any(s.moments for s in stats) or (masks is not None and masks.needs_moments)
    need_b = any(s.base for s in stats) or masks is not None or bool(run.tv_pairs)
    need_x = any(s.experts for s in stats) or masks is not None or bool(run.tv_pairs)
    # the pass's thread count held until every frame is made: a statistic's
    # background work (runtime.Background) may finish after the last tensor
    try:
        with torch_threads(threads_for(dev)):
            for g in experts.iter_tensors(tensor_names, device=dev, dtype=None, moments=need_v, base=need_b,
                                          experts=need_x, progress=progress, desc=desc):
                ctx = TensorContext(g, run)
                for s in stats:
                    s.tensor(ctx)
                if masks is not None:
                    mset = masks.sweep(ctx, keep)
                    for s in stats:
                        if s.selections:
                            s.masked(ctx, mset)
                    mset.finish()
                del ctx, g
            reads += 1
            if masks is not None:
                masks.check_done()
            out = {}
            for s in stats:
                df = s.frame()
                df.attrs["reads"] = reads
                out[s.key] = df
    finally:
        run.close()
        for s in stats:
            s.close()
    return out


def merged_checkpoints(experts: Experts, merges: Mapping[str, object] | None) -> dict:
    """Merged models (Checkpoint, path, dict or MergeResult) opened and checked."""
    if merges is None:
        return {}
    if not isinstance(merges, Mapping) or not merges:
        raise CurvlensError(f"merges must be a non-empty mapping label -> merged model; got {merges!r}")
    return {str(k): open_merged(m, experts, str(k)) for k, m in merges.items()}
