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

__all__ = ["own_capability_scores", "density_curves", "density_curve_panels", "density_curves_plotly"]

#: The x label of every score-vs-density figure (the axis is logarithmic by default).
DENSITY_LABEL = "density (fraction of the task vector kept)"
BASE_STYLE = {"linestyle": ":", "linewidth": 1.3}

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
                   logx: bool = True, base: Mapping[str, float] | None = None, ax=None,
                   title: str | None = None, **filters: Any):
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
        Log density axis (ticks at the densities swept; the axis label says so).
    base : mapping expert -> float, optional
        The base model's score on each expert's capability: where a graft falls
        back to at density 0, drawn as a dotted line in the expert's colour.
    ax : matplotlib.axes.Axes, optional
    title : str, optional
    **filters
        Extra ``column=value`` filters on the sweep.

    Returns
    -------
    matplotlib.axes.Axes
        One line per expert and criterion, labelled ``"<expert> · <criterion>"``;
        the y axis spans the data (and the base lines), not a fixed 0-1.
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
    bases = _base_values(base, experts)
    for i, e in enumerate(experts):
        if e in bases:
            ax.axhline(bases[e], color=color(i), zorder=1, **BASE_STYLE)
    _density_axes(ax, df, logx, ylabel, [*df["score"].to_numpy(float), *bases.values()])
    from matplotlib.lines import Line2D

    h_exp = [Line2D([], [], color=color(i), lw=2) for i in range(len(experts))]
    h_crit = [Line2D([], [], color="0.2", ls=styles[c], lw=1.6) for c in criteria]
    labels_crit = [criterion_label(c) for c in criteria]
    if bases:
        h_crit.append(Line2D([], [], color="0.2", **BASE_STYLE))
        labels_crit.append("base model (density 0)")
    first = ax.legend(h_exp, experts, title="expert", loc="upper left",
                      bbox_to_anchor=(1.01, 1.0))
    ax.add_artist(first)
    ax.legend(h_crit, labels_crit, title="criterion",
              loc="lower left", bbox_to_anchor=(1.01, 0.0))
    if title is None:
        ft = filter_title(filters)
        title = "Grafted expert score vs density" + (f" ({ft})" if ft else "")
    ax.set_title(title)
    return ax


def _base_values(base, experts) -> dict[str, float]:
    if base is None:
        return {}
    if not isinstance(base, Mapping):
        raise CurvlensError(f"base must be a mapping expert -> score; got {type(base).__name__}")
    unknown = sorted(set(map(str, base)) - set(map(str, experts)))
    if unknown:
        raise CurvlensError(f"base names experts {unknown} not in the sweep (experts: {list(experts)})")
    return {e: float(base[e]) for e in experts if e in base and np.isfinite(float(base[e]))}


def _density_axes(ax, df, logx: bool, ylabel: str, values) -> None:
    """Log density axis marked as such, y range fit to ``values`` (scores and base lines)."""
    if logx:
        ax.set_xscale("log")
        ticks, labels = _density_ticks(df["density"].to_numpy(float))
        ax.set_xticks(ticks, labels)
        ax.minorticks_off()
    ax.set_xlabel(DENSITY_LABEL + (", log scale" if logx else ""))
    ax.set_ylabel(ylabel)
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size:
        lo, hi = float(v.min()), float(v.max())
        pad = max(0.04 * (hi - lo), 0.01)
        bounded = lo >= 0 and hi <= 1
        ax.set_ylim(max(lo - pad, 0.0) if bounded else lo - pad, min(hi + pad, 1.02) if bounded else hi + pad)
    ax.grid(True, color="0.92", linewidth=0.6)


