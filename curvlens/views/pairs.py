"""Expert x expert matrices of a pair metric (curvature overlap, mask Jaccard,
task-vector cosine, sign conflict), aggregated numel-weighted over tensors.

Input is any pair frame (``expert_a, expert_b, name, ..., numel, <metric>``):
``curvature_overlap``, ``mask_overlap`` (filter one ``criterion`` and ``density``)
or ``interference``. The matrix is symmetric: rows ``(a, b)`` and ``(b, a)`` feed
the same cell. The diagonal holds self-pairs when the frame has them, else
``diagonal`` (NaN by default, drawn blank).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from curvlens.errors import CurvlensError, check_choice
from curvlens.passes.analysis_common import pool
from curvlens.views._common import (
    METRIC_RANGES, apply_filters, check_frame, check_numeric, filter_title, first_seen, fmt_value,
    metric_label, new_axes, plotly_color_kwargs, require_plotly, styled, text_color_for, weights_of,
)
from curvlens.views.baselines import CHANCE_LEVELS
from curvlens.views.heatmaps import color_setup
from curvlens.views.tables import common_format, fmt_sig

__all__ = ["pair_matrix", "pair_matrix_heatmap", "pair_matrix_plotly"]


def _pair_matrix(df, metric, *, weight, experts, diagonal, filters, what):
    check_frame(df, ["expert_a", "expert_b", metric], what)
    df = apply_filters(df, filters, what)
    values = check_numeric(df, metric, what)
    w = weights_of(df, weight, what, metric)
    present = first_seen(list(df["expert_a"]) + list(df["expert_b"]))
    if experts is None:
        experts = present
    experts = [check_choice("experts", e, present) for e in experts]
    idx = {e: i for i, e in enumerate(experts)}
    n = len(experts)
    cells: dict[tuple[int, int], list[int]] = {}
    for k, (a, b) in enumerate(zip(df["expert_a"], df["expert_b"])):
        if a in idx and b in idx:
            i, j = sorted((idx[a], idx[b]))
            cells.setdefault((i, j), []).append(k)
    out = np.full((n, n), np.nan)
    count = np.zeros((n, n), dtype=int)
    numel = np.zeros((n, n))
    for (i, j), ks in cells.items():
        out[i, j] = out[j, i] = pool(metric, values[ks], None if w is None else w[ks])
        count[i, j] = count[j, i] = len(ks)
        numel[i, j] = numel[j, i] = float(np.nansum(w[ks])) if w is not None else len(ks)
    for i in range(n):
        if (i, i) not in cells:
            out[i, i] = diagonal
    if np.isnan(out[~np.eye(n, dtype=bool)]).all() and n > 1:
        raise CurvlensError(f"{what}: no pair of {experts} has a {metric!r} value")
    return experts, out, count, numel


def pair_matrix(df: pd.DataFrame, metric: str, *, weight: str | None = "numel",
                experts: Sequence[str] | None = None, diagonal: float = np.nan,
                **filters: Any) -> pd.DataFrame:
    """Symmetric expert x expert matrix of the numel-weighted mean of ``metric``.

    Parameters
    ----------
    df : pandas.DataFrame
        A pair frame with columns ``expert_a, expert_b`` and ``metric``.
    metric : str
        e.g. ``pearson_log``, ``jaccard``, ``tv_cosine``, ``sign_conflict``.
    weight : str or None
        Weight column (default ``numel``).
    experts : sequence of str, optional
        Rows/columns, in this order (default: order of appearance).
    diagonal : float
        Value for the diagonal when the frame has no self-pairs.
    **filters
        e.g. ``criterion="fisher", density=0.2``, or ``role="q"``.

    Returns
    -------
    pandas.DataFrame

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({"expert_a": ["math", "math", "math"], "expert_b": ["code"] * 3,
    ...                    "numel": [10, 30, 10], "sign_conflict": [0.2, 0.4, 0.6]})
    >>> pair_matrix(df, "sign_conflict", diagonal=0.0)
          math  code
    math   0.0   0.4
    code   0.4   0.0
    """
    experts, out, _, _ = _pair_matrix(df, metric, weight=weight, experts=experts,
                                      diagonal=diagonal, filters=filters, what="pair_matrix")
    return pd.DataFrame(out, index=experts, columns=experts)


@styled
def pair_matrix_heatmap(df: pd.DataFrame, metric: str, *, ax=None, cmap: str | None = None,
                        vmin: float | None = None, vmax: float | None = None,
                        center: float | None = None, log: bool | None = False,
                        limits: str = "natural",
                        annotate: bool = True, colorbar: bool = True,
                        diagonal: float = np.nan, experts: Sequence[str] | None = None,
                        weight: str | None = "numel", chance: float | str | None = "auto",
                        title: str | None = None, **filters: Any):
    """Annotated symmetric heatmap of a pair metric between experts (matplotlib).

    Parameters
    ----------
    df, metric, weight, experts, diagonal, **filters
        As :func:`pair_matrix`.
    ax : matplotlib.axes.Axes, optional
    cmap, vmin, vmax, center, log
        Colour scale; default viridis, or RdBu_r centred on 0 for signed metrics
        (``tv_cosine``, correlations, or data of both signs).
    limits : {"natural", "data"}
        Default colour limits: the metric's possible range (e.g. 0..1 for a
        Jaccard index, -1..1 for a correlation) so that small differences are
        not exaggerated, or the data's range. Unknown metrics use the data.
    annotate : bool
        Write each value in its cell, every cell with the same number of decimals.
    colorbar : bool
    chance : float, "auto" or None
        What two unrelated experts would give (``"auto"``: the metric's
        :data:`~curvlens.views.baselines.CHANCE_LEVELS` entry, if any): marked on the
        colour bar and stated in the title.
    title : str, optional

    Returns
    -------
    matplotlib.axes.Axes
    """
    check_choice("limits", limits, ["natural", "data"])
    if isinstance(chance, str):
        check_choice("chance", chance, ["auto"])
        chance = CHANCE_LEVELS.get(metric)
    experts, out, _, _ = _pair_matrix(df, metric, weight=weight, experts=experts,
                                      diagonal=diagonal, filters=filters,
                                      what="pair_matrix_heatmap")
    vmin, vmax, center = _natural(metric, limits, vmin, vmax, center)
    n = len(experts)
    ax = new_axes(ax, (1.6 + 0.75 * n, 1.0 + 0.65 * n))
    cm, norm, use_log = color_setup(out, metric, log=log, cmap=cmap, vmin=vmin, vmax=vmax,
                                     center=center)
    im = ax.imshow(np.ma.masked_invalid(out), cmap=cm, norm=norm, interpolation="nearest")
    ax.set_xticks(range(n), experts, rotation=30 if max(map(len, map(str, experts))) > 6 else 0,
                  ha="right" if max(map(len, map(str, experts))) > 6 else "center")
    ax.set_yticks(range(n), experts)
    ax.tick_params(length=0)
    for s in ax.spines.values():
        s.set_visible(False)
    if annotate:
        fmt = common_format(out)
        for i in range(n):
            for j in range(n):
                if np.isfinite(out[i, j]):
                    ax.text(j, i, fmt(out[i, j]), ha="center", va="center", fontsize=8,
                            color=text_color_for(cm(norm(out[i, j]))))
    if colorbar:
        cbar = ax.figure.colorbar(im, ax=ax, shrink=0.85, pad=0.03,
                                  label=metric_label(metric) + (" (log scale)" if use_log else ""))
        if chance is not None and norm.vmin <= chance <= norm.vmax:   # the title says what the line is
            cbar.ax.axhline(chance, color="black", linewidth=1.5)
    if title is None:
        ft = filter_title(filters)
        title = metric_label(metric) + (f"\n{ft}" if ft else "")
    if chance is not None:
        title += f" (chance {fmt_sig(chance, 2)})"
    ax.set_title(title)
    return ax


def _natural(metric, limits, vmin, vmax, center):
    """Colour limits from the metric's natural range (signed ranges centre on 0)."""
    if limits != "natural" or metric not in METRIC_RANGES:
        return vmin, vmax, center
    lo, hi = METRIC_RANGES[metric]
    if lo < 0 and center is None:
        center = 0.0
    return (lo if vmin is None else vmin), (hi if vmax is None else vmax), center


