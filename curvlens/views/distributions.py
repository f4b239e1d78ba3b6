"""Histograms of log10 v per expert and role, from the ``log10_histogram`` frame.

The frame holds counts per bin (``expert, role, bin_left, bin_right, count``);
nothing is re-binned here. Counts of several roles (or experts) are summed bin by
bin, so the bins must agree between the groups summed.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd

from curvlens.errors import CurvlensError, check_choice
from curvlens.views._common import (
    apply_filters, check_frame, check_numeric, color, dashes, filter_title, first_seen, new_axes,
    require_plotly, role_order, styled,
)

__all__ = ["histogram_steps", "log10_histogram_plot", "log10_histogram_grid",
           "log10_histogram_plotly"]

_COLUMNS = ["expert", "role", "bin_left", "bin_right", "count"]
_STAT_LABEL = {"fraction": "fraction of entries", "count": "entries per bin"}


def histogram_steps(df: pd.DataFrame, *, stat: str = "fraction"
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Bin edges and heights from rows ``bin_left, bin_right, count`` (summed per bin).

    Gaps between bins become empty bins; bins that overlap without being equal
    raise CurvlensError (different binnings cannot be summed).

    Returns
    -------
    edges : ndarray, shape (n + 1,)
    heights : ndarray, shape (n,)
        Counts, or fractions of the total count when ``stat="fraction"``.

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({"bin_left": [-10.0, -9.0, -10.0, -7.0],
    ...                    "bin_right": [-9.0, -8.0, -9.0, -6.0], "count": [1, 2, 3, 2]})
    >>> edges, h = histogram_steps(df)
    >>> edges.tolist(), h.tolist()
    ([-10.0, -9.0, -8.0, -7.0, -6.0], [0.5, 0.25, 0.0, 0.25])
    """
    check_choice("stat", stat, ["fraction", "count"])
    g = (df.assign(count=pd.to_numeric(df["count"]))
         .groupby(["bin_left", "bin_right"], sort=True)["count"].sum().reset_index())
    left = g["bin_left"].to_numpy(dtype="float64")
    right = g["bin_right"].to_numpy(dtype="float64")
    counts = g["count"].to_numpy(dtype="float64")
    if (right <= left).any():
        raise CurvlensError("log10_histogram: every bin needs bin_right > bin_left")
    edges, heights = [left[0]], []
    tol = 1e-9 * max(1.0, float(np.abs(right).max()))
    for lo, hi, c in zip(left, right, counts):
        if lo < edges[-1] - tol:
            raise CurvlensError(
                f"log10_histogram: bins overlap ([{lo:g}, {hi:g}) starts before {edges[-1]:g}); "
                "the groups being summed were binned differently")
        if lo > edges[-1] + tol:  # a gap: an empty bin
            heights.append(0.0)
            edges.append(lo)
        heights.append(c)
        edges.append(hi)
    heights = np.asarray(heights)
    if stat == "fraction":
        total = heights.sum()
        heights = heights / total if total > 0 else heights
    return np.asarray(edges), heights


def _prepare(hist, filters, what):
    check_frame(hist, _COLUMNS, what)
    for c in ("bin_left", "bin_right", "count"):
        check_numeric(hist, c, what)
    hist = apply_filters(hist, filters, what)
    return hist.assign(role=hist["role"].astype(str))


def _groups(hist, column: str, values):
    present = role_order(hist[column]) if column == "role" else first_seen(hist[column])
    if values is None:
        return present
    values = list(values)
    for v in values:
        check_choice(column + "s", v, present)
    return values


def _draw_steps(ax, hist, hue: str, hues, stat: str, logy: bool, index=None):
    for i, h in enumerate(hues):
        edges, heights = histogram_steps(hist[hist[hue] == h], stat=stat)
        k = i if index is None else index[h]
        ax.stairs(heights, edges, label=str(h), color=color(k), linestyle=dashes(k),
                  linewidth=1.4, baseline=None if logy else 0)
    ax.set_xlabel("log10 v")
    ax.set_ylabel(_STAT_LABEL[stat])
    if logy:
        ax.set_yscale("log")


