"""The fused pass's mask statistics: ``mask_stats`` and ``mask_overlap``.

Masks are the exact model-wide selections of
:func:`curvlens.passes.thresholds.model_selections` (the merge engine's): a
:class:`MaskPlan` makes them before the pass and, for every tensor of the pass,
one sweep per expert and criterion builds the masks of every density at once
(:func:`mask_sweep`: the scores, the kept counts per row and column, the Fisher
saliency kept, the 0/1 masks), which both statistics read.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch

from curvlens.errors import CurvlensError
from curvlens.math import native
from curvlens.math.blocks import tensor_seed
from curvlens.math.checks import fp32_task_vector
from curvlens.math.mask_structure import mask_structure
from curvlens.math.saliency import magnitude_scores, saliency
from curvlens.passes.analysis_common import MASK_OVERLAP_COLUMNS, MASK_STATS_COLUMNS, frame
from curvlens.passes.stat import MaskSet, Stat, TensorContext
from curvlens.passes.experts import Experts
from curvlens.passes.scout import partial_reads, scout_selections
from curvlens.passes.thresholds import Selection, model_selections
from curvlens.runtime import Background, background_enabled

__all__ = ["MaskPlan", "MaskStats", "MaskOverlap", "mask_sweep", "RANK_EXACT_WORK", "SKETCH_SIZE", "POWER_ITERS"]

#: Exact-SVD budget of mask_stats per device, in the SVD's work m * n * min(m, n):
#: every 2-D mask of every expert, criterion and density is ranked, so a CPU
#: affords less than a GPU. 768**3 is a 0.1-0.3 s float64 SVD on one CPU core
#: (768 x 768, or a 1536 x 384 FFN matrix: a thin matrix is cheap).
RANK_EXACT_WORK = {"cpu": 768 ** 3, "cuda": 8192 ** 3}
SKETCH_SIZE = 32
POWER_ITERS = 1


@dataclass
class MaskResult:
    """One expert's mask at one criterion and density, on one tensor."""

    threshold: float
    kept: int
    saliency_kept: float  # NaN without moments
    fro2: float  # sum of tau**2 over the kept entries
    rows: torch.Tensor | None  # kept entries per row (2-D views), int32
    cols: torch.Tensor | None
    mask: torch.Tensor | None  # bool, the tensor's shape (None: counted only)


def _view(shape: torch.Size) -> tuple[int, int]:
    n = shape.numel()
    if len(shape) < 2 or n == 0:
        return 1, n
    return shape[0], n // shape[0]


def _quota(sel: Selection, name: str) -> int:
    """Tied entries this tensor may keep: its quota, -1 for all, or (a ledger
    selection) every tie still left, of which it keeps those it has."""
    if sel.ledger is not None:
        return sel.ledger.remaining if not sel.ledger.seen(name) else sel.ledger.taken(name)
    q = sel.ties(name)
    return -1 if q is None else q


