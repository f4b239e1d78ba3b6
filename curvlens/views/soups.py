"""Greedy-soup curves and Pareto fronts, drawn from the frames of ``greedy_soup`` and
``pareto_front`` (never from checkpoints).

``soup_curve(result.curve)``: the score of every soup tried, kept or not, and the
soup's best score so far. ``front_plot(result.dense, result.evaluated)``: the
predicted front in coefficient space and in predicted-objective space, and the
measured scores of the evaluated merges (which the prediction put on its front,
which are non-dominated as measured).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from curvlens.errors import CurvlensError
from curvlens.views._common import check_frame, color, styled

__all__ = ["front_plot", "soup_curve"]

_GREY = "#BBBBBB"


@styled
def soup_curve(curve: pd.DataFrame, *, title: str | None = None, figsize=(6.4, 3.6)):
    """The greedy soup's path: each tried soup's score, kept or rejected.

    Parameters
    ----------
    curve : pandas.DataFrame
        :attr:`curvlens.SoupResult.curve` (``step, phase, candidate, score,
        kept, best``); the ``"rank"`` rows (ingredients alone) are drawn at the
        left as grey points.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    check_frame(curve, ["step", "phase", "candidate", "score", "kept", "best"], "soup_curve")
    soup = curve[curve["phase"] == "soup"]
    if soup.empty:
        raise CurvlensError("soup_curve: the curve has no soup steps (phase == 'soup')")
    fig, ax = plt.subplots(figsize=figsize)
    xs = np.arange(len(soup))
    kept = soup["kept"].fillna(False).astype(bool).to_numpy()
    scores = soup["score"].astype(float).to_numpy()
    ax.step(xs, soup["best"].astype(float), where="post", color=color(4), label="soup (best so far)")
    ax.scatter(xs[kept], scores[kept], color=color(2), zorder=3, label="kept")
    ax.scatter(xs[~kept], scores[~kept], color=color(5), marker="x", zorder=3, label="rejected")
    rank = curve[curve["phase"] == "rank"]
    if len(rank):
        ax.scatter(np.full(len(rank), -0.6), rank["score"].astype(float), color=_GREY, s=14,
                   label="ingredients alone")
    ax.set_xticks(xs, [("+ " if i else "") + str(c) for i, c in enumerate(soup["candidate"])],
                  rotation=30, ha="right")
    ax.set_xlabel("ingredient tried, in ranked order")
    ax.set_ylabel("held-out score (objective)")
    ax.legend(loc="best", fontsize="small")
    ax.set_title(title or "Greedy soup")
    return fig


def _pick(cols: Sequence[str], given, n: int, what: str) -> list[str]:
    if given is None:
        if len(cols) < n:
            raise CurvlensError(f"front_plot needs {n} {what} columns; found {list(cols)}")
        return list(cols[:n])
    given = list(given)
    missing = [c for c in given if c not in cols]
    if len(given) != n or missing:
        raise CurvlensError(f"front_plot: {what} must be {n} of {list(cols)}; got {given}")
    return given


