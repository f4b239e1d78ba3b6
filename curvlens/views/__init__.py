"""Layer 4, views: figures and reports drawn from analysis DataFrames (never from checkpoints).

Every figure comes twice: a static matplotlib function (``ax=None`` in, the Axes
or Figure out; never shows, never saves) and a ``*_plotly`` function returning an
interactive ``plotly.graph_objects.Figure`` whose hover names the tensor, layer,
role and value. The explorers compose the plotly figures with ipywidgets;
:func:`render_all` writes every static figure for a paper; :func:`result_html`,
:func:`html_repr` and :class:`ResultFrame` make results render themselves.

==========================  ======================================  =========================
figure                      static                                  interactive
==========================  ======================================  =========================
layer x role heatmap        ``layer_role_heatmap(s)``               ``layer_role_heatmap_plotly``
pair grid of log10 v        ``pair_grid``                           ``pair_grid_plotly``
log10 v histograms          ``log10_histogram(_grid)``              ``log10_histogram_plotly``
score vs density            ``density_curves``                      ``density_curves_plotly``
merge comparison            ``merge_scores``                        ``merge_scores_plotly``
expert-pair matrix          ``pair_matrix_heatmap``                 ``pair_matrix_plotly``
==========================  ======================================  =========================
"""
from curvlens.views._common import figure_style
from curvlens.views.curves import density_curves, density_curves_plotly, own_capability_scores
from curvlens.views.distributions import (
    histogram_steps, log10_histogram, log10_histogram_grid, log10_histogram_plotly,
)
from curvlens.views.explorers import (
    MERGE_SLIDERS, curvature_explorer, mask_explorer, merge_explorer,
)
from curvlens.views.figures import FRAME_KEYS, render_all, save_figure
from curvlens.views.heatmaps import (
    layer_role_heatmap, layer_role_heatmap_plotly, layer_role_heatmaps, layer_role_matrix,
)
from curvlens.views.merge_plots import OKABE_ITO, merge_scores_figure
from curvlens.views.merges import merge_scores, merge_scores_plotly, normalized_scores
from curvlens.views.pair_grid import pair_grid, pair_grid_plotly
from curvlens.views.pairs import pair_matrix, pair_matrix_heatmap, pair_matrix_plotly
from curvlens.views.rich import ResultFrame, figure_png, html_repr, result_html

__all__ = [
    "FRAME_KEYS", "MERGE_SLIDERS", "OKABE_ITO", "ResultFrame",
    "curvature_explorer", "density_curves", "density_curves_plotly", "figure_png",
    "figure_style", "histogram_steps", "html_repr", "layer_role_heatmap",
    "layer_role_heatmap_plotly", "layer_role_heatmaps", "layer_role_matrix",
    "log10_histogram", "log10_histogram_grid", "log10_histogram_plotly", "mask_explorer",
    "merge_explorer", "merge_scores", "merge_scores_figure", "merge_scores_plotly",
    "normalized_scores", "own_capability_scores", "pair_grid", "pair_grid_plotly",
    "pair_matrix", "pair_matrix_heatmap", "pair_matrix_plotly", "render_all", "result_html",
    "save_figure",
]