def mask_sweep(base: torch.Tensor, expert: torch.Tensor, v: torch.Tensor | None, criterion: str,
               selections: Sequence[Selection], name: str, keep_masks: bool = True) -> tuple[list[MaskResult], float]:
    """Every selection's mask of one expert's tensor from one sweep of its scores.

    Returns the masks and the tensor's total Fisher saliency (NaN without ``v``);
    ``keep_masks=False`` counts them without writing the 0/1 masks (``mask`` None).
    The scores are those of :func:`curvlens.passes.thresholds.mask_scores`, bit
    for bit, and each mask is :meth:`Selection.mask`'s.
    """
    if len(selections) > 8:  # the C sweep takes 8 thresholds at a time
        first, total = mask_sweep(base, expert, v, criterion, selections[:8], name, keep_masks)
        rest, _ = mask_sweep(base, expert, v, criterion, selections[8:], name, keep_masks)
        return first + rest, total
    shape = expert.shape
    rows, cols = _view(shape)
    nd = len(selections)
    two_d = len(shape) >= 2
    if v is not None and v.dtype != torch.float32:
        v = v.float()
    if native.available(base.contiguous(), expert.contiguous(), *([v.contiguous()] if v is not None else [])):
        b, x = base.contiguous(), expert.contiguous()
        vv = v.contiguous() if v is not None else None
        thr = torch.tensor([s.threshold for s in selections], dtype=torch.float32)
        quota = torch.tensor([_quota(s, name) for s in selections], dtype=torch.int64)
        out = torch.zeros(4 * nd, dtype=torch.float64)
        rowk = torch.zeros(nd * rows, dtype=torch.int32) if two_d else None
        colk = torch.zeros(nd * cols, dtype=torch.int32) if two_d else None
        mask = torch.empty(nd * rows * cols, dtype=torch.uint8) if keep_masks else None
        total = torch.zeros(1, dtype=torch.float64)
        native.lib().cl_mask_sweep(b.data_ptr(), native.dtype_code(b), x.data_ptr(), native.dtype_code(x),
                                   vv.data_ptr() if vv is not None else None, int(criterion == "magnitude"),
                                   rows, cols, nd, thr.data_ptr(), quota.data_ptr(), out.data_ptr(),
                                   native.ptr(rowk), native.ptr(colk), native.ptr(mask), total.data_ptr())
        o = out.reshape(nd, 4).tolist()
        for sel, od in zip(selections, o):
            if sel.ledger is not None:  # it kept the first min(tied here, left) ties: record that
                sel.ledger.take(name, int(od[2]))
        res = []
        for d in range(nd):
            if selections[d].ledger is None and o[d][2] < quota[d] and quota[d] >= 0:
                raise CurvlensError(f"tensor {name!r}: {int(quota[d])} tied entries to keep but only "
                                    f"{int(o[d][2])} equal the threshold; were the scores computed differently?")
            res.append(MaskResult(selections[d].threshold, int(o[d][0]), o[d][1] if v is not None else math.nan, o[d][3],
                                  rowk[d * rows:(d + 1) * rows] if two_d else None,
                                  colk[d * cols:(d + 1) * cols] if two_d else None,
                                  None if mask is None else
                                  mask[d * rows * cols:(d + 1) * rows * cols].view(torch.bool).reshape(shape)))
        return res, float(total) if v is not None else math.nan
    tau = expert.float() - base.float()
    sal = saliency(v.float(), tau) if v is not None else None
    scores = magnitude_scores(tau) if criterion == "magnitude" else sal
    res = []
    for s in selections:
        m = s.mask(name, scores)
        kept = int(torch.count_nonzero(m))
        sk = float((sal.double() * m).sum()) if sal is not None else math.nan
        m2 = m.reshape(rows, cols)
        res.append(MaskResult(s.threshold, kept, sk, float((tau.double() ** 2 * m).sum()), m2.sum(1, dtype=torch.int32).cpu() if two_d else None,
                              m2.sum(0, dtype=torch.int32).cpu() if two_d else None, m))
    return res, float(sal.double().sum()) if sal is not None else math.nan


