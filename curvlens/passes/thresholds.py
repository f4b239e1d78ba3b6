"""Model-wide mask selections: exactly ``k`` entries per expert from a target density.

FFG keeps, for each expert, the entries whose saliency ``v * tau^2`` is in the top
``density`` fraction *of the whole model*, so how dense each layer and role ends up
is an outcome, not a setting. That is the top ``k = round(density * N)`` of hundreds
of millions of scores, found here in two streaming passes with bounded memory:

1. a :class:`curvlens.math.quantile.TopKSketch` (a histogram over float bit
   patterns) finds the bin that holds the ``k``-th largest score;
2. :class:`curvlens.math.quantile.BinCounts` counts every distinct value inside
   that bin, tensor by tensor, which gives the exact ``k``-th largest score and
   how many entries of each tensor equal it.

Scores tie: on bf16 checkpoints the task vectors take few distinct values, and
exact zeros (moments or edits) tie by the million. Keeping "everything at or
above the threshold" would overshoot the density (0.44 instead of 0.3). A
selection therefore keeps every entry above the ``k``-th largest score and, of
the entries equal to it, the first ones in model order (tensors in the
reference checkpoint's order, entries in flat row-major order) until exactly
``k`` are kept: :func:`curvlens.math.topk.select_mask`, the same rule as
every per-tensor top-k. The merge engine (``ota`` with ``ffg_density``) and the
mask analyses use the same :func:`model_selections`, so a mask analysed is the
mask merged.
"""
from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from curvlens.errors import CurvlensError
from curvlens.math.blocks import block_size, blocks
from curvlens.math.compress import rank1, rank_r
from curvlens.math.quantile import ScoreSource
from curvlens.math.saliency import magnitude_scores, saliency, scores_into
from curvlens.math.topk import select_mask
from curvlens.passes.experts import Experts, TensorGroup

CRITERIA = ("fisher", "magnitude")


def compress_moments(moments, rank1_approx=False, rank=None):
    """Moments as OTA sees them: 2-D tensors optionally replaced by their rank-1
    (AdaFactor) or rank-r approximation; vectors are already O(n) and kept.

    ``rank1_approx`` and ``rank`` are one value for all experts or a list per expert.
    """
    if moments is None:
        return None
    n = len(moments)
    r1s = _per_expert(rank1_approx, n, "rank1_approx")
    ranks = _per_expert(rank, n, "rank")
    out = []
    for v, r1, r in zip(moments, r1s, ranks):
        if v.ndim != 2 or not (r1 or r):
            out.append(v)
        else:
            out.append(rank1(v) if r1 else rank_r(v, int(r)))
    return out


def mask_scores(group: TensorGroup, criterion: str = "fisher", moments=None) -> list[torch.Tensor]:
    """Per-expert scores whose top entries a mask keeps.

    ``fisher``: saliency ``v * tau^2`` (the diagonal-Fisher estimate of the loss rise
    when that entry of the edit is reverted); ``magnitude``: ``|tau|``.
    """
    taus = group.task_vectors
    if criterion == "magnitude":
        return [magnitude_scores(t) for t in taus]
    if criterion != "fisher":
        raise CurvlensError(f"criterion={criterion!r} is not valid; expected one of {CRITERIA}")
    moments = group.moments if moments is None else moments
    if moments is None:
        raise CurvlensError(f"{group.name}: the fisher criterion needs second moments")
    return [saliency(v, t) for v, t in zip(moments, taus)]


def score_chunks(group: TensorGroup, criterion: str = "fisher", *, chunk: int = 1 << 22):
    """Yield ``(i, scores)``: expert ``i``'s mask scores, ``chunk`` entries at a time.

    The same numbers as :func:`mask_scores`, computed from the stored dtypes one
    cache-sized block at a time (:mod:`curvlens.math.blocks`) into one reused fp32
    buffer: consume each chunk before asking for the next.
    """
    if criterion not in CRITERIA:
        raise CurvlensError(f"criterion={criterion!r} is not valid; expected one of {CRITERIA}")
    if group.base is None:
        raise CurvlensError(f"{group.name}: task vectors need a base model")
    if criterion == "fisher" and group.moments is None:
        raise CurvlensError(f"{group.name}: the fisher criterion needs second moments")
    fb = group.base.reshape(-1)
    n = fb.numel()
    size = block_size(fb.device)
    buf = torch.empty(min(chunk, n), dtype=torch.float32, device=fb.device)
    for i, e in enumerate(group.experts):
        fe = e.reshape(-1)
        fv = group.moments[i].reshape(-1) if criterion == "fisher" else None
        for start in range(0, n, chunk):
            out = buf[: min(n, start + chunk) - start]
            for sl in blocks(out.numel(), size):
                scores_into(out[sl], criterion, fb, fe, fv, slice(start + sl.start, start + sl.stop))
            yield i, out