def occupied_range(hist: pd.DataFrame, pad: float = 0.5) -> tuple[float, float] | None:
    """The span of the bins that hold any entry, padded: the x range a histogram of
    ``hist`` needs (the frame's bins can cover far more, e.g. -30..0 around data in
    -13..-3). None when every count is 0.

    Examples
    --------
    >>> occupied_range(pd.DataFrame({"bin_left": [-30.0, -10.0, -9.0, -1.0], "bin_right": [-29.0, -9.0, -8.0, 0.0],
    ...                              "count": [0, 5, 2, 0]}))
    (-10.5, -7.5)
    """
    used = hist[pd.to_numeric(hist["count"]) > 0]
    if used.empty:
        return None
    return float(used["bin_left"].min()) - pad, float(used["bin_right"].max()) + pad


@styled
def log10_histogram_plot(hist: pd.DataFrame, *, hue: str = "expert",
                    hues: Sequence[str] | None = None, stat: str = "fraction",
                    logy: bool = False, ax=None, title: str | None = None,
                    legend: bool = True, **filters: Any):
    """Step histograms of log10 v on one Axes, one line per expert (or per role).

    Parameters
    ----------
    hist : pandas.DataFrame
        The ``log10_histogram`` frame.
    hue : {"expert", "role"}
        What the lines are; the other column is summed over (after ``filters``).
    hues : sequence of str, optional
        Which experts / roles, in this order (default: all).
    stat : {"fraction", "count"}
        Fraction of each line's entries per bin (comparable across sizes), or raw counts.
    logy : bool
        Log y axis (tails are easier to compare).
    ax : matplotlib.axes.Axes, optional
    title : str, optional
    legend : bool
    **filters
        e.g. ``role="q"`` or ``expert="math"``.

    Returns
    -------
    matplotlib.axes.Axes
    """
    check_choice("hue", hue, ["expert", "role"])
    what = "log10_histogram"
    hist = _prepare(hist, filters, what)
    hues = _groups(hist, hue, hues)
    ax = new_axes(ax, (5.0, 3.0))
    _draw_steps(ax, hist, hue, hues, stat, logy)
    span = occupied_range(hist[hist[hue].isin(hues)])
    if span is not None:
        ax.set_xlim(*span)
    if legend:
        ax.legend(title=hue, loc="best")
    if title is None:
        ft = filter_title(filters)
        title = "Distribution of log10 v" + (f" ({ft})" if ft else "")
    ax.set_title(title)
    return ax


@styled
def log10_histogram_grid(hist: pd.DataFrame, *, by: str = "role",
                         hues: Sequence[str] | None = None,
                         panels: Sequence[str] | None = None, stat: str = "fraction",
                         logy: bool = False, ncols: int | None = None, title: str | None = None,
                         **filters: Any):
    """Small multiples: one panel per role (lines: experts), or per expert (lines: roles).

    Parameters
    ----------
    by : {"role", "expert"}
        What the panels are.
    panels : sequence of str, optional
        Which panels, in order (default: all, roles in the fixed role order).
    hues : sequence of str, optional
        Which lines (default: all).
    stat, logy, title, **filters
        As :func:`log10_histogram_plot`.
    ncols : int, optional
        Panels per row (default: up to 4).

    Returns
    -------
    matplotlib.figure.Figure
        One legend, shared x and y axes.
    """
    import matplotlib.pyplot as plt

    what = "log10_histogram_grid"
    hist, hue, keys, hues, nrows, ncols = _panel_layout(hist, by, panels, hues, ncols, filters, what)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.3 * ncols + 1.2, 1.9 * nrows + 0.5),
                             squeeze=False, sharex=True, sharey=True)
    for k, key in enumerate(keys):
        ax = axes.flat[k]
        sub = hist[hist[by] == key]
        present = [h for h in hues if (sub[hue] == h).any()]
        _draw_steps(ax, sub, hue, present, stat, logy,
                    index={h: i for i, h in enumerate(hues)})
        ax.set_title(f"{by}: {key}")
        if k % ncols:
            ax.set_ylabel("")
        if k + ncols < len(keys):
            ax.set_xlabel("")
        else:   # the lowest panel of its column: its ticks are labelled even above an empty slot
            ax.tick_params(labelbottom=True)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    span = occupied_range(hist[hist[by].isin(keys) & hist[hue].isin(hues)])
    if span is not None:   # shared x: one call sets every panel
        axes.flat[0].set_xlim(*span)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=color(i), ls=dashes(i), lw=1.6) for i in range(len(hues))]
    fig.legend(handles, hues, title=hue, loc="outside right upper")
    if title is None:
        ft = filter_title(filters)
        title = f"Distribution of log10 v by {by}" + (f" ({ft})" if ft else "")
    fig.suptitle(title)
    return fig


