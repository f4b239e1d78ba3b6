"""How well does the curvature prediction rank merges? Predicted against measured.

:func:`curvlens.passes.analysis_interference.compare_merges` predicts, from the
experts' second moments alone, how much loss each expert suffers under each
merge. :func:`split_merges` splits that diagonal prediction into the part along
each expert's own edit (which adds up in a unit's pre-activation) and the rest
(which, like the unbiased noise of DARE or DELLA, largely cancels there:
:mod:`curvlens.math.coherent`). :func:`prediction_agreement` sets either against
measured scores: the rank correlation, over merges, between each predictor and
the measured gain kept (the share of the experts' summed gain over the base a
merge keeps, :mod:`curvlens.studies.gain`; mean retention where the table has
no base), with its p-value and a 95% interval. It is what says whether the
prediction can pick merges before anything is evaluated (``docs/predicted_loss.md``
says where it cannot).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from curvlens.arguments import frame_arg
from curvlens.errors import CurvlensError, check_choice
from curvlens.math.bootstrap import N_RESAMPLES, interval, rank_corr_rows, resample_indices, spearman_interval
from curvlens.math.coherent import coherent_split
from curvlens.passes.analysis_common import floating_names, need_base, need_moments, open_merged, read_merged
from curvlens.passes.analysis_interference import compare_merges
from curvlens.passes.experts import Experts
from curvlens.runtime import resolve_device
from curvlens.studies.findings_stats import merge_statistics
from curvlens.studies.gain import own_scores
from curvlens.studies.item_bootstrap import ItemBootstrap

#: The predictors compared, each pooled over experts to one number per merge
#: (lower = predicted better): the summed diagonal loss increase and the mean
#: over experts of the fraction of each fine-tune given up (:func:`compare_merges`),
#: and the same two for the coherent part alone and for the coherent part plus
#: the residual divided by each row's length (:func:`split_merges`).
PREDICTORS = {"predicted_loss_increase": "sum", "relative_loss": "mean",
              "coherent_loss": "sum", "relative_coherent_loss": "mean",
              "relative_coherent_plus_unit": "mean"}
SPLIT_COLUMNS = ["method", "expert", "predicted_loss_increase", "coherent_loss", "residual_loss",
                 "residual_per_unit", "predicted_loss_of_base", "relative_loss", "relative_coherent_loss",
                 "relative_coherent_plus_unit"]
AGREEMENT_COLUMNS = ["predictor", "measure", "n_merges", "spearman", "p_value", "low", "high"]


def merge_retention(scores: pd.DataFrame, capabilities: Mapping[str, str],
                    expert_label: str = "expert: {}") -> pd.DataFrame:
    """Measured retention of every model in a merge table.

    Parameters
    ----------
    scores : pandas.DataFrame
        ``model, capability, accuracy`` rows (``Zoo.score``'s table), holding each
        expert's own row under ``expert_label.format(name)``.
    capabilities : mapping
        Expert name -> the capability it was fine-tuned on.

    Returns
    -------
    pandas.DataFrame
        ``model, capability, accuracy, expert_accuracy, retention`` per model and
        capability, plus one ``capability == "mean"`` row per model.

    Examples
    --------
    >>> t = pd.DataFrame({"model": ["expert: a", "expert: b", "m", "m"], "capability": ["x", "y", "x", "y"],
    ...                   "accuracy": [0.8, 0.5, 0.4, 0.5]})
    >>> merge_retention(t, {"a": "x", "b": "y"}).query("model == 'm'")["retention"].tolist()
    [0.5, 1.0, 0.75]
    """
    if frame_arg("scores", scores, ["model", "capability", "accuracy"]) is None:
        raise CurvlensError("scores is empty; expected model, capability, accuracy rows")
    if not isinstance(capabilities, Mapping):
        raise CurvlensError(f"capabilities must be a mapping expert -> capability; got {capabilities!r}")
    own = own_scores(scores, capabilities, expert_label)
    t = scores[scores["capability"].isin(own)][["model", "capability", "accuracy"]].copy()
    t["expert_accuracy"] = t["capability"].map(own)
    t["retention"] = t["accuracy"] / t["expert_accuracy"]
    mean = t.groupby("model", sort=False)[["accuracy", "expert_accuracy", "retention"]].mean().reset_index()
    mean.insert(1, "capability", "mean")
    return pd.concat([t, mean], ignore_index=True)


def split_merges(experts: Experts, merges: Mapping[str, object], names: Sequence[str] | None = None, *,
                 device="auto", progress: bool = True) -> pd.DataFrame:
    """The diagonal predicted loss of every merge and expert, split row by row into
    its coherent and residual parts (:func:`curvlens.math.coherent.coherent_split`),
    in one streaming pass.

    Returns
    -------
    pandas.DataFrame
        :data:`SPLIT_COLUMNS`, one row per merge x expert: ``predicted_loss_increase``
        (= ``coherent_loss + residual_loss``, what :func:`compare_merges` gives),
        ``residual_per_unit`` (each row's residual over its length),
        ``predicted_loss_of_base`` and the relative forms (each over the loss of
        the base: ``relative_loss``, ``relative_coherent_loss``,
        ``relative_coherent_plus_unit`` = coherent + residual per unit).
    """
    need_moments(experts, "split_merges")
    need_base(experts, "split_merges")
    if not isinstance(merges, Mapping) or not merges:
        raise CurvlensError(f"merges must be a non-empty mapping label -> merged model; got {merges!r}")
    ckpts = {str(k): open_merged(m, experts, str(k)) for k, m in merges.items()}
    dev = resolve_device(device)
    parts = ("coherent", "residual", "residual_per_unit")
    totals = {(k, e): dict.fromkeys(parts, 0.0) for k in ckpts for e in experts.names}
    undo = dict.fromkeys(experts.names, 0.0)
    for g in experts.iter_tensors(floating_names(experts, names), device=dev, progress=progress,
                                  desc="split merges"):
        for e, x, v in zip(experts.names, g.experts, g.moments):
            undo[e] += coherent_split(v, g.base, x, g.base)["coherent"]
        for k, ckpt in ckpts.items():
            m = read_merged(ckpt, g.name, dev, k)
            for e, x, v in zip(experts.names, g.experts, g.moments):
                for p, val in coherent_split(v, m, x, g.base).items():
                    totals[k, e][p] += val
            del m
    rows = []
    for (k, e), t in totals.items():
        base = undo[e]
        rel = (lambda x: x / base) if base > 0 else (lambda x: np.nan)  # noqa: E731
        rows.append({"method": k, "expert": e, "predicted_loss_increase": t["coherent"] + t["residual"],
                     "coherent_loss": t["coherent"], "residual_loss": t["residual"],
                     "residual_per_unit": t["residual_per_unit"], "predicted_loss_of_base": base,
                     "relative_loss": rel(t["coherent"] + t["residual"]),
                     "relative_coherent_loss": rel(t["coherent"]),
                     "relative_coherent_plus_unit": rel(t["coherent"] + t["residual_per_unit"])})
    return pd.DataFrame(rows, columns=SPLIT_COLUMNS)


def measured_quality(scores: pd.DataFrame, capabilities: Mapping[str, str], models: Sequence[str], *,
                     measure: str = "auto", expert_label: str = "expert: {}", boot: ItemBootstrap | None = None
                     ) -> tuple[str, dict[str, np.ndarray]]:
    """Each model's measured quality, resampled over evaluation items: ``(measure,
    {model: array})`` with row 0 the observed value.

    ``measure``: ``"gain"`` (pooled gain kept over the base; needs the base's
    rows), ``"retention"`` (mean retention), ``"auto"`` (gain where the table has
    the base, else retention).
    """
    check_choice("measure", measure, ("auto", "gain", "retention"))
    has_base = bool((scores["model"] == "base").any())
    if measure == "auto":
        measure = "gain" if has_base else "retention"
    if measure == "gain" and not has_base:
        raise CurvlensError("prediction_agreement: measure='gain' needs the base's rows in scores")
    boot = boot or ItemBootstrap()
    if measure == "gain":
        stats = merge_statistics(scores, capabilities, list(models), boot, expert_label)
        seeds = [k for k in stats if k != "left_out"]
        if len(seeds) != 1:
            raise CurvlensError(f"prediction_agreement: the scores hold {len(seeds)} seeds with base and expert "
                                "rows; expected one (give one seed's merge table)")
        per = stats[seeds[0]]
        return measure, {m: np.asarray(per[m]["pooled_gain"], dtype=float) for m in models if m in per}
    s = boot.scores(scores, ("model",))
    own = {c: s.get((expert_label.format(e), c)) for e, c in capabilities.items()}
    out = {}
    for m in models:
        if all((m, c) in s and own[c] is not None for c in own):
            with np.errstate(invalid="ignore", divide="ignore"):
                out[m] = np.mean([s[m, c] / np.where(own[c] > 0, own[c], np.nan) for c in own], axis=0)
    return measure, out


def prediction_agreement(predicted: pd.DataFrame, scores: pd.DataFrame, capabilities: Mapping[str, str],
                         expert_label: str = "expert: {}", *, measure: str = "auto",
                         n_resamples: int = N_RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """Spearman correlation between predicted and measured merge quality, with its
    p-value and a 95% interval.

    Parameters
    ----------
    predicted : pandas.DataFrame
        :func:`compare_merges`'s or :func:`split_merges`'s frame (``method`` = the
        merge's label in ``scores``).
    scores : pandas.DataFrame
        A merge table: the merges' rows, each expert's own row and (for the gain)
        the base's; with ``correct`` (per-item results) the interval resamples the
        evaluation items too.
    capabilities, expert_label
        Expert -> capability, and the experts' row labels.
    measure : {"auto", "gain", "retention"}
        What the predictor is set against (:func:`measured_quality`).
    n_resamples, seed
        The bootstrap: merges (pairs) and evaluation items resampled together.

    Returns
    -------
    pandas.DataFrame
        One row per predictor present (:data:`PREDICTORS`): ``predictor, measure,
        n_merges, spearman, p_value, low, high``: the rank correlation over the
        merges present in both frames between minus the predictor (lower
        predicted loss = better) and the measured quality; 1 means the
        prediction orders the merges exactly as the evaluation does. ``p_value``
        is scipy's (H0: no monotone association); ``low``-``high`` the 95%
        percentile interval. NaN with fewer than three merges.

    Examples
    --------
    >>> pred = pd.DataFrame({"method": ["m1", "m2", "m3"], "expert": "a",
    ...                      "predicted_loss_increase": [3.0, 1.0, 2.0], "relative_loss": [0.3, 0.1, 0.2]})
    >>> t = pd.DataFrame({"model": ["expert: a", "m1", "m2", "m3"], "capability": "x",
    ...                   "accuracy": [1.0, 0.2, 0.9, 0.5]})
    >>> prediction_agreement(pred, t, {"a": "x"}, n_resamples=100)[["predictor", "measure", "spearman"]]
                     predictor    measure  spearman
    0  predicted_loss_increase  retention       1.0
    1            relative_loss  retention       1.0
    """
    boot = ItemBootstrap(n_resamples, seed)
    used, quality = measured_quality(scores, capabilities, list(dict.fromkeys(predicted["method"])),
                                     measure=measure, expert_label=expert_label, boot=boot)
    rows = []
    for col, how in PREDICTORS.items():
        if col not in predicted.columns:
            continue
        per = predicted.groupby("method", sort=False)[col].agg(how).astype(float)
        common = [m for m in per.index if m in quality and np.isfinite(per[m]) and np.isfinite(quality[m][0])]
        x = -per[common].to_numpy()
        y = np.stack([quality[m] for m in common], axis=1) if common else np.empty((n_resamples + 1, 0))
        r = spearman_interval(x, y[0], n_resamples=0) if len(common) >= 3 else {"rho": np.nan, "p_value": np.nan}
        low = high = np.nan
        if len(common) >= 3:
            idx = resample_indices(len(common), n_resamples, seed)[1:]
            rho_b = rank_corr_rows(x[idx], np.take_along_axis(y[1:], idx, axis=1))
            low, high = interval(rho_b)
        rows.append({"predictor": col, "measure": used, "n_merges": len(common), "spearman": r["rho"],
                     "p_value": r["p_value"], "low": low, "high": high})
    return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)


def agreement_by_family(predicted: pd.DataFrame, scores: pd.DataFrame, capabilities: Mapping[str, str],
                        families: Mapping[str, str], *, expert_label: str = "expert: {}",
                        n_resamples: int = N_RESAMPLES) -> pd.DataFrame:
    """:func:`prediction_agreement` over every merge, and over subsets of the
    method families (``families``: merge label -> family, e.g.
    :data:`curvlens.demo.FAMILY_GRID`'s): each family alone and every merge but
    that family. A ``merges`` column names the subset.
    """
    fams = {m: f for m, f in families.items() if m in set(predicted["method"])}
    subsets = {"all": list(fams)}
    for f in dict.fromkeys(fams.values()):
        subsets[f"only {f}"] = [m for m, g in fams.items() if g == f]
        subsets[f"all but {f}"] = [m for m, g in fams.items() if g != f]
    out = []
    for name, labels in subsets.items():
        if len(labels) < 3:
            continue
        a = prediction_agreement(predicted[predicted["method"].isin(labels)], scores, capabilities, expert_label,
                                 n_resamples=n_resamples)
        a.insert(0, "merges", name)
        out.append(a)
    return pd.concat(out, ignore_index=True)


def prediction_study(experts, merges: Mapping, scores: pd.DataFrame, capabilities: Mapping[str, str],
                     heads, *, expert_label: str = "expert: {}", progress: bool = False
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The predictions of ``merges`` and their agreement with the scores, over
    every tensor and without ``heads`` (patterns of :mod:`curvlens.tensor_filter`).

    Returns
    -------
    predicted : pandas.DataFrame
        :func:`split_merges`'s rows (:func:`compare_merges`'s without a base) with
        a ``variant`` column (``"all tensors"`` / ``"without heads"``).
    agreement : pandas.DataFrame
        :func:`prediction_agreement`'s rows with the same ``variant`` column.
    """
    per, agree = [], []
    for variant, ex in (("all tensors", experts), ("without heads", experts.without(heads))):
        pred = (split_merges if ex.base is not None else compare_merges)(ex, merges, progress=progress)
        pred.insert(0, "variant", variant)
        per.append(pred)
        a = prediction_agreement(pred, scores, capabilities, expert_label)
        a.insert(0, "variant", variant)
        agree.append(a)
    return pd.concat(per, ignore_index=True), pd.concat(agree, ignore_index=True)