class MaskPlan:
    """The selections a pass's mask statistics need, made before the pass, and
    the per-tensor sweep that builds every mask from them."""

    def __init__(self, experts: Experts, wanted: Sequence[tuple[str, float]], device, progress: bool,
                 selection: str = "auto", every_tensor: bool = True, mask_bytes: set | None = None):
        if experts.base is None:
            raise CurvlensError("mask statistics need a base model (task vectors); the Experts have none")
        self.experts = experts
        self.mask_bytes = set(wanted) if mask_bytes is None else set(mask_bytes)
        self.criteria = list(dict.fromkeys(c for c, _ in wanted))
        self.densities = {c: sorted({d for cc, d in wanted if cc == c}) for c in self.criteria}
        self.needs_moments = "fisher" in self.criteria
        if self.needs_moments and not experts.has_moments:
            lacking = [e.name for e in experts.experts if e.moments is None]
            raise CurvlensError(f"fisher masks need second moments; expert(s) {lacking} have none")
        ds = sorted({d for _, d in wanted})
        if selection not in ("auto", "exact", "scout"):
            raise CurvlensError(f"selection={selection!r} is not valid; expected 'auto', 'exact' or 'scout'")
        if selection == "auto":
            # one read instead of two where the sample costs what it reads
            selection = "scout" if every_tensor and partial_reads(experts, self.needs_moments) else "exact"
        elif selection == "scout" and not every_tensor:
            # a scout selection hands its ties out as a pass over every tensor meets them
            selection = "exact"
        if selection == "exact":
            self.found = model_selections(experts, [ds] * len(experts), self.criteria, device=device,
                                          progress=progress)
            self.reads = 2
        else:
            self.found, self.reads = scout_selections(experts, [ds] * len(experts), self.criteria,
                                                      device=device, progress=progress)
        self.selection = selection

    def check_done(self) -> None:
        """After the pass: every ledger selection handed out exactly its ties."""
        for key, sel in self.found.items():
            if sel.ledger is not None and sel.ledger.remaining:
                raise CurvlensError(f"{key}: {sel.ledger.remaining} tied entries were left unassigned; "
                                    "the pass did not see the scores the selection counted")

    def selection(self, c: str, e: str, d: float) -> Selection:
        return self.found[c, e, d]

    def sweep(self, ctx: TensorContext, keep: set | None = None) -> "Masks":
        """This tensor's masks, built on demand (see :class:`Masks`)."""
        return Masks(self, ctx.g, keep or set())


class Masks(MaskSet):
    """One tensor's masks, built on demand one expert and criterion at a time
    (one :func:`mask_sweep` makes every density of it) and released by the
    statistic done with them, so a 128k-vocab embedding never holds every mask
    at once: ``get(c, e, d)`` is a :class:`MaskResult`; masks listed in ``keep``
    (those another statistic compares across experts) stay until the tensor is
    done."""

    def __init__(self, plan: MaskPlan, group, keep: set):
        self.plan, self.group, self.keep = plan, group, keep
        self.results: dict[tuple[str, str, float], MaskResult] = {}
        self.total: dict[str, float] = {}
        self.swept: set = set()

    def _sweep(self, c: str, e: str) -> None:
        g, plan = self.group, self.plan
        i = plan.experts.names.index(e)
        v = g.moments[i] if g.moments is not None else None
        try:
            res, total = mask_sweep(g.base, g.experts[i], v, c, [plan.found[c, e, d] for d in plan.densities[c]],
                                    g.name, any((c, d) in plan.mask_bytes for d in plan.densities[c]))
        except CurvlensError as err:
            raise CurvlensError(f"expert {e!r}, {c} masks: {err}") from err
        self.total[e] = total
        self.swept.add((c, e))
        for d, r in zip(plan.densities[c], res):
            self.results[c, e, d] = r

    def get(self, c: str, e: str, d: float) -> MaskResult:
        if (c, e, d) not in self.results:
            self._sweep(c, e)
        return self.results[c, e, d]

    def saliency_total(self, e: str) -> float:
        """Expert ``e``'s Fisher saliency over the tensor (NaN without moments)."""
        if e not in self.total:
            self._sweep(self.plan.criteria[0], e)
        return self.total[e]

    def release(self, c: str, e: str) -> None:
        """Drop expert ``e``'s ``c`` masks, except those kept for another statistic."""
        for d in self.plan.densities[c]:
            if (c, d) not in self.keep:
                self.results.pop((c, e, d), None)

    def finish(self) -> None:
        """Sweep whatever no statistic asked for: every selection must meet every
        tensor, in order (a one-read selection hands out its ties that way)."""
        for c in self.plan.criteria:
            for e in self.plan.experts.names:
                if (c, e) not in self.swept:
                    self._sweep(c, e)
                    self.release(c, e)
        self.results.clear()

    def task_vector(self, i: int) -> torch.Tensor:
        """Expert ``i``'s fp32 task vector (made when asked; not kept)."""
        return fp32_task_vector(self.group.experts[i], self.group.base)