def log10_histogram_plotly(hist: pd.DataFrame, *, by: str = "role",
                           hues: Sequence[str] | None = None,
                           panels: Sequence[str] | None = None, stat: str = "fraction",
                           logy: bool = False, ncols: int | None = None,
                           title: str | None = None, **filters: Any):
    """Interactive small-multiple histograms (plotly); legend entries toggle a line in
    every panel. Hover shows expert, role, the bin and its value.

    Arguments as :func:`log10_histogram_grid`.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    go = require_plotly()
    from plotly.subplots import make_subplots

    what = "log10_histogram_plotly"
    hist, hue, keys, hues, nrows, ncols = _panel_layout(hist, by, panels, hues, ncols, filters, what)
    fig = make_subplots(rows=nrows, cols=ncols, shared_xaxes=True, shared_yaxes=True,
                        subplot_titles=[f"{by}: {k}" for k in keys],
                        horizontal_spacing=0.03, vertical_spacing=0.12 if nrows > 1 else 0.1)
    for k, key in enumerate(keys):
        sub = hist[hist[by] == key]
        for i, h in enumerate(hues):
            rows = sub[sub[hue] == h]
            if rows.empty:
                continue
            edges, heights = histogram_steps(rows, stat=stat)
            x = np.repeat(edges, 2)[1:-1]
            y = np.repeat(heights, 2)
            expert, role = (h, key) if hue == "expert" else (key, h)
            fig.add_trace(go.Scatter(
                x=x, y=y, mode="lines", name=str(h), legendgroup=str(h), showlegend=(k == 0),
                line={"color": color(i), "width": 1.6,
                      "dash": {"-": "solid", "--": "dash", ":": "dot", "-.": "dashdot"}[dashes(i)]},
                customdata=np.repeat(np.column_stack([edges[:-1], edges[1:]]), 2, axis=0),
                hovertemplate=(f"expert: {expert}<br>role: {role}<br>"
                               "log10 v in [%{customdata[0]:.2f}, %{customdata[1]:.2f})<br>"
                               + _STAT_LABEL[stat] + ": %{y:.3g}<extra></extra>")),
                row=k // ncols + 1, col=k % ncols + 1)
    fig.update_xaxes(title_text="log10 v", row=nrows)
    span = occupied_range(hist[hist[by].isin(keys) & hist[hue].isin(hues)])
    if span is not None:
        fig.update_xaxes(range=list(span))
    fig.update_yaxes(title_text=_STAT_LABEL[stat], col=1, type="log" if logy else "linear")
    if logy:
        fig.update_yaxes(type="log")
    if title is None:
        ft = filter_title(filters)
        title = f"Distribution of log10 v by {by}" + (f" ({ft})" if ft else "")
    fig.update_layout(title=title, template="plotly_white", legend_title_text=hue,
                      height=120 + 230 * nrows, width=140 + 220 * ncols)
    return fig


def _panel_layout(hist, by, panels, hues, ncols, filters, what):
    """Shared by the static and plotly grids: filtered frame, hue column, panel
    keys, hue values and the (rows, columns) of the grid."""
    check_choice("by", by, ["role", "expert"])
    hist = _prepare(hist, filters, what)
    hue = "expert" if by == "role" else "role"
    keys = _groups(hist, by, panels)
    hues = _groups(hist, hue, hues)
    ncols = min(len(keys), 4) if ncols is None else max(1, int(ncols))   # 4: readable on a page
    return hist, hue, keys, hues, int(np.ceil(len(keys) / ncols)), ncols