def score_stream(experts: Experts, criteria: Sequence[str], *, rank1_approx: bool = False,
                 rank: int | None = None, device="auto", progress: bool = True, desc: str = "scores"):
    """Yield ``(name, criterion, expert index, scores)`` over the whole model:
    every floating tensor in reference order, each expert's scores in consecutive
    flat chunks (consume each before asking for the next: buffers are reused), or,
    when the C kernels can take the inputs, as one
    :class:`~curvlens.math.quantile.ScoreSource` per expert and tensor (the
    sketches compute and bin the scores in one sweep)."""
    names = experts.tensor_names(floating_only=True)
    # rank-1/rank-r moments need whole fp32 tensors; otherwise score block by block
    compressed = bool(rank1_approx or rank)
    with_v = "fisher" in criteria
    for g in experts.iter_tensors(names, device=device, moments=with_v,
                                  dtype=torch.float32 if compressed else None, progress=progress, desc=desc):
        for c in criteria:
            if compressed:
                # as the OTA fork (and its merge): no low-rank step for embeddings and LM heads
                r = None if g.role in ("embed", "lm_head") else rank
                v = compress_moments(g.moments, rank1_approx, r) if c == "fisher" else None
                for i, sc in enumerate(mask_scores(g, c, v)):
                    yield g.name, c, i, sc.reshape(-1)
            else:
                # on a CPU the C kernels score and bin in one sweep
                srcs = [ScoreSource.of(g.base, x, g.moments[i] if c == "fisher" else None, c)
                        for i, x in enumerate(g.experts)]
                if all(src is not None for src in srcs):
                    for i, src in enumerate(srcs):
                        yield g.name, c, i, src
                    continue
                for i, sc in score_chunks(g, c):
                    yield g.name, c, i, sc


@dataclass(frozen=True)
class Selection:
    """The top ``k`` entries of one expert's scores over the whole model.

    Kept: every entry whose score is above ``threshold``, and of the entries equal
    to it, ``ties(name)`` in each tensor (the first in flat order). Exactly ``k``
    entries in all.

    Attributes
    ----------
    expert, criterion : str
    density : float
        Requested; ``k = floor(density * total + 0.5)``.
    threshold : float
        The ``k``-th largest score (``inf`` when ``k == 0``).
    k, total : int
    tied : int
        Entries of the model whose score equals ``threshold``.
    quota : mapping or None
        Tensor name -> tied entries kept in it (absent: none); None keeps every
        tied entry (when all of them fit).
    ledger : TieLedger or None
        Instead of ``quota``: the tied entries to keep, handed out in model order
        as a pass meets each tensor and counts its tied entries (a selection made
        in one read, :mod:`curvlens.passes.scout`, knows how many ties to keep
        but not where they are). Such a selection serves one forward pass over
        every tensor.
    """

    expert: str
    criterion: str
    density: float
    threshold: float
    k: int
    total: int
    tied: int
    quota: Mapping[str, int] | None = field(default=None, repr=False)
    ledger: "TieLedger | None" = field(default=None, repr=False, compare=False)

    def ties(self, name: str) -> int | None:
        """Tied entries kept in tensor ``name`` (None: all of them)."""
        if self.ledger is not None:
            return self.ledger.taken(name)
        return None if self.quota is None else self.quota.get(name, 0)

    def mask(self, name: str, scores: torch.Tensor) -> torch.Tensor:
        """The bool mask of tensor ``name`` given its scores."""
        if self.ledger is not None and not self.ledger.seen(name):
            self.ledger.take(name, int(torch.count_nonzero(scores == self.threshold)))
        return select_mask(scores, self.threshold, self.ties(name))

    def row(self) -> dict:
        """This selection as a row of :data:`THRESHOLD_COLUMNS`."""
        ties_kept = (self.tied if self.quota is None and self.ledger is None
                     else self.ledger.total if self.ledger is not None else sum(self.quota.values()))
        return {"expert": self.expert, "criterion": self.criterion, "density": self.density,
                "threshold": self.threshold, "kept": self.k, "total": self.total,
                "realized_density": self.k / self.total if self.total else float("nan"),
                "tied": self.tied, "ties_kept": ties_kept}


