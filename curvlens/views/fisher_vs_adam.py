"""Adam ``exp_avg_sq`` against a data Fisher, drawn from :func:`curvlens.fisher_vs_adam`'s frame.

Three panels: per expert, how Adam v agrees with the Fisher (overlap metrics and the
FFG-mask Jaccard); per expert pair, the overlap under Adam v against that under the
Fisher; the merge scores with each curvature. Panels whose rows the frame lacks (no
merges evaluated, one expert only) are left out.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from curvlens.errors import CurvlensError
from curvlens.views._common import (
    check_frame, check_numeric, color, first_seen, metric_label, require_plotly, styled,
)

_COLUMNS = ("analysis", "curvature", "expert_a", "expert_b", "method", "metric", "value")
_TITLES = {"same": "Adam v vs data Fisher, same expert", "pairs": "Between experts",
           "scores": "Merge scores by curvature"}


def _panels(df: pd.DataFrame, metrics: Sequence[str], pair_metric: str, what: str) -> list[tuple[str, dict]]:
    """(panel, data) for each panel the frame has rows for: bar panels give
    ``groups`` and ``series`` [(label, {group: value})]; the pair panel ``labels, x, y``."""
    check_frame(df, _COLUMNS, what)
    df = df.assign(value=check_numeric(df, "value", what))
    out = []
    same = df[df["curvature"] == "adam~fisher"]
    if len(same):
        series = []
        for m in metrics:
            rows = same[(same["analysis"] == "curvature_overlap") & (same["metric"] == m)]
            if len(rows):
                series.append((metric_label(m), dict(zip(rows["expert_a"], rows["value"]))))
        masks = same[same["analysis"] == "mask_jaccard"]
        for m in first_seen(masks["metric"]):
            rows = masks[masks["metric"] == m]
            series.append((f"FFG mask Jaccard ({m.split('@')[-1]})", dict(zip(rows["expert_a"], rows["value"]))))
        out.append(("same", {"groups": first_seen(same["expert_a"]), "series": series}))
    pairs = df[(df["analysis"] == "curvature_overlap") & (df["metric"] == pair_metric)
               & df["curvature"].isin(["adam", "fisher"])]
    if len(pairs):
        key = pairs["expert_a"].astype(str) + " / " + pairs["expert_b"].astype(str)
        by = {c: dict(zip(key[pairs["curvature"] == c], pairs.loc[pairs["curvature"] == c, "value"]))
              for c in ("adam", "fisher")}
        labels = [k for k in by["adam"] if k in by["fisher"]]
        out.append(("pairs", {"labels": labels, "x": [by["adam"][k] for k in labels],
                              "y": [by["fisher"][k] for k in labels], "metric": pair_metric}))
    scores = df[df["analysis"] == "merge_score"]
    if len(scores):
        labels = scores["method"].fillna("merge").astype(str) + " with " + scores["curvature"].astype(str)
        series = [(lab, dict(zip(scores.loc[labels == lab, "expert_a"], scores.loc[labels == lab, "value"])))
                  for lab in first_seen(labels)]
        out.append(("scores", {"groups": first_seen(scores["expert_a"]), "series": series}))
    if not out:
        raise CurvlensError(f"{what}: the frame has no rows of fisher_vs_adam's analyses")
    return out


@styled
def fisher_vs_adam_plot(df: pd.DataFrame, *, metrics: Sequence[str] = ("cosine", "spearman_log", "jaccard_top10"),
                        pair_metric: str = "spearman_log", figsize=None):
    """Adam v against the data Fisher in up to three panels (see the module docstring).

    Parameters
    ----------
    df : pandas.DataFrame
        :func:`curvlens.fisher_vs_adam`'s frame.
    metrics : sequence of str
        Overlap metrics of the first panel (the mask Jaccard is always added).
    pair_metric : str
        Overlap metric of the between-expert panel.
    figsize : (float, float), optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    panels = _panels(df, metrics, pair_metric, "fisher_vs_adam_plot")
    fig, axes = plt.subplots(1, len(panels), figsize=figsize or (4.6 * len(panels), 3.8), squeeze=False)
    for ax, (panel, data) in zip(axes[0], panels):
        if panel == "pairs":
            _pairs(ax, data)
        else:
            _bars(ax, data["groups"], data["series"])
            if panel == "scores":
                ax.set_ylabel("accuracy")
        ax.set_title(_TITLES[panel])
    return fig


def fisher_vs_adam_plotly(df: pd.DataFrame, *, metrics: Sequence[str] = ("cosine", "spearman_log", "jaccard_top10"),
                          pair_metric: str = "spearman_log"):
    """Interactive twin of :func:`fisher_vs_adam_plot`. Hover: expert (or pair or
    capability), series and value.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    go = require_plotly()
    from plotly.subplots import make_subplots

    panels = _panels(df, metrics, pair_metric, "fisher_vs_adam_plotly")
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[_TITLES[p] for p, _ in panels])
    for col, (panel, data) in enumerate(panels, start=1):
        if panel == "pairs":
            fig.add_trace(go.Scatter(x=data["x"], y=data["y"], mode="markers", text=data["labels"],
                                     marker={"color": color(0), "size": 9}, showlegend=False,
                                     hovertemplate="<b>%{text}</b><br>Adam v: %{x:.3f}<br>Fisher: %{y:.3f}"
                                                   "<extra></extra>"), row=1, col=col)
            hi = max([1e-9, *data["x"], *data["y"]]) * 1.1
            fig.add_trace(go.Scatter(x=[0, hi], y=[0, hi], mode="lines", showlegend=False, hoverinfo="skip",
                                     line={"color": "#999", "dash": "dash", "width": 1}), row=1, col=col)
            fig.update_xaxes(title_text=f"{metric_label(data['metric'])}, Adam v", row=1, col=col)
            fig.update_yaxes(title_text=f"{metric_label(data['metric'])}, Fisher", row=1, col=col)
            continue
        for i, (label, values) in enumerate(data["series"]):
            fig.add_trace(go.Bar(x=data["groups"], y=[values.get(g, np.nan) for g in data["groups"]], name=label,
                                 marker={"color": color(i)},
                                 hovertemplate="<b>%{x}</b><br>" + label + ": %{y:.3f}<extra></extra>"),
                          row=1, col=col)
        fig.update_yaxes(range=[0, 1.05], row=1, col=col)
    fig.update_layout(barmode="group", height=420, width=430 * len(panels))
    return fig


def _bars(ax, groups: list, series: list[tuple[str, dict]]) -> None:
    x = np.arange(len(groups))
    width = 0.8 / max(1, len(series))
    for i, (label, values) in enumerate(series):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, [values.get(g, np.nan) for g in groups], width,
               label=label, color=color(i))
    ax.set_xticks(x, groups, rotation=20)
    ax.set_ylim(0, 1.45)  # room for the legend above the bars
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.legend(fontsize="small", frameon=False, ncol=2, loc="upper center")


def _pairs(ax, data: dict) -> None:
    xs, ys = data["x"], data["y"]
    ax.scatter(xs, ys, color=color(0))
    for k, x, y in zip(data["labels"], xs, ys):
        ax.annotate(k, (x, y), fontsize="x-small", xytext=(3, 3), textcoords="offset points")
    lo = min([0.0, *xs, *ys])
    hi = max([1e-9, *xs, *ys]) * 1.1
    ax.plot([lo, hi], [lo, hi], color="0.6", lw=0.8, ls="--")
    ax.set_xlabel(f"{metric_label(data['metric'])}, Adam v")
    ax.set_ylabel(f"{metric_label(data['metric'])}, Fisher")