@styled
def density_curve_panels(sweep: pd.DataFrame, capability_map: Mapping[str, str] | None = None, *,
                         experts: Sequence[str] | None = None, criteria: Sequence[str] | None = None,
                         logx: bool = True, base: Mapping[str, float] | None = None,
                         expert_scores: Mapping[str, float] | None = None,
                         ncols: int | None = None, title: str | None = None, **filters: Any):
    """Score vs density, one panel per expert, each with its own y range (matplotlib).

    The single-axes :func:`density_curves` squeezes experts whose scores barely move
    into a sliver of a 0-1 axis when another expert falls to 0; here every expert's
    curves fill their panel. Each panel: FFG solid, magnitude dashed, the base
    model's score dotted (``base``) and the expert's own score as a thin grey line
    (``expert_scores``, expert -> score, e.g. from a merge table; default its
    density-1 point, when swept). Other arguments as :func:`density_curves`.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    df, experts, criteria, ylabel = _select(sweep, capability_map, experts, criteria, filters,
                                            "density_curve_panels")
    styles = _style(criteria)
    bases = _base_values(base, experts)
    owns = _base_values(expert_scores, experts)
    n = len(experts)
    ncols = min(n, 2 if n == 4 else 3) if ncols is None else max(1, int(ncols))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols + 1.6, 2.5 * nrows + 0.5), squeeze=False,
                             sharex=True)
    drew_own = False
    for i, e in enumerate(experts):
        ax = axes.flat[i]
        rows_e = df[df["expert"] == e]
        for c in criteria:
            rows = rows_e[rows_e["criterion"] == c]
            ax.plot(rows["density"].to_numpy(float), rows["score"].to_numpy(float), color=color(i),
                    linestyle=styles[c], marker="o", markersize=3.5, label=criterion_label(c))
        full = rows_e.loc[rows_e["density"] >= 1.0, "score"]
        values = list(rows_e["score"].to_numpy(float))
        own = owns.get(e, float(full.mean()) if len(full) else None)
        if own is not None:
            ax.axhline(own, color="0.6", linewidth=0.8, zorder=1)
            values.append(own)
            drew_own = True
        if e in bases:
            ax.axhline(bases[e], color=color(i), zorder=1, **BASE_STYLE)
            values.append(bases[e])
        _density_axes(ax, rows_e, logx, "", values)
        if i // ncols != nrows - 1 and i + ncols < n:
            ax.set_xlabel("")
        cap = rows_e["capability"].iloc[0] if len(rows_e) else ""
        ax.set_title(f"{e}" + (f" (on {cap})" if cap and cap != "mean" else ""))
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    handles = [Line2D([], [], color="0.2", ls=styles[c], lw=1.6) for c in criteria]
    labels = [criterion_label(c) for c in criteria]
    if drew_own:
        handles.append(Line2D([], [], color="0.6", lw=0.8))
        labels.append("the expert (density 1)")
    if bases:
        handles.append(Line2D([], [], color="0.2", **BASE_STYLE))
        labels.append("base model (density 0)")
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels))
    fig.supylabel(ylabel, fontsize=9)
    if title is None:
        ft = filter_title(filters)
        title = "Grafted expert score vs density" + (f" ({ft})" if ft else "")
    fig.suptitle(title)
    return fig


def density_curves_plotly(sweep: pd.DataFrame, capability_map: Mapping[str, str] | None = None,
                          *, experts: Sequence[str] | None = None,
                          criteria: Sequence[str] | None = None, logx: bool = True,
                          base: Mapping[str, float] | None = None,
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
    bases = _base_values(base, experts)
    for i, e in enumerate(experts):
        if e in bases:
            fig.add_hline(y=bases[e], line_dash="dot", line_color=color(i),
                          annotation_text=f"base ({e})", annotation_position="bottom right")
    xaxis: dict[str, Any] = {"title": {"text": DENSITY_LABEL + (", log scale" if logx else "")}}
    if logx:
        ticks, labels = _density_ticks(df["density"].to_numpy(float))
        xaxis.update(type="log", tickvals=list(ticks), ticktext=labels)
    yaxis: dict[str, Any] = {"title": {"text": ylabel}}
    v = np.asarray([*df["score"].to_numpy(float), *bases.values()], dtype=float)
    v = v[np.isfinite(v)]
    if v.size:   # the data's range, padded (not a fixed 0-1)
        pad = max(0.04 * float(v.max() - v.min()), 0.01)
        yaxis["range"] = [float(v.min()) - pad, float(v.max()) + pad]
    if title is None:
        ft = filter_title(filters)
        title = "Grafted expert score vs density" + (f" ({ft})" if ft else "")
    fig.update_layout(title=title, template="plotly_white", xaxis=xaxis, yaxis=yaxis,
                      legend_title_text="expert · criterion")
    return fig