@styled
def front_plot(dense: pd.DataFrame, evaluated: pd.DataFrame | None = None, *, coefficients=None,
               objectives=None, metrics=None, title: str | None = None, figsize=None):
    """A predicted Pareto front, and how the evaluated merges measured up.

    Parameters
    ----------
    dense : pandas.DataFrame
        :attr:`curvlens.FrontResult.dense`: ``c_<expert>`` columns, predicted
        objective columns (``pred_<metric>`` or ``loss_<expert>``), ``on_front``.
    evaluated : pandas.DataFrame, optional
        :attr:`curvlens.FrontResult.evaluated`; adds a third panel of measured
        scores (filled: on the predicted front among the evaluated points;
        ringed: non-dominated as measured). Surrogate fronts (``pred_<metric>``)
        are drawn there too, in the same units.
    coefficients, objectives, metrics : pair of column names, optional
        Which two of each to draw (default the first two).

    Returns
    -------
    matplotlib.figure.Figure
        Panels: coefficient space, predicted objectives, [measured scores].
    """
    import matplotlib.pyplot as plt

    check_frame(dense, ["on_front"], "front_plot")
    coef_cols = [c for c in dense.columns if c.startswith("c_")]
    obj_cols = [c for c in dense.columns if c.startswith(("pred_", "loss_"))]
    cx, cy = _pick(coef_cols, coefficients, 2, "coefficient")
    ox, oy = _pick(obj_cols, objectives, 2, "objective")
    on = dense["on_front"].astype(bool).to_numpy()
    # the grey background needs no more than a few thousand points
    cloud = dense[~on].iloc[:: max(1, int((~on).sum()) // 1500)]
    has_eval = evaluated is not None and len(evaluated) and "status" in evaluated.columns
    n = 3 if has_eval else 2
    fig, axes = plt.subplots(1, n, figsize=figsize or (4.2 * n, 3.8))
    ax = axes[0]
    ax.scatter(cloud[cx], cloud[cy], s=3, color=_GREY, label="sampled c", rasterized=True)
    ax.scatter(dense.loc[on, cx], dense.loc[on, cy], s=5, color=color(4), label="predicted front",
               rasterized=True)
    if has_eval:
        ev = evaluated[evaluated["status"] == "ok"]
        ax.scatter(ev[cx], ev[cy], s=28, facecolors="none", edgecolors=color(5), label="evaluated")
    ax.set_xlabel(cx)
    ax.set_ylabel(cy)
    ax.set_title("coefficients")
    ax.legend(fontsize="x-small", loc="best")
    ax = axes[1]
    ax.scatter(cloud[ox], cloud[oy], s=3, color=_GREY, rasterized=True)
    ax.scatter(dense.loc[on, ox], dense.loc[on, oy], s=5, color=color(4), rasterized=True)
    ax.set_xlabel(ox + (" (lower is better)" if ox.startswith("loss_") else ""))
    ax.set_ylabel(oy + (" (lower is better)" if oy.startswith("loss_") else ""))
    ax.set_title("predicted objectives")
    if has_eval:
        ev = evaluated[evaluated["status"] == "ok"]
        metric_cols = [c for c in ev.columns if c not in dense.columns and c not in (
            "role", "label", "status", "error", "measured_front", "predicted_front")]
        if ox.startswith("pred_") and metrics is None and ox[5:] in ev.columns and oy[5:] in ev.columns:
            metrics = [ox[5:], oy[5:]]
        mx, my = _pick(metric_cols, metrics, 2, "measured metric")
        ax = axes[2]
        if ox.startswith("pred_") and [ox[5:], oy[5:]] == [mx, my]:
            ax.scatter(dense.loc[on, ox], dense.loc[on, oy], s=5, color=color(4), label="predicted front",
                       rasterized=True)
        pf = ev["predicted_front"].astype(bool) if "predicted_front" in ev else pd.Series(False, index=ev.index)
        mf = ev["measured_front"].astype(bool) if "measured_front" in ev else pd.Series(False, index=ev.index)
        ax.scatter(ev.loc[~pf, mx], ev.loc[~pf, my], s=22, color=_GREY, label="evaluated")
        ax.scatter(ev.loc[pf, mx], ev.loc[pf, my], s=22, color=color(5), label="predicted on front")
        ax.scatter(ev.loc[mf, mx], ev.loc[mf, my], s=70, facecolors="none", edgecolors="black",
                   label="measured non-dominated")
        ax.set_xlabel(f"{mx} (measured)")
        ax.set_ylabel(f"{my} (measured)")
        ax.set_title("measured scores")
        ax.legend(fontsize="x-small", loc="best")
    fig.suptitle(title or "Pareto front of task-arithmetic coefficients")
    return fig
