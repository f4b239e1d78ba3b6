"""Streaming analyses of FFG (and magnitude) masks, and grafting sweeps.

* :func:`ffg_masks` -- the masks themselves, one tensor at a time (for notebooks);
* :func:`mask_stats` -- kept fraction, row/column sparsity, rank of every mask;
* :func:`mask_overlap` -- Jaccard agreement of two experts' masks;

Grafting sweeps, which score masked experts, are in :mod:`curvlens.studies.graft`.

Every mask here is an exact model-wide selection of
:func:`curvlens.passes.thresholds.model_selections` (exactly the requested share
of entries, ties split by one deterministic rule), the one the merge engine uses,
on the same scores (:func:`curvlens.passes.thresholds.mask_scores`): a mask
analysed is the mask merged.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import pandas as pd
import torch

from curvlens.errors import CurvlensError
from curvlens.passes.analysis_common import (
    check_criteria,
    check_densities,
    floating_names,
    frame,
    need_base,
    need_experts,
    need_moments,
    per_expert,
    resolve_pairs,
)
from curvlens.passes.fused import run_pass
from curvlens.passes.analyze_masks import (  # noqa: F401  (the rank settings, public here as before)
    POWER_ITERS, RANK_EXACT_WORK, SKETCH_SIZE, MaskOverlap, MaskStats,
)
from curvlens.passes.experts import Experts
from curvlens.runtime import resolve_device
from curvlens.passes.thresholds import CRITERIA, THRESHOLD_COLUMNS, Selection, mask_scores, model_selections

def check_mask_inputs(experts: Experts, criteria: Sequence[str], what: str) -> None:
    need_base(experts, what)
    if "fisher" in criteria:
        need_moments(experts, f"{what} with the fisher criterion")


def mask_thresholds(experts: Experts, densities, criterion: str = "fisher", *, device="auto",
                    progress: bool = True) -> pd.DataFrame:
    """Model-wide mask selections for several densities from ONE pair of passes.

    Returns
    -------
    pandas.DataFrame
        ``expert, criterion, density, threshold, kept, total, realized_density,
        tied, ties_kept`` (see :func:`curvlens.passes.thresholds.model_thresholds`):
        one row per expert x density (expert-major). ``kept`` is exactly the
        requested share of the model's entries, whatever the ties.
    """
    (criterion,) = check_criteria([criterion])
    ds = check_densities(densities)
    check_mask_inputs(experts, [criterion], "mask thresholds")
    sel = selections_at(experts, ds, [criterion], device, progress)
    return frame([sel[criterion, e, d].row() for e in experts.names for d in ds], THRESHOLD_COLUMNS)


def selections_at(experts: Experts, ds: Sequence[float], criteria: Sequence[str], device,
                progress: bool) -> dict[tuple[str, str, float], Selection]:
    """Every expert's selection at every density and criterion, in two passes."""
    return model_selections(experts, [list(ds)] * len(experts), criteria, device=device, progress=progress)


# -------------------------------------------------------------------- ffg_masks
class FFGMasks:
    """Per-tensor boolean masks of every expert, streamed.

    Iterating yields ``(name, {expert: mask})`` one tensor at a time (masks on
    the analysis device; ``True`` = the entry of ``tau`` is kept); indexing by a
    tensor name reads only that tensor. Made by :func:`ffg_masks`.

    Attributes
    ----------
    thresholds : pandas.DataFrame
        The threshold per expert (``model_thresholds``'s columns; ``density`` and
        the counts are NaN when thresholds were given directly).
    criterion : str
    names : list of str
        The tensors iterated over.
    """

    def __init__(self, experts: Experts, table: pd.DataFrame, criterion: str, names: list[str], device,
                 progress: bool, selections: list[Selection] | None = None):
        self.experts, self.thresholds, self.criterion, self.names = experts, table, criterion, names
        self._thr = table["threshold"].astype(float).tolist()
        self._sel = selections
        self._device, self._progress = device, progress

    def _masks(self, g) -> dict[str, torch.Tensor]:
        scores = mask_scores(g, self.criterion)
        if self._sel is None:  # thresholds given directly: everything at or above
            return {e: s >= t for e, s, t in zip(self.experts.names, scores, self._thr)}
        return {e: sel.mask(g.name, s) for e, s, sel in zip(self.experts.names, scores, self._sel)}

    def __iter__(self) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        for g in self.experts.iter_tensors(self.names, device=self._device, moments=self.criterion == "fisher",
                                           progress=self._progress, desc=f"{self.criterion} masks"):
            yield g.name, self._masks(g)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.names:
            raise CurvlensError(f"no mask for tensor {name!r}; masks exist for floating tensors such as "
                                f"{self.names[:3]}")
        (g,) = self.experts.iter_tensors([name], device=self._device, moments=self.criterion == "fisher",
                                         progress=False)
        return self._masks(g)

    def __repr__(self) -> str:
        thr = ", ".join(f"{e}={t:.3g}" for e, t in zip(self.experts.names, self._thr))
        return f"FFGMasks(criterion={self.criterion!r}, tensors={len(self)}, thresholds: {thr})"


