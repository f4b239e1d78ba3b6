"""Merge comparison: accuracy per capability per model / method, raw or relative to
the matching expert (negative transfer shows as a value below 1).

Input is a merge table (``model, method, capability, accuracy, n``, as the demo's
``merge_table.csv``). The expert for a capability is found through a capability
map (expert -> capability); its row is the model named ``"expert: <expert>"``
(``expert_model`` changes the pattern).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from curvlens.errors import CurvlensError, check_choice
from curvlens.views._common import (
    CATEGORICAL, apply_filters, check_frame, check_numeric, color, first_seen, new_axes,
    require_plotly, styled,
)

__all__ = ["normalized_scores", "merge_scores", "merge_scores_plotly"]

_COLUMNS = ["model", "capability", "accuracy"]
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_PLOTLY_MARKERS = ("circle", "square", "triangle-up", "diamond", "triangle-down", "cross",
                   "x", "star")


def normalized_scores(table: pd.DataFrame, capability_map: Mapping[str, str], *,
                      expert_model: str = "expert: {expert}") -> pd.DataFrame:
    """Each model's accuracy divided by the accuracy of the capability's own expert.

    Parameters
    ----------
    table : pandas.DataFrame
        Merge table with columns ``model, capability, accuracy`` (``method, n`` kept
        when present).
    capability_map : mapping expert -> capability
    expert_model : str
        How an expert's model is named in ``table`` (``{expert}`` is replaced).

    Returns
    -------
    pandas.DataFrame
        The table's rows for capabilities that have an expert, plus ``expert``,
        ``expert_accuracy`` and ``relative = accuracy / expert_accuracy`` (NaN where
        the expert scores 0).

    Examples
    --------
    >>> import pandas as pd
    >>> t = pd.DataFrame({"model": ["expert: math", "OTA"], "method": ["expert", "ota"],
    ...                   "capability": ["addition", "addition"], "accuracy": [0.8, 0.6], "n": 50})
    >>> normalized_scores(t, {"math": "addition"})[["model", "relative"]]
              model  relative
    0  expert: math      1.00
    1           OTA      0.75
    """
    what = "normalized_scores"
    check_frame(table, _COLUMNS, what)
    check_numeric(table, "accuracy", what)
    rows = []
    models = set(table["model"])
    for expert, cap in capability_map.items():
        label = expert_model.format(expert=expert)
        if label not in models:
            raise CurvlensError(f"{what}: no model {label!r} in the table for expert {expert!r} "
                                f"(models: {sorted(map(str, models))})")
        ref = table[(table["model"] == label) & (table["capability"] == cap)]
        if ref.empty:
            raise CurvlensError(f"{what}: model {label!r} has no score on {cap!r}")
        rows.append((cap, expert, float(ref["accuracy"].mean())))
    caps = pd.DataFrame(rows, columns=["capability", "expert", "expert_accuracy"])
    if caps["capability"].duplicated().any():
        dup = caps[caps["capability"].duplicated(keep=False)]
        raise CurvlensError(f"{what}: several experts share a capability: "
                            f"{dup[['expert', 'capability']].values.tolist()}")
    out = table.merge(caps, on="capability", how="inner")
    acc = out["accuracy"].to_numpy(float)
    ref = out["expert_accuracy"].to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["relative"] = np.where(ref > 0, acc / ref, np.nan)
    return out


def _prepare(table, capability_map, normalized, models, capabilities, expert_model, filters,
             what):
    check_frame(table, _COLUMNS, what)
    table = apply_filters(table, filters, what)
    if normalized:
        if capability_map is None:
            raise CurvlensError(f"{what}: normalized=True needs a capability_map "
                                "(expert -> capability)")
        table = normalized_scores(table, capability_map, expert_model=expert_model)
        value, label = "relative", "accuracy / matching expert's accuracy"
    else:
        check_numeric(table, "accuracy", what)
        value, label = "accuracy", "exact-match accuracy"
    all_models = first_seen(table["model"])
    all_caps = first_seen(table["capability"])
    models = all_models if models is None else [check_choice("models", m, all_models)
                                                for m in models]
    capabilities = all_caps if capabilities is None else [
        check_choice("capabilities", c, all_caps) for c in capabilities]
    table = table[table["model"].isin(models) & table["capability"].isin(capabilities)]
    pivot = (table.groupby(["model", "capability"], sort=False)[value].mean()
             .unstack("capability").reindex(index=models, columns=capabilities))
    return table, pivot, value, label


@styled
def merge_scores(table: pd.DataFrame, capability_map: Mapping[str, str] | None = None, *,
                 normalized: bool = False, kind: str = "dots",
                 models: Sequence[str] | None = None,
                 capabilities: Sequence[str] | None = None, ax=None,
                 expert_model: str = "expert: {expert}", title: str | None = None,
                 **filters: Any):
    """Score per capability per model (matplotlib): a dot plot or grouped bars.

    Parameters
    ----------
    table : pandas.DataFrame
        Merge table (``model, method, capability, accuracy, n``).
    capability_map : mapping expert -> capability, optional
        Needed for ``normalized=True``.
    normalized : bool
        Plot accuracy / the matching expert's accuracy, with a reference line at 1:
        values below it are negative transfer.
    kind : {"dots", "bars"}
        ``dots``: one row per model, one marker per capability (readable with many
        models). ``bars``: one group per capability, one bar per model.
    models, capabilities : sequence of str, optional
        Which, in this order (default: all, in table order).
    ax : matplotlib.axes.Axes, optional
    expert_model : str
        Pattern of expert model names (see :func:`normalized_scores`).
    title : str, optional
    **filters
        e.g. ``method=["ota", "ties"]``.

    Returns
    -------
    matplotlib.axes.Axes
    """
    check_choice("kind", kind, ["dots", "bars"])
    _, pivot, value, label = _prepare(table, capability_map, normalized, models, capabilities,
                                      expert_model, filters, "merge_scores")
    models, caps = list(pivot.index), list(pivot.columns)
    vals = pivot.to_numpy(float)
    if kind == "dots":
        ax = new_axes(ax, (6.0, 0.8 + 0.3 * len(models)))
        y = np.arange(len(models))
        # dodge the capabilities a little so equal scores stay visible
        dodge = 0.5 / max(len(caps), 1)
        for j, cap in enumerate(caps):
            ax.scatter(vals[:, j], y + dodge * (j - (len(caps) - 1) / 2),
                       marker=_MARKERS[j % len(_MARKERS)], color=color(j), s=30,
                       label=str(cap), zorder=3, edgecolor="white", linewidth=0.4)
        ax.set_yticks(y, models)
        ax.set_ylim(len(models) - 0.5, -0.5)
        ax.grid(True, axis="x", color="0.9", linewidth=0.6)
        for k in range(len(models)):
            ax.axhline(k, color="0.95", linewidth=0.5, zorder=0)
        ax.set_xlabel(label)
        if normalized:
            ax.axvline(1.0, color="0.2", linestyle="--", linewidth=1.0, zorder=2)
        _limits(ax, vals, normalized, axis="x")
        ax.legend(title="capability", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax = new_axes(ax, (1.5 + 0.22 * len(models) * len(caps), 3.4))
        width = 0.8 / len(models)
        x = np.arange(len(caps))
        for i, m in enumerate(models):
            hatch = None if i < len(CATEGORICAL) else "//"
            ax.bar(x - 0.4 + width * (i + 0.5), vals[i], width=width, color=color(i),
                   hatch=hatch, label=str(m), edgecolor="white", linewidth=0.4)
        ax.set_xticks(x, caps)
        ax.set_xlabel("capability")
        ax.set_ylabel(label)
        if normalized:
            ax.axhline(1.0, color="0.2", linestyle="--", linewidth=1.0, zorder=2)
        _limits(ax, vals, normalized, axis="y")
        ax.legend(title="model / merge", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title is None:
        title = ("Accuracy relative to the matching expert" if normalized
                 else "Held-out accuracy per capability")
    ax.set_title(title)
    return ax


def _top(vals, normalized) -> float:
    hi = float(np.nanmax(vals)) if np.isfinite(vals).any() else 1.0
    return max(1.05, hi * 1.05) if normalized else (1.02 if hi <= 1 else hi * 1.05)


def _limits(ax, vals, normalized, axis):
    (ax.set_xlim if axis == "x" else ax.set_ylim)(0, _top(vals, normalized))


def merge_scores_figure(table: pd.DataFrame, *, title: str = "Held-out accuracy per capability"):
    """Grouped bars: one group per capability, one bar per model/method (plotly);
    :func:`merge_scores_plotly` with ``kind="bars"`` (``report.html``'s figure).

    Parameters
    ----------
    table : pandas.DataFrame
        Columns ``model, capability, accuracy`` (as ``merge_table.csv``).

    Returns
    -------
    plotly.graph_objects.Figure
        Hover shows model, capability and accuracy.
    """
    return merge_scores_plotly(table, kind="bars", title=title)


def merge_scores_plotly(table: pd.DataFrame, capability_map: Mapping[str, str] | None = None,
                        *, normalized: bool = False, kind: str = "dots",
                        models: Sequence[str] | None = None,
                        capabilities: Sequence[str] | None = None,
                        expert_model: str = "expert: {expert}", title: str | None = None,
                        **filters: Any):
    """Interactive merge comparison (plotly). Hover: model, method, capability,
    accuracy, n (and the expert's accuracy when normalized). Arguments as
    :func:`merge_scores`.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    go = require_plotly()
    check_choice("kind", kind, ["dots", "bars"])
    tab, pivot, value, label = _prepare(table, capability_map, normalized, models,
                                        capabilities, expert_model, filters,
                                        "merge_scores_plotly")
    models, caps = list(pivot.index), list(pivot.columns)
    tab = tab.assign(method=tab["method"] if "method" in tab else "",
                     n=tab["n"] if "n" in tab else np.nan)
    extra = ("<br>expert %{customdata[3]}: %{customdata[4]:.3f}" if normalized else "")

    def custom(rows):
        cols = ["model", "method", "capability"] + (["expert", "expert_accuracy"]
                                                     if normalized else [])
        return rows[cols + ["n"]].to_numpy(dtype=object)

    n_idx = 5 if normalized else 3
    hover = ("<b>%{customdata[0]}</b> (%{customdata[1]})<br>capability: %{customdata[2]}<br>"
             + label + ": %{" + ("x" if kind == "dots" else "y") + ":.3f}" + extra
             + "<br>n = %{customdata[" + str(n_idx) + "]}<extra></extra>")
    fig = go.Figure()
    top = _top(pivot.to_numpy(float), normalized)
    if kind == "dots":
        dodge = 0.5 / max(len(caps), 1)
        for j, cap in enumerate(caps):
            rows = tab[tab["capability"] == cap].groupby("model", sort=False).first()
            rows = rows.reindex(models).reset_index()
            # numeric rows, dodged per capability so equal scores stay visible
            y = np.arange(len(models)) + dodge * (j - (len(caps) - 1) / 2)
            fig.add_trace(go.Scatter(
                x=rows[value], y=y, mode="markers", name=str(cap),
                marker={"color": color(j), "size": 10,
                        "symbol": _PLOTLY_MARKERS[j % len(_PLOTLY_MARKERS)]},
                customdata=custom(rows), hovertemplate=hover))
        fig.update_layout(xaxis={"title": {"text": label}, "range": [0, top]},
                          yaxis={"autorange": "reversed", "tickvals": list(range(len(models))),
                                 "ticktext": models, "zeroline": False},
                          legend_title_text="capability", height=160 + 30 * len(models))
        if normalized:
            fig.add_vline(x=1.0, line_dash="dash", line_color="#555")
    else:
        for i, m in enumerate(models):
            rows = tab[tab["model"] == m].groupby("capability", sort=False).first()
            rows = rows.reindex(caps).reset_index()
            rows["model"] = m
            marker: dict[str, Any] = {"color": color(i)}
            if i >= len(CATEGORICAL):   # colours repeat: add a pattern
                marker["pattern"] = {"shape": "/"}
            fig.add_trace(go.Bar(x=rows["capability"], y=rows[value], name=str(m),
                                 marker=marker, customdata=custom(rows), hovertemplate=hover))
        fig.update_layout(barmode="group", xaxis_title="capability",
                          yaxis={"title": {"text": label}, "range": [0, top]},
                          legend_title_text="model / merge")
        if normalized:
            fig.add_hline(y=1.0, line_dash="dash", line_color="#555")
    if title is None:
        title = ("Accuracy relative to the matching expert" if normalized
                 else "Held-out accuracy per capability")
    fig.update_layout(title=title, template="plotly_white")
    return fig