def _counts_only(r: MaskResult, tau: torch.Tensor) -> dict:
    """The statistics of :func:`mask_structure` that need no singular value, from
    the sweep's counts (``ranks=False``): the rank columns NaN, ``rank_method``
    ``"skipped"`` (``"none"`` for vectors, as always)."""
    nan = math.nan
    out = {"kept_frac": r.kept / max(1, tau.numel()), "row_sparsity": nan, "col_sparsity": nan, "mask_rank": nan,
           "mask_effective_rank": nan, "stable_rank": nan, "rank_method": "none", "rank_cap": nan,
           "rank_capped": False}
    if r.rows is not None and tau.dim() >= 2:
        out.update(row_sparsity=float((r.rows == 0).double().mean()), col_sparsity=float((r.cols == 0).double().mean()),
                   rank_method="skipped")
    return out


def _short_side(t: torch.Tensor) -> int:
    """The smaller side of the 2-D view a rank is taken of (rows x the rest)."""
    if t.dim() < 2 or t.numel() == 0:
        return 1
    return max(1, min(t.shape[0], t.numel() // t.shape[0]))


class MaskStats(Stat):
    """``mask_stats``: kept fraction, row/column sparsity, rank of every mask."""

    key = "mask_stats"

    def __init__(self, experts: Experts, criteria: list[str], densities: list[float], *, rank_exact_max=None,
                 sketch_size: int = SKETCH_SIZE, power_iters: int = POWER_ITERS, seed: int = 0, ranks: bool = True):
        self.experts, self.criteria, self.densities, self.ranks = experts, criteria, densities, bool(ranks)
        self.selections = [(c, d) for c in criteria for d in densities]
        self.rank_exact_max, self.sketch_size, self.power_iters, self.seed = (rank_exact_max, sketch_size,
                                                                              power_iters, seed)
        self.rows: list = []  # dicts; with ranks, each job's row heads until the background answers
        self.background: Background | None = None
        if self.ranks:
            # the exact ranks' eigen-solves are scipy's: loaded before the pass
            # starts, so the pass holds its BLAS threads too (runtime.blas_threads)
            import scipy.linalg  # noqa: F401

    def mask_bytes(self):
        return self.selections if self.ranks else ()  # the singular values read the masks

    def masked(self, ctx: TensorContext, masks: Masks) -> None:
        ident = ctx.ident
        dev = ctx.g.base.device
        if self.ranks and self.background is None:
            self.background = Background(background_enabled(dev))
        work = RANK_EXACT_WORK.get(dev.type, RANK_EXACT_WORK["cpu"])
        for i, e in enumerate(self.experts.names):
            if self.ranks:  # the job's inputs: an fp32 task vector and a byte per entry per mask
                self.background.wait_room(ctx.g.experts[i].numel() * (4 + len(self.selections)))
            # the fp32 task vector feeds the stable rank only: not made without ranks
            tau = masks.task_vector(i) if self.ranks else ctx.g.experts[i]
            total = masks.saliency_total(e)
            heads, results = [], []
            for c in self.criteria:
                for d in self.densities:
                    r = masks.get(c, e, d)
                    heads.append(({"expert": e, "criterion": c, "density": d, **ident, "threshold": r.threshold},
                                  r.saliency_kept / total if total > 0 else math.nan))
                    results.append(r)
                masks.release(c, e)
            if not self.ranks:
                self.rows += [_row(h, sk, _counts_only(r, tau)) for (h, sk), r in zip(heads, results)]
            else:
                # the singular values go to the second thread (their inputs are
                # this expert's fresh masks and task vector, nothing the pass reuses)
                exact = self.rank_exact_max if self.rank_exact_max is not None else work // _short_side(tau)
                opts = dict(rank_exact_max=exact, rng=tensor_seed(self.seed, ctx.name), sketch_size=self.sketch_size,
                            power_iters=self.power_iters)
                # + one mask's index of kept entries at a time (6 bytes each, 8 per row)
                nbytes = (tau.numel() * tau.element_size() + sum(r.mask.numel() for r in results)
                          + 6 * max(r.kept for r in results) + 8 * (tau.shape[0] + 1 if tau.dim() else 1))
                self.background.submit(lambda e=e, name=ctx.name, tau=tau, results=results, opts=opts:
                                       _structures(e, name, tau, results, opts), nbytes)
                self.rows.append(heads)
            del tau

    def frame(self) -> pd.DataFrame:
        if self.background is not None:  # with ranks every item is one job's row heads
            self.rows = [_row(h, sk, st) for heads, sts in zip(self.rows, self.background.results())
                         for (h, sk), st in zip(heads, sts)]
        df = frame(self.rows, MASK_STATS_COLUMNS)
        order = {e: i for i, e in enumerate(self.experts.names)}
        # rows grouped expert-major as the other frames (the pass is tensor-major)
        return (df.assign(_e=df["expert"].map(order), _c=df["criterion"].map(self.criteria.index))
                  .sort_values(["_e", "_c", "density"], kind="stable").drop(columns=["_e", "_c"])
                  .reset_index(drop=True))

    def close(self) -> None:
        if self.background is not None:
            self.background.close()


def _structures(expert: str, name: str, tau: torch.Tensor, results: list[MaskResult], opts: dict) -> list[dict]:
    """:func:`mask_structure` of one expert's masks of one tensor (a background job)."""
    try:
        return [mask_structure(r.mask, tau=tau, n_kept=r.kept, row_counts=r.rows, col_counts=r.cols, fro2=r.fro2,
                               **opts) for r in results]
    except CurvlensError as err:
        raise CurvlensError(f"expert {expert!r}, tensor {name!r}: {err}") from err


def _row(head: dict, saliency_kept: float, st: dict) -> dict:
    """One ``mask_stats`` row from its identity, saliency kept and structure."""
    st = dict(st, saliency_kept=saliency_kept)
    st["mask_rank_at_least"] = st["rank_cap"] if st["rank_capped"] else st["mask_rank"]
    if st["rank_capped"]:
        st["mask_rank"] = math.nan
    return {**head, **{k: st[k] for k in MASK_STATS_COLUMNS[8:]}}


class MaskOverlap(Stat):
    """``mask_overlap``: Jaccard agreement of two experts' masks per tensor."""

    key = "mask_overlap"

    def __init__(self, experts: Experts, density: float, criterion: str, pairs: list[tuple[str, str]]):
        self.density, self.criterion, self.pairs = density, criterion, pairs
        self.selections = [(criterion, density)]
        self.rows = []

    def kept_masks(self):
        return self.selections

    def mask_bytes(self):
        return self.selections

    def masked(self, ctx: TensorContext, masks: Masks) -> None:
        c, d = self.criterion, self.density
        for a, b in self.pairs:
            ra, rb = masks.get(c, a, d), masks.get(c, b, d)
            both = _and_count(ra.mask, rb.mask)
            union = ra.kept + rb.kept - both
            self.rows.append({"expert_a": a, "expert_b": b, "criterion": c, "density": d, **ctx.ident,
                              "jaccard": 1.0 if union == 0 else both / union})

    def frame(self) -> pd.DataFrame:
        return frame(self.rows, MASK_OVERLAP_COLUMNS)


def _and_count(a: torch.Tensor, b: torch.Tensor) -> int:
    fa, fb = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    if native.lib() is not None and fa.device.type == "cpu" and fa.is_contiguous() and fb.is_contiguous():
        return int(native.lib().cl_and_count(fa.data_ptr(), fb.data_ptr(), fa.numel()))
    return int(torch.count_nonzero(a & b))
