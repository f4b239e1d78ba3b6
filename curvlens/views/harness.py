"""Harness scores: each model's score per task, with its standard error.

Input is the frame :func:`curvlens.evaluators.score_models` returns (and ``curvlens
eval`` writes as ``scores.csv``): ``model, task, metric, value, stderr, selected,
status``. Only the selected metric of each task is drawn; failed rows are left out
of the bars (they are in the frame, with their error).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from curvlens.views._common import check_frame, color, first_seen, new_axes, require_plotly, styled

__all__ = ["harness_scores", "harness_scores_plotly"]

_COLUMNS = ["model", "task", "metric", "value", "stderr", "selected", "status"]


def _pivot(df: pd.DataFrame, what: str):
    check_frame(df, _COLUMNS, what)
    ok = df[df["selected"].astype(bool) & (df["status"] == "ok")]
    check_frame(ok, _COLUMNS, f"{what} (scored rows)")
    models, tasks = first_seen(ok["model"]), first_seen(ok["task"])
    value = ok.pivot_table(index="model", columns="task", values="value", sort=False).reindex(models)[tasks]
    err = ok.pivot_table(index="model", columns="task", values="stderr", sort=False, dropna=False)
    err = err.reindex(index=models, columns=tasks)
    labels = {t: f"{t}\n({ok[ok['task'] == t]['metric'].iloc[0]})" for t in tasks}
    return models, tasks, value.to_numpy(float), err.to_numpy(float), labels


@styled
def harness_scores(df: pd.DataFrame, *, ax=None, title: str | None = None):
    """Grouped bars: one group per task, one bar per model, the standard error as
    an error bar (matplotlib).

    Parameters
    ----------
    df : pandas.DataFrame
        ``model, task, metric, value, stderr, selected, status`` rows.
    ax : matplotlib.axes.Axes, optional
    title : str, optional

    Returns
    -------
    matplotlib.axes.Axes

    Examples
    --------
    >>> df = pd.DataFrame({"model": ["a", "b"], "task": "t", "metric": "acc", "value": [0.5, 0.7],
    ...                    "stderr": [0.05, 0.04], "selected": True, "status": "ok"})
    >>> [round(float(b.get_height()), 2) for b in harness_scores(df).patches]
    [0.5, 0.7]
    """
    models, tasks, value, err, labels = _pivot(df, "harness_scores")
    ax = new_axes(ax, (1.2 + 0.35 * len(models) * len(tasks) + 0.4 * len(tasks), 3.2))
    width = 0.8 / len(models)
    x = np.arange(len(tasks))
    for i, m in enumerate(models):
        ax.bar(x + (i - (len(models) - 1) / 2) * width, value[i], width, color=color(i), label=str(m),
               yerr=np.nan_to_num(err[i]), capsize=2, error_kw={"elinewidth": 0.8})
    ax.set_xticks(x, [labels[t] for t in tasks])
    ax.set_ylabel("score (± standard error)")
    ax.set_ylim(0, max(1.0, float(np.nanmax(value + np.nan_to_num(err))) * 1.05))
    ax.legend(frameon=False, fontsize="small", ncols=min(len(models), 4), loc="upper left",
              bbox_to_anchor=(0, 1.18))
    if title:
        ax.set_title(title)
    return ax


def harness_scores_plotly(df: pd.DataFrame, *, title: str | None = None):
    """Interactive twin of :func:`harness_scores`; hover: model, task, metric,
    value, standard error.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    go = require_plotly()
    models, tasks, value, err, labels = _pivot(df, "harness_scores_plotly")
    fig = go.Figure()
    for i, m in enumerate(models):
        fig.add_trace(go.Bar(
            x=[labels[t].replace("\n", "<br>") for t in tasks], y=value[i], name=str(m), marker_color=color(i),
            error_y={"type": "data", "array": np.nan_to_num(err[i]), "visible": True},
            customdata=np.stack([err[i]], axis=-1),
            hovertemplate=f"{m}<br>%{{x}}: %{{y:.4g}} ± %{{customdata[0]:.2g}}<extra></extra>"))
    fig.update_layout(barmode="group", yaxis_title="score (± standard error)", title=title,
                      template="simple_white", legend_title_text="model")
    return fig
