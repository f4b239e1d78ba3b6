"""How well does the curvature prediction rank merges? Predicted against measured.

:func:`curvlens.passes.analysis_interference.compare_merges` predicts, from the
experts' second moments alone, how much loss each expert suffers under each
merge. :func:`prediction_agreement` sets that against measured scores: the rank
correlation, over merges, between each predictor and the measured retention
(merged score / the expert's own score, averaged over capabilities). It is what
says whether the prediction can pick merges before anything is evaluated.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from curvlens.arguments import frame_arg
from curvlens.errors import CurvlensError
from curvlens.passes.analysis_interference import compare_merges

#: The predictors compared, each pooled over experts to one number per merge
#: (lower = predicted better): the summed loss increase, and the mean over
#: experts of the fraction of each fine-tune given up.
PREDICTORS = {"predicted_loss_increase": "sum", "relative_loss": "mean"}


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
    own = {}
    for expert, cap in capabilities.items():
        label = expert_label.format(expert)
        row = scores[(scores["model"] == label) & (scores["capability"] == cap)]
        if row.empty:
            raise CurvlensError(f"scores has no row for expert {expert!r} ({label!r}) on {cap!r}")
        own[cap] = float(row["accuracy"].iloc[0])
    t = scores[scores["capability"].isin(own)][["model", "capability", "accuracy"]].copy()
    t["expert_accuracy"] = t["capability"].map(own)
    t["retention"] = t["accuracy"] / t["expert_accuracy"]
    mean = t.groupby("model", sort=False)[["accuracy", "expert_accuracy", "retention"]].mean().reset_index()
    mean.insert(1, "capability", "mean")
    return pd.concat([t, mean], ignore_index=True)


def prediction_agreement(predicted: pd.DataFrame, scores: pd.DataFrame, capabilities: Mapping[str, str],
                         expert_label: str = "expert: {}") -> pd.DataFrame:
    """Spearman correlation between predicted and measured merge quality.

    Parameters
    ----------
    predicted : pandas.DataFrame
        :func:`compare_merges`'s frame (``method`` = the merge's label in ``scores``).
    scores, capabilities, expert_label
        As :func:`merge_retention`.

    Returns
    -------
    pandas.DataFrame
        One row per predictor (:data:`PREDICTORS`): ``predictor, n_merges,
        spearman``, the rank correlation over the merges present in both frames
        between minus the predictor (lower predicted loss = better) and the mean
        measured retention; 1 means the prediction orders the merges exactly as
        the evaluation does. NaN with fewer than three merges.

    Examples
    --------
    >>> pred = pd.DataFrame({"method": ["m1", "m2", "m3"], "expert": "a",
    ...                      "predicted_loss_increase": [3.0, 1.0, 2.0], "relative_loss": [0.3, 0.1, 0.2]})
    >>> t = pd.DataFrame({"model": ["expert: a", "m1", "m2", "m3"], "capability": "x",
    ...                   "accuracy": [1.0, 0.2, 0.9, 0.5]})
    >>> prediction_agreement(pred, t, {"a": "x"})["spearman"].tolist()
    [1.0, 1.0]
    """
    ret = merge_retention(scores, capabilities, expert_label)
    measured = ret[ret["capability"] == "mean"].set_index("model")["retention"]
    rows = []
    for col, how in PREDICTORS.items():
        if col not in predicted.columns:
            continue
        per = predicted.groupby("method", sort=False)[col].agg(how)
        common = [m for m in per.index if m in measured.index]
        x, y = -per[common].astype(float), measured[common].astype(float)
        ok = np.isfinite(x.to_numpy()) & np.isfinite(y.to_numpy())
        rho = float(x[ok].corr(y[ok], method="spearman")) if ok.sum() >= 3 else float("nan")
        rows.append({"predictor": col, "n_merges": int(ok.sum()), "spearman": rho})
    return pd.DataFrame(rows, columns=["predictor", "n_merges", "spearman"])


def prediction_study(experts, merges: Mapping, scores: pd.DataFrame, capabilities: Mapping[str, str],
                     heads, *, expert_label: str = "expert: {}", progress: bool = False
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The predictions of ``merges`` and their agreement with the scores, over
    every tensor and without ``heads`` (patterns of :mod:`curvlens.tensor_filter`).

    Returns
    -------
    predicted : pandas.DataFrame
        :func:`compare_merges`'s rows with a ``variant`` column
        (``"all tensors"`` / ``"without heads"``).
    agreement : pandas.DataFrame
        :func:`prediction_agreement`'s rows with the same ``variant`` column.
    """
    per, agree = [], []
    for variant, ex in (("all tensors", experts), ("without heads", experts.without(heads))):
        pred = compare_merges(ex, merges, progress=progress)
        pred.insert(0, "variant", variant)
        per.append(pred)
        a = prediction_agreement(pred, scores, capabilities, expert_label)
        a.insert(0, "variant", variant)
        agree.append(a)
    return pd.concat(per, ignore_index=True), pd.concat(agree, ignore_index=True)
