"""Density vs score: how much of each expert's edit can be dropped, FFG vs magnitude.

Input is the ``graft_sweep`` frame (``expert, criterion, density, capability,
score``): each expert grafted onto the base at several densities by a pruning
criterion, then scored. One colour per expert, one line style per criterion
(FFG / Fisher solid, magnitude dashed). With a capability map (expert ->
capability) each expert is scored on its own capability.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from curvlens.errors import CurvlensError, check_choice
from curvlens.views._common import (
    CRITERION_STYLES, apply_filters, check_frame, check_numeric, color, criterion_label,
    filter_title, first_seen, new_axes, require_plotly, styled,
)

__all__ = ["own_capability_scores", "density_curves", "density_curves_plotly"]

_COLUMNS = ["expert", "criterion", "density", "capability", "score"]
_DASH = {"-": "solid", "--": "dash", ":": "dot", "-.": "dashdot"}


def own_capability_scores(sweep: pd.DataFrame,
                          capability_map: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One score per expert, criterion and density.

    With ``capability_map`` the score on the expert's own capability; without it
    the expert's only capability, or the mean over its capabilities (then the
    ``capability`` column reads ``"mean"``).

    Returns
    -------
    pandas.DataFrame
        Columns ``expert, criterion, density, capability, score``, sorted by density
        within each expert and criterion.

    Examples
    --------
    >>> import pandas as pd
    >>> sweep = pd.DataFrame({"expert": ["math"] * 4, "criterion": ["fisher"] * 4,
    ...                       "density": [0.1, 0.1, 1.0, 1.0],
    ...                       "capability": ["addition", "facts"] * 2,
    ...                       "score": [0.8, 0.1, 0.9, 0.2]})
    >>> own_capability_scores(sweep, {"math": "addition"})
      expert criterion  density capability  score
    0   math    fisher      0.1   addition    0.8
    1   math    fisher      1.0   addition    0.9
    """
    what = "own_capability_scores"
    check_frame(sweep, _COLUMNS, what)
    check_numeric(sweep, "density", what)
    check_numeric(sweep, "score", what)
    experts = first_seen(sweep["expert"])
    if capability_map is not None:
        missing = [e for e in experts if e not in capability_map]
        if missing:
            raise CurvlensError(f"{what}: capability_map has no capability for experts "
                                f"{missing} (map: {dict(capability_map)})")
        own = sweep["expert"].map(dict(capability_map))
        df = sweep[sweep["capability"] == own]
        lost = [e for e in experts if not (df["expert"] == e).any()]
        if lost:
            raise CurvlensError(
                f"{what}: no score on the own capability for experts {lost} "
                f"(capabilities present: {sorted(map(str, sweep['capability'].unique()))})")
    else:
        df = sweep
        n_caps = sweep.groupby("expert")["capability"].nunique()
        if (n_caps > 1).any():
            df = sweep.assign(capability="mean")
    out = (df.groupby(["expert", "criterion", "density", "capability"], sort=False)["score"]
           .mean().reset_index())
    order = {e: i for i, e in enumerate(experts)}
    out = out.assign(_e=out["expert"].map(order)).sort_values(
        ["_e", "criterion", "density"], kind="stable").drop(columns="_e")
    return out.reset_index(drop=True)


def _criteria_order(present) -> list[str]:
    known = [c for c in CRITERION_STYLES if c in present]
    return known + sorted(set(present) - set(known))


def _style(criteria: list[str]) -> dict[str, str]:
    fallback = iter(["--", ":", "-.", "-"])
    out = {}
    for c in criteria:
        s = CRITERION_STYLES.get(str(c).lower())
        out[c] = s if s is not None and s not in out.values() else next(fallback, "-")
    return out


def _select(sweep, capability_map, experts, criteria, filters, what):
    sweep = apply_filters(check_frame(sweep, _COLUMNS, what), filters, what)
    df = own_capability_scores(sweep, capability_map)
    all_experts = first_seen(df["expert"])
    experts = all_experts if experts is None else [check_choice("experts", e, all_experts)
                                                   for e in experts]
    all_crit = _criteria_order(first_seen(df["criterion"]))
    criteria = all_crit if criteria is None else [check_choice("criteria", c, all_crit)
                                                  for c in criteria]
    ylabel = ("accuracy on the expert's own capability" if capability_map is not None
              else "accuracy" if (df["capability"] != "mean").all()
              else "mean accuracy over capabilities")
    return df, experts, criteria, ylabel


def _density_ticks(densities: np.ndarray):
    d = np.unique(densities[np.isfinite(densities) & (densities > 0)])
    if d.size > 9:
        d = np.array([x for x in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
                      if d.min() <= x <= d.max()])
    return d, [f"{x:g}" for x in d]


