"""The fused pass's statistics that need no mask: curvature, edits, interference,
predicted loss. Each is a :class:`curvlens.passes.analyze.Stat`; the numbers come
from the per-tensor sweeps of :mod:`curvlens.math.moment_sweep` and
:mod:`curvlens.math.pair_sweep`, shared through the pass's context."""
from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch

from curvlens.errors import CurvlensError
from curvlens.math.blocks import tensor_seed
from curvlens.math.checks import corr, ratio
from curvlens.math.moment_sweep import user_bins
from curvlens.math.overlap import TOP_FRACS, spearman_pairs, spearman_ranks, spearman_sample
from curvlens.math.pair_sweep import overlap_sums, weighted_sq_diff
from curvlens.passes.analysis_common import (
    COMPARE_MERGES_COLUMNS, CURVATURE_OVERLAP_COLUMNS, CURVATURE_STATS_COLUMNS, EDIT_NORMS_COLUMNS,
    HISTOGRAM_VALUE_COLUMNS,
    INTERFERENCE_COLUMNS, PREDICTED_LOSS_COLUMNS, frame,
)
from curvlens.passes.stat import Stat, TensorContext
from curvlens.passes.experts import Experts

__all__ = ["CurvatureStats", "MomentLevels", "Log10Histogram", "CurvatureOverlap", "EditNorms", "Interference",
           "PredictedLoss", "CompareMerges", "histogram_edges"]

_LEVELS = (0.5, 0.01, 0.1, 0.5, 0.9, 0.99)  # the median, then q01 ... q99 (0.5 twice: as before)


def _where(err: CurvlensError, expert: str, name: str) -> CurvlensError:
    return CurvlensError(f"expert {expert!r}, tensor {name!r}: {err}")


