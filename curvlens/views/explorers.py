"""ipywidgets explorers composed from the plotly figures.

Each explorer is an ``ipywidgets.VBox`` with extra attributes, so a test (or a
curious user) can drive it without a browser:

``controls``
    dict name -> control widget; setting a control's ``value`` redraws at once.
``figure``
    the main plotly Figure now shown (None before the first draw).
``figures``
    dict name -> every plotly Figure now shown.
``update()``
    redraw from the current control values.

Figures are shown in ``ipywidgets.Output`` areas when running in a Jupyter
kernel (set as the widget's state, :mod:`curvlens.views.widget_output`); headless,
only ``figures`` (and the HTML widgets) are updated.
"""
from __future__ import annotations

import html
from typing import Any

import numpy as np
import pandas as pd

from curvlens.errors import CurvlensError
from curvlens.passes.analysis_common import metric_weights, pool
from curvlens.views._common import (
    NON_LAYER, check_frame, first_seen, layer_label, layer_value, metric_label, require_widgets,
    role_order,
)
from curvlens.views.widget_output import assemble, show_figure

__all__ = ["curvature_explorer", "mask_explorer"]

_OVERLAP_METRICS = ("pearson_log", "spearman_log", "cosine", "jaccard_top10", "jaccard_top1")
_MASK_METRICS = ("kept_frac", "row_sparsity", "col_sparsity", "mask_effective_rank",
                 "mask_rank", "stable_rank", "saliency_kept")
_ALL = "all"


def _metrics_present(df, candidates):
    return [m for m in candidates if m in df.columns and pd.api.types.is_numeric_dtype(df[m])]


# ---------------------------------------------------------------------------
# Curvature overlap
# ---------------------------------------------------------------------------


def curvature_explorer(overlap_df: pd.DataFrame, pooled_df: pd.DataFrame | None = None):
    """Explore how two experts' curvature overlaps, by layer and role.

    Controls (``.controls``): ``pair`` (expert pair), ``metric`` (overlap metric),
    ``layer`` and ``role`` (``"all"`` or one). Figures (``.figures``):

    - ``heatmap``: the metric for the chosen pair by layer x role;
    - ``matrix``: the metric for every expert pair, restricted to the chosen
      layer and role;
    - ``grid`` (with ``pooled_df``): the pair's pooled log10 v side by side for the
      chosen layer and role (default layers / roles for ``"all"``).

    Parameters
    ----------
    overlap_df : pandas.DataFrame
        The ``curvature_overlap`` frame.
    pooled_df : pandas.DataFrame, optional
        The ``pooled_moments`` frame, for the side-by-side moment maps.

    Returns
    -------
    ipywidgets.VBox
    """
    widgets = require_widgets()
    from curvlens.views.heatmaps import layer_role_heatmap_plotly
    from curvlens.views.pair_grid import pair_grid_plotly
    from curvlens.views.pairs import pair_matrix_plotly

    what = "curvature_explorer"
    check_frame(overlap_df, ["expert_a", "expert_b", "name", "layer", "role", "numel"], what)
    metrics = _metrics_present(overlap_df, _OVERLAP_METRICS)
    if not metrics:
        raise CurvlensError(f"{what}: the overlap frame has none of the metrics "
                            f"{list(_OVERLAP_METRICS)}")
    pairs = first_seen(zip(overlap_df["expert_a"], overlap_df["expert_b"]))
    layers = sorted({x for x in map(layer_value, overlap_df["layer"]) if x is not None})
    has_nonlayer = any(layer_value(x) is None for x in overlap_df["layer"])
    layer_opts = [(_ALL, _ALL)] + ([(NON_LAYER, NON_LAYER)] if has_nonlayer else []) + [
        (str(x), str(x)) for x in layers]
    roles = role_order(overlap_df["role"].astype(str))
    controls = {
        "pair": widgets.Dropdown(options=[(f"{a} × {b}", (a, b)) for a, b in pairs],
                                 value=pairs[0], description="pair"),
        "metric": widgets.Dropdown(options=[(metric_label(m), m) for m in metrics],
                                   value=metrics[0], description="metric"),
        "layer": widgets.Dropdown(options=layer_opts, value=_ALL, description="layer"),
        "role": widgets.Dropdown(options=[_ALL] + roles, value=_ALL, description="role"),
    }
    outs = {"heatmap": widgets.Output(), "matrix": widgets.Output()}
    if pooled_df is not None:
        outs["grid"] = widgets.Output()
    note = widgets.HTML()
    figures: dict[str, Any] = {}

    def selection():
        layer = controls["layer"].value
        role = controls["role"].value
        f: dict[str, Any] = {}
        if layer != _ALL:
            f["layer"] = None if layer == NON_LAYER else int(layer)
        if role != _ALL:
            f["role"] = role
        return f

    def subset(df, f):
        if "layer" in f:
            keep = [layer_value(x) == f["layer"] for x in df["layer"]]
            df = df[keep]
        if "role" in f:
            df = df[df["role"].astype(str) == f["role"]]
        return df

    def update(*_):
        a, b = controls["pair"].value
        metric = controls["metric"].value
        f = selection()
        mine = overlap_df[(overlap_df["expert_a"] == a) & (overlap_df["expert_b"] == b)]
        figures["heatmap"] = layer_role_heatmap_plotly(
            mine, metric, title=f"{metric_label(metric)}: {a} × {b}")
        sub = subset(overlap_df, f)
        where = ", ".join(f"{k}={layer_label(v) if k == 'layer' else v}" for k, v in f.items())
        if sub.empty:
            note.value = f"<i>no tensor at {html.escape(where)}</i>"
        else:
            figures["matrix"] = pair_matrix_plotly(
                sub, metric, title=f"{metric_label(metric)}, all pairs"
                + (f" ({where})" if where else ""))
            pm = sub[(sub["expert_a"] == a) & (sub["expert_b"] == b)]
            value = pool(metric, pm[metric].to_numpy(float), metric_weights(pm, metric))
            note.value = (f"<b>{html.escape(a)} × {html.escape(b)}</b>, "
                          f"{html.escape(where or 'whole model')}: {metric_label(metric)} = "
                          f"{value:.3f} (numel-weighted over {len(pm)} tensors)")
        if pooled_df is not None:
            layers_sel = None if "layer" not in f else [f["layer"]]
            roles_sel = None if "role" not in f else [f["role"]]
            try:
                figures["grid"] = pair_grid_plotly(pooled_df, (a, b), layers=layers_sel,
                                                   roles=roles_sel)
            except CurvlensError as err:
                figures.pop("grid", None)
                note.value += f"<br><i>moment maps: {html.escape(str(err))}</i>"
        box.figure = figures["heatmap"]
        for k, out in outs.items():
            if k in figures:
                show_figure(out, figures[k])

    row = widgets.HBox([controls["pair"], controls["metric"], controls["layer"],
                        controls["role"]])
    body = [row, note, widgets.HBox([outs["heatmap"], outs["matrix"]])]
    if "grid" in outs:
        body.append(outs["grid"])
    box = assemble(widgets, body, controls, update, figures)
    box.note = note
    for c in controls.values():
        c.observe(update, names="value")
    update()
    return box


