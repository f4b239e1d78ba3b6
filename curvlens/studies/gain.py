"""The one yardstick of capability: the share of an expert's gain over the base a model keeps.

For a capability ``c`` with base score ``b``, the expert's own score ``e`` and a
merged (or grafted) model's ``m``::

    gain kept = (m - b) / (e - b)

1 keeps everything fine-tuning added, 0 is no better than the base, below 0 is
worse than the base. Retention ``m / e`` credits the base's own score to every
merge (a base that answers 0.6 of a capability "retains" 0.6 before any merge),
so it is shown only as a secondary column. Over several capabilities the gains
pool as ``sum(m - b) / sum(e - b)``: the share of the experts' summed gain kept,
an affine function of the mean score (it orders merges of the same experts
exactly as their mean accuracy does). Negative transfer is the worst
capability's gain kept. A capability on which the expert is not above the base
has no gain to keep: it is left out of both, and the frame says so (NaN).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from curvlens.errors import CurvlensError

GAIN_COLUMNS = ["model", "capability", "accuracy", "base_accuracy", "expert_accuracy", "gain_kept", "retention"]
#: Summary rows of :func:`merge_gain` (``capability`` column).
POOLED, WORST = "pooled", "worst"


def gain_kept(merged, base, expert):
    """``(merged - base) / (expert - base)``; NaN where the expert is not above the base.

    Works on numbers and on numpy arrays (e.g. bootstrap resamples).

    Examples
    --------
    >>> round(float(gain_kept(0.9, 0.68, 0.96)), 3)     # 79% of the expert's gain
    0.786
    >>> bool(np.isnan(gain_kept(0.5, 0.6, 0.6)))
    True
    """
    m, b, e = (np.asarray(x, dtype=float) for x in (merged, base, expert))
    den = e - b
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (m - b) / np.where(den > 0, den, 1.0), np.nan)


def pooled_gain(merged: Sequence, base: Sequence, expert: Sequence):
    """``sum(m - b) / sum(e - b)`` over capabilities (sequences of numbers or of
    equally long arrays); NaN where the experts' summed gain is not positive.

    Examples
    --------
    >>> round(float(pooled_gain([0.9, 0.5], [0.7, 0.0], [1.0, 1.0])), 3)   # 0.7 of a gain of 1.3
    0.538
    """
    num = sum(np.asarray(m, dtype=float) - np.asarray(b, dtype=float) for m, b in zip(merged, base))
    den = sum(np.asarray(e, dtype=float) - np.asarray(b, dtype=float) for e, b in zip(expert, base))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def worst_gain(merged: Sequence, base: Sequence, expert: Sequence):
    """The smallest per-capability gain kept (NaN capabilities skipped)."""
    g = np.stack([np.atleast_1d(gain_kept(m, b, e)) for m, b, e in zip(merged, base, expert)])
    with np.errstate(all="ignore"):
        out = np.where(np.isnan(g).all(0), np.nan, np.nanmin(np.where(np.isnan(g), np.inf, g), axis=0))
    return out if np.ndim(merged[0]) else float(out[0])


def own_scores(scores: pd.DataFrame, capabilities: Mapping[str, str],
               expert_label: str = "expert: {}") -> dict[str, float]:
    """capability -> the score of the expert fine-tuned on it (its row of ``scores``,
    labelled ``expert_label.format(expert)``); a missing row is an error."""
    own = {}
    for expert, cap in capabilities.items():
        label = expert_label.format(expert)
        row = scores[(scores["model"] == label) & (scores["capability"] == cap)]
        if row.empty:
            raise CurvlensError(f"scores has no row for expert {expert!r} ({label!r}) on {cap!r}")
        own[cap] = float(row["accuracy"].iloc[0])
    return own


def reference_rows(scores: pd.DataFrame, capabilities: Mapping[str, str], expert_label: str = "expert: {}",
                   base_label: str = "base") -> tuple[dict, dict]:
    """``(base, own)``: capability -> the base's score, and capability -> the score
    of the expert fine-tuned on it (each from its row of ``scores``)."""
    missing = {"model", "capability", "accuracy"} - set(scores.columns)
    if missing:
        raise CurvlensError(f"scores lacks column(s) {sorted(missing)}; expected a merge table")
    own = own_scores(scores, capabilities, expert_label)
    rows = scores[scores["model"] == base_label]
    base = dict(zip(rows["capability"], rows["accuracy"].astype(float)))
    lacking = [c for c in own if c not in base]
    if lacking:
        raise CurvlensError(f"scores has no {base_label!r} row for capability(ies) {lacking}; the gain over the "
                            "base needs the base's score on every capability")
    return base, own


def merge_gain(scores: pd.DataFrame, capabilities: Mapping[str, str], expert_label: str = "expert: {}",
               base_label: str = "base") -> pd.DataFrame:
    """Gain kept (and retention, secondary) of every model in a merge table.

    Parameters
    ----------
    scores : pandas.DataFrame
        ``model, capability, accuracy`` rows with the base's rows (``base_label``)
        and each expert's own row (``expert_label.format(name)``).
    capabilities : mapping
        Expert name -> the capability it was fine-tuned on.

    Returns
    -------
    pandas.DataFrame
        ``model, capability, accuracy, base_accuracy, expert_accuracy, gain_kept,
        retention`` per model and capability, plus two rows per model: ``pooled``
        (mean accuracy; gain kept ``sum(m - b) / sum(e - b)``; mean retention) and
        ``worst`` (the lowest accuracy, gain kept and retention over capabilities).

    Examples
    --------
    >>> t = pd.DataFrame({"model": ["base", "base", "expert: a", "expert: b", "m", "m"],
    ...                   "capability": ["x", "y", "x", "y", "x", "y"], "accuracy": [0.6, 0.0, 1.0, 0.5, 0.8, 0.5]})
    >>> g = merge_gain(t, {"a": "x", "b": "y"}).query("model == 'm'").set_index("capability")["gain_kept"]
    >>> g.round(3).to_dict()
    {'x': 0.5, 'y': 1.0, 'pooled': 0.778, 'worst': 0.5}
    """
    base, own = reference_rows(scores, capabilities, expert_label, base_label)
    t = scores[scores["capability"].isin(own)][["model", "capability", "accuracy"]].copy()
    t["base_accuracy"] = t["capability"].map(base)
    t["expert_accuracy"] = t["capability"].map(own)
    t["gain_kept"] = gain_kept(t["accuracy"], t["base_accuracy"], t["expert_accuracy"])
    with np.errstate(invalid="ignore", divide="ignore"):
        t["retention"] = t["accuracy"] / t["expert_accuracy"].where(t["expert_accuracy"] > 0)
    summary = []
    for model, g in t.groupby("model", sort=False):
        use = g[g["expert_accuracy"] > g["base_accuracy"]]
        summary.append({"model": model, "capability": POOLED, "accuracy": g["accuracy"].mean(),
                        "base_accuracy": g["base_accuracy"].mean(), "expert_accuracy": g["expert_accuracy"].mean(),
                        "gain_kept": float(pooled_gain(use["accuracy"], use["base_accuracy"],
                                                       use["expert_accuracy"])) if len(use) else np.nan,
                        "retention": g["retention"].mean()})
        summary.append({"model": model, "capability": WORST, "accuracy": g["accuracy"].min(),
                        "base_accuracy": np.nan, "expert_accuracy": np.nan,
                        "gain_kept": use["gain_kept"].min() if len(use) else np.nan,
                        "retention": g["retention"].min()})
    return pd.concat([t, pd.DataFrame(summary, columns=GAIN_COLUMNS)], ignore_index=True)[GAIN_COLUMNS]
