"""Streaming task-interference analyses, and the loss a merge is predicted to cost.

* :func:`interference` -- sign conflicts and curvature-weighted conflicts between
  task vectors (and, optionally, against a merged model's edit);
* :func:`predicted_loss` -- ``0.5 * sum v_i (theta_merged - theta_i)**2`` per tensor;
* :func:`compare_merges` -- that, summed over the model, for several merges at once,
  so merge methods can be compared before any evaluation.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from curvlens.errors import CurvlensError
from curvlens.passes.analysis_common import (
    need_base,
    need_moments,
    open_merged,
    resolve_pairs,
)
from curvlens.passes.fused import merged_checkpoints, run_pass
from curvlens.passes.analyze_stats import CompareMerges, Interference, PredictedLoss
from curvlens.passes.experts import Experts


def interference(experts: Experts, merged=None, pairs=None, names: Sequence[str] | None = None, *,
                 merged_label: str = "merged", device="auto", progress: bool = True) -> pd.DataFrame:
    """Where experts pull parameters in opposite directions, per tensor x pair.

    Parameters
    ----------
    experts : Experts
        With a base. Moments, when every expert has them, give
        ``curvature_weighted_conflict`` (NaN otherwise).
    merged : Checkpoint, path, dict or MergeResult, optional
        A merged model: its edit ``theta_merged - theta0`` joins the comparison
        under the name ``merged_label``, so ``(expert, merged)`` rows show how far
        the merge overrode each expert. For such a pair both curvature factors are
        the expert's moments (the merged model has none; the question is what the
        merge costs *that* expert).
    pairs : sequence of (str, str), optional
        Default: every unordered pair of experts, then ``(expert, merged_label)``
        for each expert when ``merged`` is given.
    names : sequence of str, optional
        Default every floating tensor.
    merged_label : str
        Name of the merged model in ``expert_b``.
    device, progress
        As everywhere.

    Returns
    -------
    pandas.DataFrame
        ``expert_a, expert_b, name, layer, role, numel, tv_cosine,
        sign_conflict, curvature_weighted_conflict``
        (:func:`curvlens.math.interference.pair_interference`), one row per
        tensor x pair. Pool with :func:`aggregate`.
    """
    need_base(experts, "interference")
    participants = list(experts.names)
    ckpt = None
    if merged is not None:
        if merged_label in participants:
            raise CurvlensError(f"merged_label={merged_label!r} is also an expert name; choose another")
        ckpt = open_merged(merged, experts, merged_label)
        participants.append(merged_label)
    if pairs is None:
        pairs = resolve_pairs(experts.names, None)
        if ckpt is not None:
            pairs += [(e, merged_label) for e in experts.names]
    else:
        pairs = resolve_pairs(participants, pairs)
    merged_ckpts = {merged_label: ckpt} if ckpt is not None else {}
    stat = Interference(experts, pairs, merged_ckpts)
    return run_pass(experts, [stat], names, device=device, progress=progress, desc="interference")["interference"]


def predicted_loss(experts: Experts, merged, names: Sequence[str] | None = None, *, device="auto",
                   progress: bool = True) -> pd.DataFrame:
    """Diagonal-Fisher prediction of each expert's loss increase under a merge.

    Parameters
    ----------
    experts : Experts
        With moments (the base is not read).
    merged : Checkpoint, path, dict or MergeResult
        The merged model (``MergeResult.checkpoint`` is used).
    names : sequence of str, optional
        Default every floating tensor.
    device, progress
        As everywhere.

    Returns
    -------
    pandas.DataFrame
        ``expert, name, layer, role, numel, predicted_loss_increase`` with
        ``0.5 * sum v_i (theta_merged - theta_i)**2`` over the tensor
        (:func:`curvlens.math.interference.predicted_loss_increase`). It adds up
        over tensors: ``aggregate`` sums it.
    """
    need_moments(experts, "predicted_loss")
    stat = PredictedLoss(experts, open_merged(merged, experts))
    return run_pass(experts, [stat], names, device=device, progress=progress,
                    desc="predicted loss")["predicted_loss"]


def compare_merges(experts: Experts, merges: Mapping[str, object], names: Sequence[str] | None = None, *,
                   device="auto", progress: bool = True) -> pd.DataFrame:
    """Predicted loss increase of every expert under several merges, in one pass.

    Parameters
    ----------
    experts : Experts
        With moments.
    merges : mapping
        Label -> merged model (Checkpoint, path, dict or MergeResult).
    names : sequence of str, optional
        Default every floating tensor.
    device, progress
        As everywhere.

    Returns
    -------
    pandas.DataFrame
        ``method, expert, predicted_loss_increase, predicted_loss_of_base,
        relative_loss``: model-level sums of :func:`predicted_loss`, one row per
        merge x expert. Lower is better; the numbers compare merges of the same
        experts, before any evaluation. ``predicted_loss_of_base`` is the same
        prediction for the base model (``0.5 * sum v_i tau_i**2``: the loss of
        undoing the whole fine-tune, when the Experts have a base) and
        ``relative_loss`` their ratio: the predicted fraction of each expert's
        fine-tuning a merge gives up, in that expert's own units. Averaged over
        experts it ranks merges better than the raw sums, which one expert with
        large moments dominates (see ``docs/predicted_loss.md``). NaN without a
        base.

    Notes
    -----
    Tensors that are not part of the shared model (each task's classifier head,
    a pooler the loss never used) dominate these sums when merged like any
    tensor: leave them out with ``experts.without(...)`` (and out of the merge
    with ``merge(..., tensors=...)``).
    """
    need_moments(experts, "compare_merges")
    if not isinstance(merges, Mapping) or not merges:
        raise CurvlensError(f"merges must be a non-empty mapping label -> merged model; got {merges!r}")
    stat = CompareMerges(experts, merged_checkpoints(experts, merges))
    return run_pass(experts, [stat], names, device=device, progress=progress,
                    desc="compare merges")["compare_merges"]