@dataclass
class TieLedger:
    """``total`` tied entries to keep, handed out in model order: the first
    tensor a pass meets keeps as many of its tied entries as are left, and so on
    (the rule of :class:`Selection`'s ``quota``, decided as the pass goes)."""

    total: int
    remaining: int = -1
    given: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.remaining < 0:
            self.remaining = self.total

    def seen(self, name: str) -> bool:
        return name in self.given

    def take(self, name: str, n_equal: int) -> int:
        """Tensor ``name`` holds ``n_equal`` tied entries: how many it keeps
        (the same answer if asked again)."""
        if name not in self.given:
            q = min(int(n_equal), self.remaining)
            self.remaining -= q
            self.given[name] = q
        return self.given[name]

    def taken(self, name: str) -> int:
        if name not in self.given:
            raise CurvlensError(f"tensor {name!r}: this selection hands out its tied entries in model order; "
                                "count the tensor's entries equal to the threshold first (TieLedger.take)")
        return self.given[name]


#: Columns of a selection table (:func:`model_thresholds`).
THRESHOLD_COLUMNS = ["expert", "criterion", "density", "threshold", "kept", "total", "realized_density",
                     "tied", "ties_kept"]


def _per_expert(value, n: int, label: str) -> list:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise CurvlensError(f"{label} has {len(value)} entries but there are {n} experts")
        return list(value)
    return [value] * n


def model_selections(
    experts: Experts,
    densities: Sequence[Sequence[float]] | Sequence[float] | float,
    criteria: Sequence[str] = ("fisher",),
    *,
    rank1_approx: bool = False,
    rank: int | None = None,
    device: str | torch.device | None = "auto",
    progress: bool = True,
) -> dict[tuple[str, str, float], Selection]:
    """Exact model-wide top-k selections, two streaming passes for any number of
    experts, criteria and densities.

    Parameters
    ----------
    experts : Experts
        Needs a base (task vectors) and, for ``fisher``, moments.
    densities : float, sequence of float, or one sequence per expert
        Fractions kept, in (0, 1]: one value or list for every expert, or a list
        of lists (one per expert).
    criteria : sequence of {"fisher", "magnitude"}
    rank1_approx, rank
        Score with compressed moments (as OTA does when asked to).

    Returns
    -------
    dict
        ``(criterion, expert, density) -> Selection``.
    """
    criteria = selection_criteria(experts, criteria)
    per = _per_expert(densities, len(experts), "density")
    wanted: list[list[float]] = []
    for name, d in zip(experts.names, per):
        ds = list(d) if isinstance(d, Sequence) and not isinstance(d, str) else [d]
        out = []
        for x in ds:
            if isinstance(x, bool) or not isinstance(x, numbers.Real) or not 0.0 < float(x) <= 1.0:
                raise CurvlensError(f"density for expert {name!r} must be in (0, 1], got {x!r}")
            out.append(float(x))
        wanted.append(sorted(set(out)))
    from curvlens.math.quantile import TopKSketch, top_count

    sketches = {(c, i): TopKSketch() for c in criteria for i in range(len(experts))}
    for _, c, i, sc in score_stream(experts, criteria, rank1_approx=rank1_approx, rank=rank, device=device,
                                    progress=progress, desc="selection 1/2"):
        sketches[c, i].update(sc)
    # Which bin holds each k-th largest score; several densities may share one.
    plans = {}
    for (c, i), sk in sketches.items():
        nonzero = sk.total - sk.count_below_smallest_normal()
        for d in wanted[i]:
            k = math.floor(d * sk.total + 0.5)
            plans[c, i, d] = (k, *sk.locate(k)) if k > 0 else (k, None, 0, 0)
            if k > nonzero:
                warnings.warn(f"{c} selection of expert {experts.names[i]!r} at density {d}: only {nonzero} of "
                              f"{sk.total} entries ({nonzero / sk.total:.3f}) have a non-zero score, so "
                              f"{k - nonzero} entries scored 0 are kept by position (model order), not by "
                              "merit", stacklevel=2)
    bins = {(c, i, b): sketches[c, i].bin_counts(b) for (c, i, d), (k, b, *_) in plans.items() if b is not None}
    per_tensor: dict[tuple, list[tuple[str, torch.Tensor]]] = {key: [] for key in bins}
    if bins:
        current: dict[tuple, torch.Tensor] = {}
        last = None
        for name, c, i, sc in score_stream(experts, criteria, rank1_approx=rank1_approx, rank=rank,
                                           device=device, progress=progress, desc="selection 2/2"):
            if name != last:
                _flush(current, per_tensor, last)
                last = name
            for (bc, bi, b), counter in bins.items():
                if (bc, bi) == (c, i):
                    cnt = counter.update(sc)
                    key = (c, i, b)
                    current[key] = cnt if key not in current else current[key] + cnt
        _flush(current, per_tensor, last)
    out = {}
    for (c, i, d), (k, b, above_bin, _) in plans.items():
        total = sketches[c, i].total
        e = experts.names[i]
        if b is None:  # k == 0: keep nothing
            out[c, e, d] = Selection(e, c, d, math.inf, 0, total, 0, None)
            continue
        counter, parts = bins[c, i, b], per_tensor[c, i, b]
        totals = torch.zeros(counter.width, dtype=torch.int64)
        for _, cnt in parts:
            totals += cnt
        offset, above_in_bin = top_count(totals, k - above_bin)
        tied, ties = int(totals[offset]), k - above_bin - above_in_bin
        quota, left = {}, ties
        if ties < tied:
            for name, cnt in parts:  # model order
                take = min(int(cnt[offset]), left)
                if take:
                    quota[name] = take
                    left -= take
        out[c, e, d] = Selection(e, c, d, counter.value(offset), k, total, tied,
                                 quota if ties < tied else None)
    return out