def pair_matrix_plotly(df: pd.DataFrame, metric: str, *, colorscale: str | None = None,
                       zmin: float | None = None, zmax: float | None = None,
                       center: float | None = None, limits: str = "natural",
                       annotate: bool = True,
                       diagonal: float = np.nan, experts: Sequence[str] | None = None,
                       weight: str | None = "numel", title: str | None = None,
                       **filters: Any):
    """Interactive pair matrix (plotly). Hover: both experts, the value, how many
    tensors and parameters went into it. Arguments as :func:`pair_matrix_heatmap`.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    go = require_plotly()
    check_choice("limits", limits, ["natural", "data"])
    experts, out, count, numel = _pair_matrix(df, metric, weight=weight, experts=experts,
                                              diagonal=diagonal, filters=filters,
                                              what="pair_matrix_plotly")
    zmin, zmax, center = _natural(metric, limits, zmin, zmax, center)
    finite = out[np.isfinite(out)]
    kw: dict[str, Any] = plotly_color_kwargs(finite, metric, center=center, zmin=zmin, zmax=zmax,
                                             colorscale=colorscale)
    n = len(experts)
    custom = np.empty((n, n, 5), dtype=object)
    text = np.empty((n, n), dtype=object)
    for i in range(n):
        for j in range(n):
            custom[i, j] = [experts[i], experts[j], fmt_value(out[i, j]) or "n/a",
                            int(count[i, j]), f"{numel[i, j]:,.0f}"]
            text[i, j] = fmt_value(out[i, j])
    label = metric_label(metric)
    trace = go.Heatmap(
        z=out, x=experts, y=experts, customdata=custom, hoverongaps=False, xgap=2, ygap=2,
        colorbar={"title": {"text": label, "side": "right"}},
        hovertemplate=("%{customdata[0]} × %{customdata[1]}<br>" + label
                       + ": %{customdata[2]}<br>tensors: %{customdata[3]}, parameters: "
                       "%{customdata[4]}<extra></extra>"), **kw)
    if annotate:
        trace.update(text=text, texttemplate="%{text}")
    fig = go.Figure(trace)
    if title is None:
        ft = filter_title(filters)
        title = label + (f" ({ft})" if ft else "")
    fig.update_layout(title=title, template="plotly_white",
                      yaxis={"autorange": "reversed", "type": "category", "scaleanchor": "x"},
                      xaxis={"type": "category"}, width=260 + 80 * n, height=200 + 80 * n)
    return fig