def histogram_edges(bins) -> np.ndarray:
    """The checked log10 bin edges of :func:`log10_histogram` (default
    ``np.linspace(-30, 0, 121)``)."""
    edges = np.linspace(-30, 0, 121) if bins is None else np.asarray(bins, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or not np.all(np.diff(edges) > 0) or not np.all(np.isfinite(edges)):
        raise CurvlensError("bins must be at least two finite, strictly increasing edges; "
                            f"got {np.asarray(bins).tolist()[:8]}")
    return edges


class CurvatureStats(Stat):
    """``curvature_stats``: exact log10 summary of every moment tensor."""

    key = "curvature_stats"
    moments = True

    def __init__(self, experts: Experts):
        self.experts, self.rows = experts, []

    def tensor(self, ctx: TensorContext) -> None:
        for i, e in enumerate(self.experts.experts):
            v = ctx.g.moments[i]
            if v.numel() == 0:
                raise CurvlensError(f"expert {e.name!r}, tensor {ctx.name!r}: v is empty (shape "
                                    f"{tuple(v.shape)}); expected at least one entry")
        ctx.summarise(range(len(self.experts.experts)), order=True)
        for i, e in enumerate(self.experts.experts):
            s = ctx.moment(i)
            q = ctx.order(i)[0]
            med, *qs = (q[x] for x in _LEVELS)
            mean = s.sum_log10 / s.positive if s.positive else math.nan
            self.rows.append({"expert": e.name, **ctx.ident, "mean_log10": mean, "median_log10": med,
                              **dict(zip(["q01", "q10", "q50", "q90", "q99"], qs)),
                              "frac_zero": s.zeros / s.numel, "bias_corrected": bool(e.moments.bias_corrected),
                              "sampled": False})

    def quantile_levels(self):
        return _LEVELS

    def frame(self) -> pd.DataFrame:
        return frame(self.rows, CURVATURE_STATS_COLUMNS)


class MomentLevels(Stat):
    """``moment_levels``: each expert's mean v over the model."""

    key = "moment_levels"
    moments = True

    def __init__(self, experts: Experts):
        self.names = experts.names
        self.sums = dict.fromkeys(self.names, 0.0)
        self.counts = dict.fromkeys(self.names, 0)

    def tensor(self, ctx: TensorContext) -> None:
        ctx.summarise(range(len(self.names)))
        for i, e in enumerate(self.names):
            s = ctx.moment(i)
            self.sums[e] += s.sum_v
            self.counts[e] += s.numel

    def frame(self) -> pd.DataFrame:
        rows = [{"expert": e, "numel": self.counts[e],
                 "mean_v": self.sums[e] / self.counts[e] if self.counts[e] else math.nan} for e in self.names]
        df = pd.DataFrame(rows, columns=["expert", "numel", "mean_v"])
        df["level_ratio"] = df["mean_v"] / df["mean_v"].min()
        return df


class Log10Histogram(Stat):
    """``log10_histogram``: counts of log10 v per expert and role / layer / name."""

    key = "log10_histogram"
    moments = True

    def __init__(self, experts: Experts, edges: np.ndarray, by: str | None):
        self.names, self.edges, self.by = experts.names, edges, by
        self.bins = user_bins(edges)
        self.counts: dict[tuple, torch.Tensor] = {}

    def user_bins(self):
        return self.bins

    def tensor(self, ctx: TensorContext) -> None:
        g = ctx.g
        key = None if self.by is None else {"role": g.role, "layer": g.layer, "name": g.name}[self.by]
        ctx.summarise(range(len(self.names)))
        for i, e in enumerate(self.names):
            acc = self.counts.setdefault((e, key), torch.zeros(self.bins.n, dtype=torch.int64))
            acc += ctx.moment(i).user_counts

    def frame(self) -> pd.DataFrame:
        cols = ["expert"] + ([] if self.by is None else [self.by]) + HISTOGRAM_VALUE_COLUMNS
        parts = []
        for (e, key), c in self.counts.items():
            d = {"expert": e} if self.by is None else {"expert": e, self.by: key}
            parts.append(pd.DataFrame({**d, "bin_left": self.edges[:-1], "bin_right": self.edges[1:],
                                       "count": c.numpy()}))
        if not parts:
            return frame([], cols)
        df = pd.concat(parts, ignore_index=True)[cols]
        if self.by == "layer":
            df["layer"] = df["layer"].astype("Int64")
        return df


class CurvatureOverlap(Stat):
    """``curvature_overlap``: per tensor and pair, cosine, Pearson and Spearman of
    log v over the support, top-set Jaccard."""

    key = "curvature_overlap"
    moments = True

    def __init__(self, experts: Experts, pairs: list[tuple[str, str]], spearman_max, seed: int, log_eps: float):
        self.names, self.pairs = experts.names, pairs
        self.spearman_max, self.seed, self.log_eps = spearman_max, seed, log_eps
        self.used = [e for e in self.names if any(e in p for p in pairs)]
        self.rows = []

    def top_fracs(self):
        return TOP_FRACS

    def tensor(self, ctx: TensorContext) -> None:
        idx = {e: self.names.index(e) for e in self.used}
        ctx.summarise(list(idx.values()), order=True)
        flats, tops, vmax, positive = {}, [], [], {}
        for e in self.used:
            s = ctx.moment(idx[e])
            flats[e] = ctx.g.moments[idx[e]].reshape(-1).float()
            per = ctx.order(idx[e])[1]
            tops.append(([per[f][0] for f in TOP_FRACS], [per[f][1:] for f in TOP_FRACS]))
            vmax.append(s.vmax)
            positive[e] = s.positive
        n = ctx.ident["numel"]
        seed = tensor_seed(self.seed, ctx.name)
        sample = spearman_sample(n, self.spearman_max, seed, ctx.g.moments[0].device)
        # the Spearman ranks of the experts whose pairs surely cover every entry (one
        # of the two has no zero) on the second core, while the overlap sums run here
        share = ctx.run.share
        early = [e for e in self.used if any(e in p and (positive[p[0]] == n or positive[p[1]] == n)
                                             for p in self.pairs)]
        for e in early:
            share.submit(lambda e=e: spearman_ranks(flats[e], sample), 0)
        pos = {e: j for j, e in enumerate(self.used)}
        sums = overlap_sums([flats[e] for e in self.used], [(pos[a], pos[b]) for a, b in self.pairs],
                            self.log_eps, vmax, [t for _, t in tops])
        ranks = dict(zip(early, share.results()))
        support = {p: int(r["support"]) for p, r in zip(self.pairs, sums)}
        rho, sampled = spearman_pairs(flats, self.pairs, support, self.spearman_max, seed, ranks=ranks)
        for (a, b), r in zip(self.pairs, sums):
            ns = support[a, b]
            row = {"cosine": corr(r["sab"], r["saa"], r["sbb"])}
            if ns == 0:
                row["pearson_log"] = math.nan
            else:
                row["pearson_log"] = corr(r["lab"] - r["la"] * r["lb"] / ns, r["laa"] - r["la"] ** 2 / ns,
                                          r["lbb"] - r["lb"] ** 2 / ns)
            row["spearman_log"] = rho[a, b]
            (ka, _), (kb, _) = tops[pos[a]], tops[pos[b]]
            for fr, k_a, k_b, both in zip(TOP_FRACS, ka, kb, r["inter"]):
                union = k_a + k_b - both
                row[f"jaccard_top{round(100 * fr):d}"] = both / union if union else math.nan
            row["excluded_zero"] = n - ns
            self.rows.append({"expert_a": a, "expert_b": b, **ctx.ident, **row, "spearman_sampled": sampled})

    def frame(self) -> pd.DataFrame:
        return frame(self.rows, CURVATURE_OVERLAP_COLUMNS)


class EditNorms(Stat):
    """``edit_norms``: ``||theta_i - theta_0||^2`` and ``||theta_0||^2`` per tensor."""

    key = "edit_norms"
    base = experts = True

    def __init__(self, experts: Experts):
        self.names, self.rows = experts.names, []

    def tv_pairs(self, experts: Experts):
        return []

    def tensor(self, ctx: TensorContext) -> None:
        bsq, dsq, _ = ctx.tv()
        for e in self.names:
            self.rows.append({"expert": e, **ctx.ident, "delta_sq": dsq[e], "base_sq": bsq})

    def frame(self) -> pd.DataFrame:
        return frame(self.rows, EDIT_NORMS_COLUMNS)


class Interference(Stat):
    """``interference``: task-vector cosine, sign conflicts, curvature-weighted
    conflict per tensor and pair (a merged model's edit as one more participant)."""

    key = "interference"
    base = experts = True

    def __init__(self, experts: Experts, pairs: list[tuple[str, str]], merged: Mapping | None = None):
        self.pairs, self.merged = pairs, dict(merged or {})
        self.moments = experts.has_moments
        self.rows = []

    def tv_pairs(self, experts: Experts):
        return list(self.pairs)

    def tensor(self, ctx: TensorContext) -> None:
        n = ctx.ident["numel"]
        _, _, per = ctx.tv()
        for a, b in self.pairs:
            r = per[a, b]
            cwc = ratio(r["curv_conflict"], r["curv"]) if self.moments else math.nan
            self.rows.append({"expert_a": a, "expert_b": b, **ctx.ident, "tv_cosine": corr(r["dot"], r["na"], r["nb"]),
                              "sign_conflict": r["conflict"] / n, "curvature_weighted_conflict": cwc})

    def frame(self) -> pd.DataFrame:
        return frame(self.rows, INTERFERENCE_COLUMNS)


class PredictedLoss(Stat):
    """``predicted_loss``: ``0.5 * sum v_i (theta_merged - theta_i)**2`` per tensor."""

    key = "predicted_loss"
    moments = experts = True

    def __init__(self, experts: Experts, ckpt, label: str = "merged"):
        self.names, self.label, self.merged = experts.names, label, {label: ckpt}
        self.rows = []

    def tensor(self, ctx: TensorContext) -> None:
        m = ctx.merged(self.label)
        for e, x, v in zip(self.names, ctx.g.experts, ctx.g.moments):
            self.rows.append({"expert": e, **ctx.ident, "predicted_loss_increase": 0.5 * weighted_sq_diff(v, m, x)})

    def frame(self) -> pd.DataFrame:
        return frame(self.rows, PREDICTED_LOSS_COLUMNS)


class CompareMerges(Stat):
    """``compare_merges``: model-level predicted loss of every merge, and of the base."""

    key = "compare_merges"
    moments = experts = True

    def __init__(self, experts: Experts, ckpts: Mapping):
        self.names, self.merged = experts.names, dict(ckpts)
        self.base = experts.base is not None
        self.totals = {(k, e): 0.0 for k in self.merged for e in self.names}
        self.undo = dict.fromkeys(self.names, 0.0)

    def tensor(self, ctx: TensorContext) -> None:
        g = ctx.g
        for k in self.merged:
            m = ctx.merged(k)
            for e, x, v in zip(self.names, g.experts, g.moments):
                self.totals[k, e] += 0.5 * weighted_sq_diff(v, m, x)
        if self.base:
            for e, x, v in zip(self.names, g.experts, g.moments):
                self.undo[e] += 0.5 * weighted_sq_diff(v, g.base, x)

    def frame(self) -> pd.DataFrame:
        rows = []
        for (k, e), t in self.totals.items():
            base_loss = self.undo[e] if self.base else math.nan
            rel = t / base_loss if self.base and base_loss > 0 else math.nan
            rows.append({"method": k, "expert": e, "predicted_loss_increase": t,
                         "predicted_loss_of_base": base_loss, "relative_loss": rel})
        return frame(rows, COMPARE_MERGES_COLUMNS)