def _flush(current: dict, per_tensor: dict, name: str | None) -> None:
    """Store one tensor's bin counts (as they stand) and start the next tensor."""
    for key, cnt in current.items():
        if bool(cnt.any()):  # a tensor with no score in the bin needs no record
            per_tensor[key].append((name, cnt.to(torch.int32)))
    current.clear()


def model_thresholds(
    experts: Experts,
    density: float | Sequence[float],
    *,
    criterion: str = "fisher",
    rank1_approx: bool = False,
    rank: int | None = None,
    device: str | torch.device | None = "auto",
    progress: bool = True,
):
    """The model-wide selection per expert as a table (two streaming passes).

    Parameters
    ----------
    experts : Experts
        Needs a base (task vectors) and, for ``fisher``, moments.
    density : float or sequence of float
        Target fraction of entries kept, model-wide, per expert (in (0, 1]).
    criterion : {"fisher", "magnitude"}
    rank1_approx, rank
        Score with compressed moments (as OTA does when asked to).

    Returns
    -------
    pandas.DataFrame
        One row per expert: ``expert, criterion, density, threshold, kept, total,
        realized_density, tied, ties_kept``. ``kept`` is exactly
        ``round(density * total)``; ``threshold`` is the ``kept``-th largest
        score; ``tied`` entries share it, of which ``ties_kept`` are kept (the
        first in model order). Masks from this table need the per-tensor tie
        quotas: use :func:`model_selections` (or the analyses) to build them.
    """
    import pandas as pd

    densities = [float(d) if isinstance(d, numbers.Real) and not isinstance(d, bool) else d
                 for d in _per_expert(density, len(experts), "density")]
    sel = model_selections(experts, densities, [criterion], rank1_approx=rank1_approx, rank=rank,
                           device=device, progress=progress)
    rows = [sel[criterion, e, d].row() for e, d in zip(experts.names, densities)]
    return pd.DataFrame(rows, columns=THRESHOLD_COLUMNS)


def selection_criteria(experts: Experts, criteria: Sequence[str]) -> list[str]:
    """The criteria of a model-wide selection, deduplicated and checked (and the
    base every selection of task-vector entries needs)."""
    if experts.base is None:
        raise CurvlensError("model-wide mask selections need a base model (task vectors)")
    criteria = list(dict.fromkeys(criteria))
    for c in criteria:
        if c not in CRITERIA:
            raise CurvlensError(f"criterion={c!r} is not valid; expected one of {CRITERIA}")
    return criteria
