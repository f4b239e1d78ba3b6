"""Merge comparison figures: accuracy per capability per model or method."""
from __future__ import annotations

from curvlens.errors import CurvlensError

# Okabe-Ito: distinguishable with the common colour-vision deficiencies.
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000")


def _check_columns(df, needed, what):
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise CurvlensError(f"{what} needs columns {needed}; missing {missing}")


def merge_scores_figure(table, *, title: str = "Held-out accuracy per capability"):
    """Grouped bars: one group per capability, one bar per model/method (plotly).

    Parameters
    ----------
    table : pandas.DataFrame
        Columns ``model, capability, accuracy`` (as ``merge_table.csv``).

    Returns
    -------
    plotly.graph_objects.Figure
        Hover shows model, capability and accuracy.
    """
    import plotly.graph_objects as go

    _check_columns(table, ["model", "capability", "accuracy"], "merge_scores_figure")
    fig = go.Figure()
    capabilities = list(dict.fromkeys(table["capability"]))
    for i, (model, df) in enumerate(table.groupby("model", sort=False)):
        df = df.set_index("capability").reindex(capabilities)
        fig.add_bar(name=model, x=capabilities, y=df["accuracy"],
                    marker_color=OKABE_ITO[i % len(OKABE_ITO)],
                    hovertemplate=f"<b>{model}</b><br>%{{x}}: %{{y:.3f}}<extra></extra>")
    fig.update_layout(barmode="group", title=title, yaxis_title="exact-match accuracy",
                      yaxis_range=[0, 1.05], xaxis_title="capability", legend_title="model / merge",
                      template="plotly_white")
    return fig
