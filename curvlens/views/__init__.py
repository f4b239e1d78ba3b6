"""Layer 4, views: figures and reports drawn from analysis DataFrames (never from checkpoints).

Every figure comes twice: a static matplotlib function (``ax=None`` in, the Axes
or Figure out; never shows, never saves) and a ``*_plotly`` function returning an
interactive ``plotly.graph_objects.Figure`` whose hover names the tensor, layer,
role and value. The explorers compose the plotly figures with ipywidgets, and
:func:`figure_sliders` redraws any figure from sliders;
:func:`render_all` writes every static figure for a paper; ``curvlens.views.rich``
makes results render themselves in a notebook.

==========================  ======================================  =========================
figure                      static                                  interactive
==========================  ======================================  =========================
layer x role heatmap        ``layer_role_heatmap(s)``               ``layer_role_heatmap_plotly``
pair grid of log10 v        ``pair_grid``                           ``pair_grid_plotly``
log10 v histograms          ``log10_histogram_plot`` / ``_grid``    ``log10_histogram_plotly``
score vs density            ``density_curves`` / ``_panels``        ``density_curves_plotly``
merge comparison            ``merge_scores``                        ``merge_scores_plotly``
lm-eval scores ± stderr     ``harness_scores``                      ``harness_scores_plotly``
expert-pair matrix          ``pair_matrix_heatmap``                 ``pair_matrix_plotly``
Adam v vs data Fisher       ``fisher_vs_adam_plot``                 ``fisher_vs_adam_plotly``
greedy soup path            ``soup_curve`` (a Figure)               ``soup_curve_plotly``
Pareto fronts               ``front_plot`` (a Figure)               ``front_plot_plotly``
==========================  ======================================  =========================
"""
from curvlens.views._common import OKABE_ITO, figure_style
from curvlens.views.curves import density_curve_panels, density_curves, density_curves_plotly
from curvlens.views.distributions import log10_histogram_grid, log10_histogram_plot, log10_histogram_plotly
from curvlens.views.explorers import curvature_explorer, mask_explorer
from curvlens.views.merge_explorer import merge_explorer
from curvlens.views.figures import render_all
from curvlens.views.fisher_vs_adam import fisher_vs_adam_plot, fisher_vs_adam_plotly
from curvlens.views.harness import harness_scores, harness_scores_plotly
from curvlens.views.heatmaps import layer_role_heatmap, layer_role_heatmap_plotly, layer_role_heatmaps
from curvlens.views.merges import merge_scores, merge_scores_figure, merge_scores_plotly, normalized_scores
from curvlens.views.pair_grid import pair_grid, pair_grid_plotly
from curvlens.views.pairs import pair_matrix, pair_matrix_heatmap, pair_matrix_plotly
from curvlens.views.sliders import figure_sliders
from curvlens.views.soups import front_plot, front_plot_plotly, soup_curve, soup_curve_plotly
from curvlens.views.tables import significant

# Drawing functions and explorers, the palette they share, and the two frame
# shapers notebooks draw from (normalized_scores, pair_matrix). Helpers such as
# layer_role_matrix, histogram_steps or the rich-display hooks stay in their modules.
__all__ = [
    "OKABE_ITO", "curvature_explorer", "density_curve_panels", "density_curves", "density_curves_plotly", "figure_sliders", "figure_style",
    "fisher_vs_adam_plot", "fisher_vs_adam_plotly", "front_plot", "front_plot_plotly", "harness_scores", "harness_scores_plotly", "layer_role_heatmap", "layer_role_heatmap_plotly",
    "layer_role_heatmaps", "log10_histogram_grid",
    "log10_histogram_plot", "log10_histogram_plotly", "mask_explorer", "merge_explorer", "merge_scores",
    "merge_scores_figure", "merge_scores_plotly", "normalized_scores", "pair_grid", "pair_grid_plotly",
    "pair_matrix", "pair_matrix_heatmap", "pair_matrix_plotly", "render_all", "significant", "soup_curve", "soup_curve_plotly",
]