def ffg_masks(experts: Experts, density=None, threshold=None, criterion: str = "fisher",
              names: Sequence[str] | None = None, *, device="auto", progress: bool = True) -> FFGMasks:
    """FFG (or magnitude) masks of every expert, one tensor at a time.

    Parameters
    ----------
    experts : Experts
        With a base; with moments for ``fisher``.
    density : float, sequence or mapping, optional
        Model-wide density per expert (one value for all, a list, or
        ``{expert: density}``): each mask keeps exactly that share of the
        expert's entries (:func:`curvlens.passes.thresholds.model_selections`,
        two streaming passes made now; ties split in model order).
    threshold : float, sequence or mapping, optional
        Score thresholds given directly instead (no pass; every entry at or above
        is kept). Exactly one of ``density`` and ``threshold``.
    criterion : {"fisher", "magnitude"}
        ``fisher``: score ``v * tau**2``; ``magnitude``: ``|tau|`` (reads no
        moments).
    names : sequence of str, optional
        Tensors to iterate (default: every floating tensor). Thresholds are always
        model-wide.
    device, progress
        As everywhere.

    Returns
    -------
    FFGMasks
        Iterate for ``(name, {expert: bool mask})``; ``masks[name]`` for one
        tensor; ``masks.thresholds`` for the thresholds.
    """
    (criterion,) = check_criteria([criterion])
    check_mask_inputs(experts, [criterion], "ffg_masks")
    if (density is None) == (threshold is None):
        raise CurvlensError("ffg_masks needs exactly one of density= and threshold=; got "
                            + ("both" if density is not None else "neither"))
    names = floating_names(experts, names)
    dev = resolve_device(device)
    selections = None
    if density is not None:
        ds = [float(d) for d in per_expert(density, experts, "density")]
        found = model_selections(experts, ds, [criterion], device=dev, progress=progress)
        selections = [found[criterion, e, d] for e, d in zip(experts.names, ds)]
        table = frame([x.row() for x in selections], THRESHOLD_COLUMNS)
    else:
        ts = per_expert(threshold, experts, "threshold")
        for e, t in zip(experts.names, ts):
            if isinstance(t, bool) or not isinstance(t, (int, float)) or t != t:
                raise CurvlensError(f"threshold for expert {e!r} must be a number; got {t!r}")
        nan = float("nan")
        table = frame([{"expert": e, "criterion": criterion, "density": nan, "threshold": float(t), "kept": nan,
                        "total": nan, "realized_density": nan, "tied": nan, "ties_kept": nan}
                       for e, t in zip(experts.names, ts)], THRESHOLD_COLUMNS)
    return FFGMasks(experts, table, criterion, names, dev, progress, selections)


