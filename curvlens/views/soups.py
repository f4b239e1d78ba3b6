"""Greedy-soup curves and Pareto fronts, drawn from the frames of ``greedy_soup`` and
``pareto_front`` (never from checkpoints).

``soup_curve(result.curve)``: the score of every soup tried, kept or not, and the
soup's best score so far. ``front_plot(result.dense, result.evaluated)``: the
predicted front in coefficient space and in predicted-objective space, and the
measured scores of the evaluated merges (which the prediction put on its front,
which are non-dominated as measured). Each has a plotly twin
(``soup_curve_plotly``, ``front_plot_plotly``) drawn from the same data.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from curvlens.errors import CurvlensError
from curvlens.views._common import check_frame, color, require_plotly, styled

__all__ = ["front_plot", "front_plot_plotly", "soup_curve", "soup_curve_plotly"]

_GREY = "#BBBBBB"


def _soup_data(curve: pd.DataFrame, what: str) -> dict:
    """What both soup figures draw: the soup steps (x, tick label, score, kept,
    best so far) and the ingredients' own scores."""
    check_frame(curve, ["step", "phase", "candidate", "score", "kept", "best"], what)
    soup = curve[curve["phase"] == "soup"]
    if soup.empty:
        raise CurvlensError(f"{what}: the curve has no soup steps (phase == 'soup')")
    rank = curve[curve["phase"] == "rank"]
    return {"x": np.arange(len(soup)), "candidate": soup["candidate"].astype(str).to_numpy(),
            "ticks": [("+ " if i else "") + str(c) for i, c in enumerate(soup["candidate"])],
            "score": soup["score"].astype(float).to_numpy(),
            "kept": soup["kept"].fillna(False).astype(bool).to_numpy(),
            "best": soup["best"].astype(float).to_numpy(),
            "rank_candidate": rank["candidate"].astype(str).to_numpy(),
            "rank_score": rank["score"].astype(float).to_numpy()}


_SOUP_X = "ingredient tried, in ranked order"
_SOUP_Y = "held-out score (objective)"
_RANK_X = -0.6  # where the ingredients alone are drawn, left of the first step


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

    d = _soup_data(curve, "soup_curve")
    fig, ax = plt.subplots(figsize=figsize)
    xs, kept, scores = d["x"], d["kept"], d["score"]
    ax.step(xs, d["best"], where="post", color=color(4), label="soup (best so far)")
    ax.scatter(xs[kept], scores[kept], color=color(2), zorder=3, label="kept")
    ax.scatter(xs[~kept], scores[~kept], color=color(5), marker="x", zorder=3, label="rejected")
    if len(d["rank_score"]):
        ax.scatter(np.full(len(d["rank_score"]), _RANK_X), d["rank_score"], color=_GREY, s=14,
                   label="ingredients alone")
    ax.set_xticks(xs, d["ticks"], rotation=30, ha="right")
    ax.set_xlabel(_SOUP_X)
    ax.set_ylabel(_SOUP_Y)
    ax.legend(loc="best", fontsize="small")
    ax.set_title(title or "Greedy soup")
    return fig


def soup_curve_plotly(curve: pd.DataFrame, *, title: str | None = None):
    """Interactive twin of :func:`soup_curve`. Hover: the ingredient tried, its
    score, and whether the soup kept it.

    Returns
    -------
    plotly.graph_objects.Figure
        Traces: the soup (best so far), kept, rejected[, ingredients alone].
    """
    go = require_plotly()
    d = _soup_data(curve, "soup_curve_plotly")
    xs, kept, scores = d["x"], d["kept"], d["score"]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=xs, y=d["best"], mode="lines", line={"shape": "hv", "color": color(4)},
                             name="soup (best so far)", hovertemplate="best so far: %{y:.3f}<extra></extra>"))
    for mask, name, marker in ((kept, "kept", {"color": color(2), "size": 9}),
                               (~kept, "rejected", {"color": color(5), "size": 9, "symbol": "x"})):
        fig.add_trace(go.Scatter(x=xs[mask], y=scores[mask], mode="markers", name=name, marker=marker,
                                 customdata=d["candidate"][mask],
                                 hovertemplate="+ %{customdata}: %{y:.3f} (" + name + ")<extra></extra>"))
    if len(d["rank_score"]):
        fig.add_trace(go.Scatter(x=np.full(len(d["rank_score"]), _RANK_X), y=d["rank_score"], mode="markers",
                                 name="ingredients alone", marker={"color": _GREY, "size": 6},
                                 customdata=d["rank_candidate"],
                                 hovertemplate="%{customdata} alone: %{y:.3f}<extra></extra>"))
    fig.update_layout(title=title or "Greedy soup", template="plotly_white",
                      xaxis={"title": {"text": _SOUP_X}, "tickvals": list(xs), "ticktext": d["ticks"]},
                      yaxis={"title": {"text": _SOUP_Y}})
    return fig


