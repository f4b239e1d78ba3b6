"""Checks of a predicted Pareto front against evaluated merges (:mod:`curvlens.studies.fronts`).

Which evaluated points may judge a prediction, and on which scale a surrogate is
fitted: a prediction is only scored where it was not given the answer.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from curvlens.errors import CurvlensError
from curvlens.math.fronts import front_distance, non_dominated, squash, unit_rows

__all__ = ["fit_scale", "front_agreement"]


def fit_scale(values: pd.Series, metric: str, metric_range) -> np.ndarray:
    """A metric's measured values on the scale the surrogate is fitted on."""
    y = values.to_numpy(dtype=float)
    if metric_range is None:
        return y
    lo, hi = metric_range
    out = y[np.isfinite(y) & ((y < lo) | (y > hi))]
    if out.size:
        raise CurvlensError(f"metric {metric!r} has measured values outside metric_range {metric_range} "
                            f"(e.g. {out[:3].tolist()}); pass metric_range=(low, high) or None for an unbounded metric")
    return squash(y, lo, hi)


def front_agreement(evaluated: pd.DataFrame, pairs, predictor: str, coef_cols, dense: pd.DataFrame,
                    sense_max: bool) -> tuple[pd.DataFrame, dict]:
    """How well a predicted front's objectives rank the measured metrics, and how
    close the predicted front is to the measured non-dominated points.

    Agreement is measured only where the prediction was not given the answer: for
    the surrogate on the held-out points (roles ``check`` and ``holdout``, never
    its fitting ``sample``), for the curvature prediction off the corners (each
    expert alone, where its own predicted loss is 0 by construction). Adds
    ``measured_front`` and ``predicted_front`` to ``evaluated`` (in place).

    Returns
    -------
    agreement : pandas.DataFrame
        ``objective, metric, points, n, spearman, mae`` (see ``FrontResult``).
    summary : dict
    """
    cols = ["objective", "metric", "points", "n", "spearman", "mae"]
    summary = {"n_evaluations": int(len(evaluated)), "n_front": int(dense["on_front"].sum()),
               "front_share": float(dense["on_front"].mean())}
    if not len(evaluated) or not pairs:
        summary["front_distance"] = float("nan")
        return pd.DataFrame(columns=cols), summary
    ok = evaluated[evaluated["status"] == "ok"]
    c = ok[coef_cols].to_numpy(dtype=float)
    if predictor == "surrogate":   # never the points it was fitted to
        scored, points = ok["role"].isin(["check", "holdout"]).to_numpy(), "held out"
    else:                          # each expert alone: its own loss is 0 by construction
        scored, points = ~unit_rows(c), "off the corners"
    rows = []
    for o, m in pairs:
        x = ok[o].astype(float) * (1.0 if sense_max else -1.0)
        y = ok[m].astype(float)
        good = (np.isfinite(x) & np.isfinite(y)).to_numpy() & scored
        rho = float(x[good].corr(y[good], method="spearman")) if good.sum() >= 3 else float("nan")
        mae = float((ok[o][good] - ok[m][good]).abs().mean()) if predictor == "surrogate" and good.any() else float("nan")
        rows.append({"objective": o, "metric": m, "points": points, "n": int(good.sum()), "spearman": rho,
                     "mae": mae})
    measured = ok[[m for _, m in pairs]].to_numpy(dtype=float)
    fin = np.isfinite(measured).all(1)
    evaluated["measured_front"] = False
    evaluated["predicted_front"] = False
    if fin.any():
        idx = ok.index[fin]
        evaluated.loc[idx, "measured_front"] = non_dominated(measured[fin], maximize=True)
        predicted = ok.loc[idx, [o for o, _ in pairs]].to_numpy(dtype=float)
        evaluated.loc[idx, "predicted_front"] = non_dominated(predicted, maximize=sense_max)
        mf = evaluated.loc[evaluated["measured_front"], coef_cols].to_numpy(dtype=float)
        summary["front_distance"] = front_distance(dense.loc[dense["on_front"], coef_cols].to_numpy(), mf)
        both = (evaluated["measured_front"] & evaluated["predicted_front"]).sum()
        either = (evaluated["measured_front"] | evaluated["predicted_front"]).sum()
        summary["front_jaccard"] = float(both / either) if either else float("nan")
    else:
        summary["front_distance"] = float("nan")
    return pd.DataFrame(rows, columns=cols), summary