@styled
def density_curves(sweep: pd.DataFrame, capability_map: Mapping[str, str] | None = None, *,
                   experts: Sequence[str] | None = None, criteria: Sequence[str] | None = None,
                   logx: bool = True, ax=None, title: str | None = None, **filters: Any):
    """Score vs density, one colour per expert, one line style per criterion (matplotlib).

    Parameters
    ----------
    sweep : pandas.DataFrame
        The ``graft_sweep`` frame.
    capability_map : mapping expert -> capability, optional
        Score each expert on its own capability (see :func:`own_capability_scores`).
    experts, criteria : sequence of str, optional
        Which lines (default: all; criteria in the order fisher, magnitude, others).
    logx : bool
        Log density axis (ticks at the densities swept).
    ax : matplotlib.axes.Axes, optional
    title : str, optional
    **filters
        Extra ``column=value`` filters on the sweep.

    Returns
    -------
    matplotlib.axes.Axes
        One line per expert and criterion, labelled ``"<expert> · <criterion>"``.
    """
    df, experts, criteria, ylabel = _select(sweep, capability_map, experts, criteria, filters,
                                            "density_curves")
    styles = _style(criteria)
    ax = new_axes(ax, (6.0, 3.6))
    for i, e in enumerate(experts):
        for c in criteria:
            rows = df[(df["expert"] == e) & (df["criterion"] == c)]
            if rows.empty:
                continue
            ax.plot(rows["density"].to_numpy(float), rows["score"].to_numpy(float),
                    color=color(i), linestyle=styles[c], marker="o",
                    markersize=3.5, label=f"{e} · {criterion_label(c)}")
    if logx:
        ax.set_xscale("log")
        ticks, labels = _density_ticks(df["density"].to_numpy(float))
        ax.set_xticks(ticks, labels)
        ax.minorticks_off()
    ax.set_xlabel("density (fraction of the task vector kept)")
    ax.set_ylabel(ylabel)
    s = df["score"].to_numpy(float)
    if np.nanmin(s) >= 0 and np.nanmax(s) <= 1:
        ax.set_ylim(0, 1.02)
    ax.grid(True, color="0.92", linewidth=0.6)
    from matplotlib.lines import Line2D

    h_exp = [Line2D([], [], color=color(i), lw=2) for i in range(len(experts))]
    h_crit = [Line2D([], [], color="0.2", ls=styles[c], lw=1.6) for c in criteria]
    first = ax.legend(h_exp, experts, title="expert", loc="upper left",
                      bbox_to_anchor=(1.01, 1.0))
    ax.add_artist(first)
    ax.legend(h_crit, [criterion_label(c) for c in criteria], title="criterion",
              loc="lower left", bbox_to_anchor=(1.01, 0.0))
    if title is None:
        ft = filter_title(filters)
        title = "Grafted expert score vs density" + (f" ({ft})" if ft else "")
    ax.set_title(title)
    return ax


def density_curves_plotly(sweep: pd.DataFrame, capability_map: Mapping[str, str] | None = None,
                          *, experts: Sequence[str] | None = None,
                          criteria: Sequence[str] | None = None, logx: bool = True,
                          title: str | None = None, **filters: Any):
    """Interactive score vs density (plotly). Hover: expert, criterion, capability,
    density, score. Arguments as :func:`density_curves`.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    go = require_plotly()
    df, experts, criteria, ylabel = _select(sweep, capability_map, experts, criteria, filters,
                                            "density_curves_plotly")
    styles = _style(criteria)
    fig = go.Figure()
    for i, e in enumerate(experts):
        for c in criteria:
            rows = df[(df["expert"] == e) & (df["criterion"] == c)]
            if rows.empty:
                continue
            fig.add_trace(go.Scatter(
                x=rows["density"].to_numpy(float), y=rows["score"].to_numpy(float),
                mode="lines+markers", name=f"{e} · {criterion_label(c)}", legendgroup=str(e),
                line={"color": color(i), "dash": _DASH[styles[c]]}, marker={"size": 6},
                customdata=rows["capability"].astype(str).to_numpy(),
                hovertemplate=(f"expert: {e}<br>criterion: {criterion_label(c)}<br>"
                               "capability: %{customdata}<br>density: %{x:g}<br>"
                               "score: %{y:.3f}<extra></extra>")))
    xaxis: dict[str, Any] = {"title": {"text": "density (fraction of the task vector kept)"}}
    if logx:
        ticks, labels = _density_ticks(df["density"].to_numpy(float))
        xaxis.update(type="log", tickvals=list(ticks), ticktext=labels)
    yaxis: dict[str, Any] = {"title": {"text": ylabel}}
    s = df["score"].to_numpy(float)
    if np.nanmin(s) >= 0 and np.nanmax(s) <= 1:
        yaxis["range"] = [0, 1.02]
    if title is None:
        ft = filter_title(filters)
        title = "Grafted expert score vs density" + (f" ({ft})" if ft else "")
    fig.update_layout(title=title, template="plotly_white", xaxis=xaxis, yaxis=yaxis,
                      legend_title_text="expert · criterion")
    return fig
