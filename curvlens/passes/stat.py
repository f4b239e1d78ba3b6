"""What the fused pass (:mod:`curvlens.passes.fused`) hands a statistic.

A :class:`Stat` is one analysis fed tensor by tensor; a :class:`TensorContext`
holds one tensor name's inputs and computes the sweeps several statistics share
once; a :class:`MaskSet` is one tensor's masks (filled by
:mod:`curvlens.passes.analyze_masks`). Kept apart from the pass itself so that the
statistics and the pass import them without importing each other.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pandas as pd
import torch

from curvlens.errors import CurvlensError
from curvlens.math.moment_sweep import MomentSummary, UserBins, moment_sweep, order_selections
from curvlens.math.pair_sweep import tv_sums
from curvlens.passes.analysis_common import tensor_id
from curvlens.passes.experts import Experts, TensorGroup

__all__ = ["MaskSet", "Stat", "TensorContext"]


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

    def close(self) -> None:
        """Release what the statistic holds beyond its rows (called once the pass
        ends, however it ends: after :meth:`frame`, or on an error)."""

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

    def mask_bytes(self) -> Sequence[tuple[str, float]]:
        """(criterion, density) masks whose entries this statistic reads (the
        others it needs only counted: their 0/1 masks are never written)."""
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

    def __init__(self, g: TensorGroup, run):  # run: the pass's curvlens.passes.fused._Run
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
            self._order[i] = self._ordered(i, self.moment(i))
        return self._order[i]

    def _ordered(self, i: int, s: MomentSummary) -> tuple[dict, dict]:
        levels, fracs = self.run.levels, self.run.fracs
        ks = [max(1, math.ceil(round(f * s.positive, 6))) if s.positive else 0 for f in fracs]
        qs, tops = order_selections(self.g.moments[i], s, levels, ks)
        return dict(zip(levels, qs)), {f: (k, *t) for f, k, t in zip(fracs, ks, tops)}

    def summarise(self, experts: Sequence[int], order: bool = False) -> None:
        """Make :meth:`moment` (and, with ``order``, :meth:`order`) of several
        experts at once, one job per expert on both cores
        (:class:`curvlens.runtime.Background`): the same numbers as asking one
        at a time, which the statistics then do from the cache. An expert's
        error is raised as it would be one at a time (the first expert's first)."""
        todo = [i for i in dict.fromkeys(experts) if i not in self._moment or (order and i not in self._order)]
        share = self.run.share if len(todo) > 1 else None
        if share is None or not share.enabled:
            for i in todo:
                if order:
                    self.order(i)
                else:
                    self.moment(i)
            return

        def job(i: int):
            try:
                s = self._moment[i] if i in self._moment else moment_sweep(self.g.moments[i], self.run.user_bins)
                return s, (self._ordered(i, s) if order else None), None
            except Exception as err:  # raised below in expert order, not in the order threads met them
                return None, None, err

        for i in todo:
            share.submit(lambda i=i: job(i), 0)
        for i, (s, o, err) in zip(todo, share.results()):
            if err is not None:
                raise err
            self._moment.setdefault(i, s)
            if o is not None:
                self._order.setdefault(i, o)

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