def _pick(cols: Sequence[str], given, n: int, what: str, fn: str) -> list[str]:
    if given is None:
        if len(cols) < n:
            raise CurvlensError(f"{fn} needs {n} {what} columns; found {list(cols)}")
        return list(cols[:n])
    given = list(given)
    missing = [c for c in given if c not in cols]
    if len(given) != n or missing:
        raise CurvlensError(f"{fn}: {what} must be {n} of {list(cols)}; got {given}")
    return given


def _front_data(dense, evaluated, coefficients, objectives, metrics, fn: str) -> dict:
    """What both front figures draw: the columns picked, the predicted front and
    a thinned cloud of the rest, and (with evaluations) the measured points."""
    check_frame(dense, ["on_front"], fn)
    coef_cols = [c for c in dense.columns if c.startswith("c_")]
    obj_cols = [c for c in dense.columns if c.startswith(("pred_", "loss_"))]
    cx, cy = _pick(coef_cols, coefficients, 2, "coefficient", fn)
    ox, oy = _pick(obj_cols, objectives, 2, "objective", fn)
    on = dense["on_front"].astype(bool).to_numpy()
    d = {"cx": cx, "cy": cy, "ox": ox, "oy": oy, "front": dense[on],
         # the grey background needs no more than a few thousand points
         "cloud": dense[~on].iloc[:: max(1, int((~on).sum()) // 1500)], "ev": None}
    if evaluated is None or not len(evaluated) or "status" not in evaluated.columns:
        return d
    ev = evaluated[evaluated["status"] == "ok"]
    metric_cols = [c for c in ev.columns if c not in dense.columns and c not in (
        "role", "label", "status", "error", "measured_front", "predicted_front")]
    if ox.startswith("pred_") and metrics is None and ox[5:] in ev.columns and oy[5:] in ev.columns:
        metrics = [ox[5:], oy[5:]]
    mx, my = _pick(metric_cols, metrics, 2, "measured metric", fn)
    flag = lambda c: ev[c].astype(bool) if c in ev else pd.Series(False, index=ev.index)  # noqa: E731
    d.update(ev=ev, mx=mx, my=my, pf=flag("predicted_front"), mf=flag("measured_front"),
             # a surrogate front is in the measured units: drawn under the measured points
             same_units=ox.startswith("pred_") and [ox[5:], oy[5:]] == [mx, my])
    return d


def _axis_label(col: str) -> str:
    return col + (" (lower is better)" if col.startswith("loss_") else "")


_FRONT_TITLE = "Pareto front of task-arithmetic coefficients"
_PANELS = ("coefficients", "predicted objectives", "measured scores")


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

    d = _front_data(dense, evaluated, coefficients, objectives, metrics, "front_plot")
    cloud, front, ev = d["cloud"], d["front"], d["ev"]
    n = 2 if ev is None else 3
    fig, axes = plt.subplots(1, n, figsize=figsize or (4.2 * n, 3.8))
    for ax, (x, y) in zip(axes, ((d["cx"], d["cy"]), (d["ox"], d["oy"]))):
        ax.scatter(cloud[x], cloud[y], s=3, color=_GREY, label="sampled c", rasterized=True)
        ax.scatter(front[x], front[y], s=5, color=color(4), label="predicted front", rasterized=True)
        ax.set_xlabel(_axis_label(x))
        ax.set_ylabel(_axis_label(y))
    if ev is not None:
        axes[0].scatter(ev[d["cx"]], ev[d["cy"]], s=28, facecolors="none", edgecolors=color(5), label="evaluated")
        mx, my, pf, mf = d["mx"], d["my"], d["pf"], d["mf"]
        ax = axes[2]
        if d["same_units"]:
            ax.scatter(front[d["ox"]], front[d["oy"]], s=5, color=color(4), label="predicted front",
                       rasterized=True)
        ax.scatter(ev.loc[~pf, mx], ev.loc[~pf, my], s=22, color=_GREY, label="evaluated")
        ax.scatter(ev.loc[pf, mx], ev.loc[pf, my], s=22, color=color(5), label="predicted on front")
        ax.scatter(ev.loc[mf, mx], ev.loc[mf, my], s=70, facecolors="none", edgecolors="black",
                   label="measured non-dominated")
        ax.set_xlabel(f"{mx} (measured)")
        ax.set_ylabel(f"{my} (measured)")
        ax.legend(fontsize="x-small", loc="best")
    for ax, name in zip(axes, _PANELS):
        ax.set_title(name)
    axes[0].legend(fontsize="x-small", loc="best")
    fig.suptitle(title or _FRONT_TITLE)
    return fig


def front_plot_plotly(dense: pd.DataFrame, evaluated: pd.DataFrame | None = None, *, coefficients=None,
                      objectives=None, metrics=None, title: str | None = None):
    """Interactive twin of :func:`front_plot` (same panels and arguments). Hover:
    the coefficients and predicted objectives of a point; an evaluated merge's
    label and measured scores.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    go = require_plotly()
    from plotly.subplots import make_subplots

    d = _front_data(dense, evaluated, coefficients, objectives, metrics, "front_plot_plotly")
    cloud, front, ev = d["cloud"], d["front"], d["ev"]
    n = 2 if ev is None else 3
    fig = make_subplots(rows=1, cols=n, subplot_titles=_PANELS[:n])
    point = {"x": d["cx"], "y": d["cy"], "a": d["ox"], "b": d["oy"]}
    hover = "".join(f"{point[k]}: %{{customdata[{i}]:.4g}}<br>" for i, k in enumerate("xyab")) + "<extra></extra>"
    for col, (x, y) in enumerate(((d["cx"], d["cy"]), (d["ox"], d["oy"])), start=1):
        for frame, name, colour, size in ((cloud, "sampled c", _GREY, 3), (front, "predicted front", color(4), 5)):
            fig.add_trace(go.Scatter(x=frame[x], y=frame[y], mode="markers", name=name, legendgroup=name,
                                     showlegend=col == 1, marker={"color": colour, "size": size},
                                     customdata=frame[list(point.values())].to_numpy(float), hovertemplate=hover),
                          row=1, col=col)
        fig.update_xaxes(title_text=_axis_label(x), row=1, col=col)
        fig.update_yaxes(title_text=_axis_label(y), row=1, col=col)
    if ev is not None:
        mx, my, pf, mf = d["mx"], d["my"], d["pf"], d["mf"]
        measured = f"<b>%{{text}}</b><br>{mx}: %{{x:.3f}}<br>{my}: %{{y:.3f}}<extra></extra>"
        labels = ev["label"].astype(str) if "label" in ev else pd.Series("", index=ev.index)
        fig.add_trace(go.Scatter(x=ev[d["cx"]], y=ev[d["cy"]], mode="markers", name="evaluated", text=labels,
                                 marker={"color": "rgba(0,0,0,0)", "size": 10, "line": {"color": color(5), "width": 1.5}},
                                 hovertemplate="<b>%{text}</b><extra></extra>"), row=1, col=1)
        if d["same_units"]:
            fig.add_trace(go.Scatter(x=front[d["ox"]], y=front[d["oy"]], mode="markers", name="predicted front",
                                     legendgroup="predicted front", showlegend=False,
                                     marker={"color": color(4), "size": 5}, hoverinfo="skip"), row=1, col=3)
        for mask, name, marker in ((~pf, "evaluated, off the predicted front", {"color": _GREY, "size": 8}),
                                   (pf, "predicted on front", {"color": color(5), "size": 8}),
                                   (mf, "measured non-dominated",
                                    {"color": "rgba(0,0,0,0)", "size": 14, "line": {"color": "black", "width": 1.5}})):
            fig.add_trace(go.Scatter(x=ev.loc[mask, mx], y=ev.loc[mask, my], mode="markers", name=name,
                                     text=labels[mask], marker=marker, hovertemplate=measured), row=1, col=3)
        fig.update_xaxes(title_text=f"{mx} (measured)", row=1, col=3)
        fig.update_yaxes(title_text=f"{my} (measured)", row=1, col=3)
    fig.update_layout(title=title or _FRONT_TITLE, template="plotly_white", height=430, width=420 * n)
    return fig
