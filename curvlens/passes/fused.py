"""The fused pass: every requested analysis of the experts from one read of each tensor.

Each analysis is a :class:`Stat`: it says which inputs it reads (base, experts,
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

import math
from collections.abc import Mapping, Sequence

import pandas as pd
import torch

from curvlens.errors import CurvlensError
from curvlens.math.moment_sweep import MomentSummary, UserBins, moment_sweep, order_selections
from curvlens.math.pair_sweep import tv_sums
from curvlens.passes.analysis_common import floating_names, need_experts, open_merged, tensor_id
from curvlens.passes.experts import Experts, TensorGroup
from curvlens.runtime import resolve_device

__all__ = ["Stat", "TensorContext", "run_pass"]


class Stat:
    """One statistic fed by the fused pass (subclasses set the class attributes).

    Attributes
    ----------
    key : str
        Its frame's name in :func:`analyze`'s result.
    moments, base, experts : bool
        Inputs it reads.
    merged : mapping of label -> Checkpoint
        Merged models it reads, tensor by tensor.
    selections : list of (criterion, density)
        Model-wide masks it needs (empty: none).
    """

    key = ""
    moments = base = experts = False
    merged: Mapping = {}
    selections: Sequence[tuple[str, float]] = ()

    def tensor(self, ctx: "TensorContext") -> None:
        """Take one tensor (called in model order, once per tensor)."""

    def masked(self, ctx: "TensorContext", masks: "MaskSet") -> None:
        """Take one tensor's masks (only when :attr:`selections` is not empty)."""

    def frame(self) -> pd.DataFrame:
        raise NotImplementedError

    # helpers for the shared sweeps a statistic may ask the context for
    def user_bins(self) -> UserBins | None:
        """Log10 bin edges this statistic wants counted in every moment sweep."""
        return None

    def tv_pairs(self, experts: Experts) -> list[tuple[str, str]]:
        """Pairs of participants (expert names or merged labels) whose task
        vectors this statistic compares."""
        return []

    def kept_masks(self) -> Sequence[tuple[str, float]]:
        """(criterion, density) masks this statistic compares across experts: kept
        for the whole tensor instead of released expert by expert."""
        return ()

    def quantile_levels(self) -> Sequence[float]:
        """Levels of ``log10 v`` quantiles this statistic reads from the context."""
        return ()

    def top_fracs(self) -> Sequence[float]:
        """Fractions of each expert's positive moments whose top sets it reads."""
        return ()


class MaskSet:
    """One tensor's masks, filled by the mask statistics' shared sweep (see
    :mod:`curvlens.passes.analyze_masks`)."""


class TensorContext:
    """One tensor name's inputs (stored dtypes, on the device) and the sweeps over
    them that several statistics share, each computed once on first request."""

    def __init__(self, g: TensorGroup, run: "_Run"):
        self.g, self.run = g, run
        self.ident = tensor_id(g)
        self._moment: dict[int, MomentSummary] = {}
        self._order: dict[int, tuple] = {}
        self._tv = None
        self._merged: dict[str, torch.Tensor] = {}

    @property
    def name(self) -> str:
        return self.g.name

    def moment(self, i: int) -> MomentSummary:
        """Expert ``i``'s :class:`~curvlens.math.moment_sweep.MomentSummary`."""
        if i not in self._moment:
            self._moment[i] = moment_sweep(self.g.moments[i], self.run.user_bins)
        return self._moment[i]

    def order(self, i: int) -> tuple[dict[float, float], dict[float, tuple[int, float, int]]]:
        """Expert ``i``'s log10 quantiles ``{level: value}`` and top sets ``{frac:
        (k, threshold, cut)}`` (``k = ceil(frac * positives)``, at least 1), for
        every level and fraction any statistic asked for, from one selection
        sweep (:func:`curvlens.math.moment_sweep.order_selections`)."""
        if i not in self._order:
            s = self.moment(i)
            levels, fracs = self.run.levels, self.run.fracs
            ks = [max(1, math.ceil(round(f * s.positive, 6))) if s.positive else 0 for f in fracs]
            qs, tops = order_selections(self.g.moments[i], s, levels, ks)
            self._order[i] = (dict(zip(levels, qs)), {f: (k, *t) for f, k, t in zip(fracs, ks, tops)})
        return self._order[i]

    def merged(self, label: str) -> torch.Tensor:
        """The merged model ``label``'s tensor, in its stored dtype."""
        if label not in self._merged:
            ckpt = self.run.merged[label]
            try:
                t = ckpt[self.g.name]
            except CurvlensError as err:
                raise CurvlensError(f"merged model {label!r}: {err}") from err
            self._merged[label] = t.to(self.run.device)
        return self._merged[label]

    def tv(self) -> tuple[float, dict[str, float], dict[tuple[str, str], dict]]:
        """``(base_sq, {expert: delta_sq}, {(a, b): pair sums})`` of
        :func:`curvlens.math.pair_sweep.tv_sums` over every pair any statistic
        asked for."""
        if self._tv is None:
            names = self.run.experts.names
            parts = names + [m for m in self.run.tv_merged]
            weights = list(self.g.experts) + [self.merged(m) for m in self.run.tv_merged]
            index = {p: i for i, p in enumerate(parts)}
            vidx = {e: i for i, e in enumerate(names)} if self.g.moments is not None else {}
            pairs = []
            for a, b in self.run.tv_pairs:
                # a merged model borrows its partner's curvature
                ma, mb = vidx.get(a), vidx.get(b)
                ma, mb = (mb if ma is None else ma), (ma if mb is None else mb)
                pairs.append((index[a], index[b], ma, mb))
            bsq, dsq, per = tv_sums(self.g.base, weights, len(names), self.g.moments, pairs)
            self._tv = bsq, dict(zip(names, dsq)), dict(zip(self.run.tv_pairs, per))
        return self._tv


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
        from curvlens.passes.analyze_masks import MaskPlan

        every = names is None or set(tensor_names) == set(floating_names(experts))
        masks = MaskPlan(experts, wanted, dev, progress, selection, every_tensor=every)
        keep = {k for s in stats for k in s.kept_masks()}
        reads += masks.reads
    need_v = any(s.moments for s in stats) or (masks is not None and masks.needs_moments)
    need_b = any(s.base for s in stats) or masks is not None or bool(run.tv_pairs)
    need_x = any(s.experts for s in stats) or masks is not None or bool(run.tv_pairs)
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
    return out


def merged_checkpoints(experts: Experts, merges: Mapping[str, object] | None) -> dict:
    """Merged models (Checkpoint, path, dict or MergeResult) opened and checked."""
    if merges is None:
        return {}
    if not isinstance(merges, Mapping) or not merges:
        raise CurvlensError(f"merges must be a non-empty mapping label -> merged model; got {merges!r}")
    return {str(k): open_merged(m, experts, str(k)) for k, m in merges.items()}