# ---------------------------------------------------------------------------
# FFG masks
# ---------------------------------------------------------------------------


def mask_explorer(mask_stats_df: pd.DataFrame):
    """Explore where the FFG (or magnitude) masks keep entries, by layer and role.

    Controls (``.controls``): ``expert`` (one, or ``"all"`` for the numel-weighted
    mean over experts), ``criterion``, ``density`` (a slider over the densities
    present) and ``metric`` (kept fraction, row/column sparsity, ranks, ...).
    Figure (``.figure``): the layer x role heatmap of the metric. ``.summary`` is an
    HTML line with the model-wide kept fraction of the selection.

    Parameters
    ----------
    mask_stats_df : pandas.DataFrame
        The ``mask_stats`` frame.

    Returns
    -------
    ipywidgets.VBox
    """
    widgets = require_widgets()
    from curvlens.views.heatmaps import layer_role_heatmap_plotly

    what = "mask_explorer"
    df = check_frame(mask_stats_df, ["expert", "criterion", "density", "name", "layer", "role",
                                     "numel", "kept_frac"], what)
    metrics = _metrics_present(df, _MASK_METRICS)
    experts = first_seen(df["expert"])
    criteria = first_seen(df["criterion"])
    densities = sorted(float(d) for d in pd.unique(df["density"]))
    crit0 = next((c for c in criteria if str(c).lower() in ("fisher", "ffg")), criteria[0])
    dens0 = min(densities, key=lambda d: abs(d - 0.3))
    controls = {
        "expert": widgets.Dropdown(options=experts + [_ALL], value=experts[0],
                                   description="expert"),
        "criterion": widgets.Dropdown(options=criteria, value=crit0, description="criterion"),
        "density": widgets.SelectionSlider(options=[(f"{d:g}", d) for d in densities],
                                           value=dens0, description="density",
                                           continuous_update=False),
        "metric": widgets.Dropdown(options=[(metric_label(m), m) for m in metrics],
                                   value="kept_frac", description="metric"),
    }
    out = widgets.Output()
    summary = widgets.HTML()
    figures: dict[str, Any] = {}

    def update(*_):
        e = controls["expert"].value
        c = controls["criterion"].value
        d = controls["density"].value
        m = controls["metric"].value
        filters: dict[str, Any] = {"criterion": c, "density": d}
        if e != _ALL:
            filters["expert"] = e
        who = "all experts" if e == _ALL else e
        try:
            fig = layer_role_heatmap_plotly(
                df, m, log=False, title=f"{metric_label(m)}: {who}, {c}, density {d:g}",
                **filters)
        except CurvlensError as err:
            summary.value = f"<i>{html.escape(str(err))}</i>"
            return
        box.figure = figures["heatmap"] = fig
        sel = df[(df["criterion"] == c) & np.isclose(df["density"].astype(float), d)]
        if e != _ALL:
            sel = sel[sel["expert"] == e]
        kept = pool("kept_frac", sel["kept_frac"].to_numpy(float), sel["numel"].to_numpy(float))
        summary.value = (f"{html.escape(str(who))}, {html.escape(str(c))} at density {d:g}: "
                         f"model-wide kept fraction {kept:.3f} over {len(sel)} tensors")
        show_figure(out, fig)

    box = assemble(widgets, [widgets.HBox([controls["expert"], controls["criterion"],
                                            controls["metric"]]),
                              controls["density"], summary, out], controls, update, figures)
    box.summary = summary
    for ctl in controls.values():
        ctl.observe(update, names="value")
    update()
    return box