# ------------------------------------------------------------------- mask_stats
def mask_stats(experts: Experts, densities=(0.2, 0.3, 0.4), criteria=CRITERIA, names: Sequence[str] | None = None,
               *, rank_exact_max: int | None = None, sketch_size: int = SKETCH_SIZE,
               power_iters: int = POWER_ITERS, seed: int = 0, ranks: bool = True, device="auto",
               progress: bool = True) -> pd.DataFrame:
    """Structure of every mask: kept fraction, row/column sparsity, rank.

    Passes: two selection passes for all criteria and densities together
    (:func:`curvlens.passes.thresholds.model_selections`: every mask keeps
    exactly its share of the model), then one statistics pass over base,
    experts (and moments when ``fisher`` is among the criteria).

    Parameters
    ----------
    experts : Experts
        With a base; with moments for ``fisher``.
    densities : float or sequence of float
        Model-wide densities in (0, 1].
    criteria : str or sequence of {"fisher", "magnitude"}
        Mask criteria. ``magnitude`` alone reads no moments.
    names : sequence of str, optional
        Tensors to describe (default: every floating tensor; thresholds are
        always model-wide).
    rank_exact_max, sketch_size, power_iters
        Rank settings of :func:`curvlens.math.mask_structure.mask_structure`: an
        exact float64 SVD when the mask without its empty rows/columns has at most
        ``rank_exact_max`` entries (default: when its SVD work ``m * n * min(m,
        n)`` is at most 768**3 on a CPU, 8192**3 on a GPU), else a randomized range finder with ``sketch_size`` columns, which is exact
        for ranks below ``sketch_size``. Above it only a bound is known: then
        ``mask_rank`` (and ``mask_effective_rank``) are NaN and
        ``mask_rank_at_least`` holds the bound, never a sketch size shown as a
        rank (``mask_rank_at_least`` equals ``mask_rank`` wherever the rank is
        known); ``power_iters`` tightens its estimate of
        ``||mask * tau||_2`` for ``stable_rank``. The rank of every 2-D mask of
        every expert at every density is the dominant cost of this function on a
        CPU, hence the modest defaults (768**3 work, 32, 1): FFG masks are low-rank,
        and a rank of 32 or more already says "not low-rank". Raise them for a
        higher cap.
    seed : int
        Seed of the randomized sketches (per tensor, reproducible).
    ranks : bool
        False skips every singular value: ``mask_rank``, ``mask_rank_at_least``,
        ``mask_effective_rank`` and ``stable_rank`` are NaN and ``rank_method``
        is ``"skipped"`` for matrices. The ranks are about half of this
        function's time on a CPU (12 of 24 s in ``benchmarks/README.md``);
        everything else comes from the one sweep that builds the masks.
    device, progress
        As everywhere.

    Returns
    -------
    pandas.DataFrame
        One row per tensor x expert x criterion x density: ``expert, criterion,
        density, name, layer, role, numel, threshold, kept_frac, row_sparsity,
        col_sparsity, mask_rank, mask_effective_rank, stable_rank,
        saliency_kept, rank_method``. ``saliency_kept`` is the share of the
        expert's *Fisher* saliency ``v * tau**2`` the mask keeps, for both
        criteria (NaN when no moments are read). Statistics of matrices are NaN
        for 1-D tensors (``rank_method == "none"``). ``aggregate(df, by=())``
        gives each expert's realised density as the model-level ``kept_frac``.
    """
    criteria = check_criteria(criteria)
    ds = check_densities(densities)
    check_mask_inputs(experts, criteria, "mask_stats")
    stat = MaskStats(experts, criteria, ds, rank_exact_max=rank_exact_max, sketch_size=sketch_size,
                     power_iters=power_iters, seed=seed, ranks=ranks)
    return run_pass(experts, [stat], names, device=device, progress=progress, desc="mask stats")["mask_stats"]


def mask_overlap(experts: Experts, density: float, criterion: str = "fisher", pairs=None,
                 names: Sequence[str] | None = None, *, device="auto", progress: bool = True) -> pd.DataFrame:
    """Jaccard agreement of two experts' masks at one model-wide density, per tensor.

    Parameters
    ----------
    experts : Experts
        With a base; with moments for ``fisher``.
    density : float
        Model-wide density (the same for every expert), in (0, 1].
    criterion : {"fisher", "magnitude"}
    pairs : sequence of (str, str), optional
        Default all unordered pairs.
    names : sequence of str, optional
        Default every floating tensor.
    device, progress
        As everywhere.

    Returns
    -------
    pandas.DataFrame
        ``expert_a, expert_b, criterion, density, name, layer, role, numel,
        jaccard`` (1.0 when both masks keep nothing), one row per tensor x pair.
    """
    (criterion,) = check_criteria([criterion])
    (d,) = check_densities([density], "density")
    need_experts(experts, "mask_overlap")
    pairs = resolve_pairs(experts.names, pairs)
    if criterion == "fisher":
        need_moments(experts, "mask_overlap with the fisher criterion")
    stat = MaskOverlap(experts, d, criterion, pairs)
    return run_pass(experts, [stat], names, device=device, progress=progress, desc="mask overlap")["mask_overlap"]
