"""Adam ``exp_avg_sq`` against a data Fisher, drawn from :func:`curvlens.fisher_vs_adam`'s frame."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from curvlens.errors import CurvlensError
from curvlens.views._common import check_frame, check_numeric, color, first_seen, metric_label, styled

_COLUMNS = ("analysis", "curvature", "expert_a", "expert_b", "method", "metric", "value")


@styled
def fisher_vs_adam_plot(df: pd.DataFrame, *, metrics: Sequence[str] = ("cosine", "spearman_log", "jaccard_top10"),
                        pair_metric: str = "spearman_log", figsize=None):
    """Three panels: per expert, how Adam v agrees with the Fisher (overlap metrics
    and FFG-mask Jaccard); per expert pair, the overlap under Adam v against that
    under the Fisher; the OTA+FFG merge scores with each curvature.

    Panels whose rows the frame lacks (no merges evaluated, one expert only) are
    left out.

    Parameters
    ----------
    df : pandas.DataFrame
        :func:`curvlens.fisher_vs_adam`'s frame.
    metrics : sequence of str
        Overlap metrics of the first panel (the mask Jaccard is always added).
    pair_metric : str
        Overlap metric of the between-expert panel.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    what = "fisher_vs_adam_plot"
    check_frame(df, _COLUMNS, what)
    df = df.assign(value=check_numeric(df, "value", what))
    same = df[(df["curvature"] == "adam~fisher")]
    pairs = df[(df["analysis"] == "curvature_overlap") & (df["metric"] == pair_metric)
               & df["curvature"].isin(["adam", "fisher"])]
    scores = df[df["analysis"] == "merge_score"]
    panels = [p for p, rows in (("same", same), ("pairs", pairs), ("scores", scores)) if len(rows)]
    if not panels:
        raise CurvlensError(f"{what}: the frame has no rows of fisher_vs_adam's analyses")
    fig, axes = plt.subplots(1, len(panels), figsize=figsize or (4.6 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "same":
            _same_panel(ax, same, metrics)
        elif panel == "pairs":
            _pairs_panel(ax, pairs, pair_metric)
        else:
            _scores_panel(ax, scores)
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


def _same_panel(ax, same: pd.DataFrame, metrics) -> None:
    experts = first_seen(same["expert_a"])
    series = []
    for m in metrics:
        rows = same[same["metric"] == m]
        if len(rows):
            series.append((metric_label(m), dict(zip(rows["expert_a"], rows["value"]))))
    masks = same[same["analysis"] == "mask_jaccard"]
    for m in first_seen(masks["metric"]):
        rows = masks[masks["metric"] == m]
        series.append((f"FFG mask Jaccard ({m.split('@')[-1]})", dict(zip(rows["expert_a"], rows["value"]))))
    _bars(ax, experts, series)
    ax.set_title("Adam v vs data Fisher, same expert")


def _pairs_panel(ax, pairs: pd.DataFrame, metric: str) -> None:
    key = pairs["expert_a"] + " / " + pairs["expert_b"].astype(str)
    adam = dict(zip(key[pairs["curvature"] == "adam"], pairs.loc[pairs["curvature"] == "adam", "value"]))
    fisher = dict(zip(key[pairs["curvature"] == "fisher"], pairs.loc[pairs["curvature"] == "fisher", "value"]))
    both = [k for k in adam if k in fisher]
    xs, ys = [adam[k] for k in both], [fisher[k] for k in both]
    ax.scatter(xs, ys, color=color(0))
    for k, x, y in zip(both, xs, ys):
        ax.annotate(k, (x, y), fontsize="x-small", xytext=(3, 3), textcoords="offset points")
    lo = min([0.0, *xs, *ys])
    hi = max([1e-9, *xs, *ys]) * 1.1
    ax.plot([lo, hi], [lo, hi], color="0.6", lw=0.8, ls="--")
    ax.set_xlabel(f"{metric_label(metric)}, Adam v")
    ax.set_ylabel(f"{metric_label(metric)}, Fisher")
    ax.set_title("Between experts")


def _scores_panel(ax, scores: pd.DataFrame) -> None:
    caps = first_seen(scores["expert_a"])
    labels = scores["method"].fillna("merge").astype(str) + " with " + scores["curvature"].astype(str)
    series = [(lab, dict(zip(scores.loc[labels == lab, "expert_a"], scores.loc[labels == lab, "value"])))
              for lab in first_seen(labels)]
    _bars(ax, caps, series)
    ax.set_ylabel("accuracy")
    ax.set_title("Merge scores by curvature")
