"""Layer x role heatmaps of any per-tensor metric column.

Rows are transformer layers (layer 0 at the top) plus one row, at the very top,
for tensors outside the blocks (token embeddings, final norm, LM head); columns
are roles in curvlens' fixed order (``embed, q, k, v, qkv, o, gate, up, down,
norm, lm_head, other``). Where several tensors or experts fall in one cell (two
norms per layer, several experts, several pairs) the cell pools them by the rule
of :func:`curvlens.aggregate` (:func:`curvlens.passes.analysis_common.pool`):
the numel-weighted mean, or the sum for additive metrics such as
``predicted_loss_increase``.

A metric that can be only bounded for some tensors (``mask_rank``, NaN where the
exact SVD was unaffordable, with its lower bound in ``mask_rank_at_least``) is
drawn from the bound there, and the cell is marked: hatched with a "≥" before its
number in matplotlib, "≥" and "lower bound" in plotly's text and hover.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from curvlens.errors import CurvlensError
from curvlens.passes.analysis_common import pool
from curvlens.views._common import (
    DIVERGING, NON_LAYER, SEQUENTIAL, apply_filters, auto_log, check_frame, check_numeric,
    filter_title, first_seen, fmt_value, is_signed, layer_label, layer_value, metric_label,
    new_axes, plotly_color_kwargs, plotly_scale, require_plotly, role_order, styled, text_color_for,
    weights_of,
)

__all__ = ["layer_role_matrix", "layer_role_heatmap", "layer_role_heatmaps",
           "layer_role_heatmap_plotly"]

# A panel of a model with few layers is a flat strip (the quick zoo's 3 rows made a
# 1691 x 235 px figure of 3 panels); below this height, or in a row wider than this,
# labels shrink out of reading size on a page.
_MIN_PANEL_HEIGHT = 2.2
_MAX_ROW_WIDTH = 13.0

_NAN_COLOR = "#e6e6e6"

#: Metrics that are sometimes only bounded: metric -> the column holding the bound.
BOUND_COLUMNS = {"mask_rank": "mask_rank_at_least"}


@dataclass(frozen=True)
class _Grid:
    """A layer x role matrix with the tensor names behind each cell."""

    values: np.ndarray          # (rows, roles), NaN where no tensor
    layers: list                # int or None per row
    roles: list                 # role per column
    names: list                 # names[r][c]: sorted tensor names in the cell
    metric: str
    bounded: np.ndarray | None = None  # (rows, roles) bool: the cell pools a lower bound

    @property
    def rows(self) -> list[str]:
        return [layer_label(layer) for layer in self.layers]


def _grid(df, metric: str, *, weight: str | None, roles, filters: dict, what: str,
          layers: Sequence | None = None) -> _Grid:
    check_frame(df, ["name", "layer", "role", metric], what)
    df = apply_filters(df, filters, what)
    values = check_numeric(df, metric, what)
    w = weights_of(df, weight, what, metric)
    bound_col = BOUND_COLUMNS.get(metric)
    is_bound = np.zeros(len(values), dtype=bool)
    if bound_col is not None and bound_col in df.columns:
        bound = df[bound_col].to_numpy(dtype="float64")
        is_bound = ~np.isfinite(values) & np.isfinite(bound)
        values = np.where(is_bound, bound, values)
    layer_keys = [layer_value(x) for x in df["layer"]]
    role_keys = [str(r) for r in df["role"]]
    names = [str(n) for n in df["name"]]
    if layers is None:
        ints = sorted({x for x in layer_keys if x is not None})
        layers = ([None] if any(x is None for x in layer_keys) else []) + ints
    cols = role_order(role_keys, roles)
    row_of = {layer: i for i, layer in enumerate(layers)}
    col_of = {r: j for j, r in enumerate(cols)}
    cells: dict[tuple[int, int], list[int]] = {}
    for k, (layer, role) in enumerate(zip(layer_keys, role_keys)):
        if layer in row_of and role in col_of:
            cells.setdefault((row_of[layer], col_of[role]), []).append(k)
    out = np.full((len(layers), len(cols)), np.nan)
    bounded = np.zeros(out.shape, dtype=bool)
    cell_names = [[[] for _ in cols] for _ in layers]
    for (i, j), idx in cells.items():
        out[i, j] = pool(metric, values[idx], None if w is None else w[idx])
        bounded[i, j] = bool(is_bound[idx].any())
        cell_names[i][j] = sorted(set(names[k] for k in idx))
    return _Grid(out, list(layers), cols, cell_names, metric, bounded)


def layer_role_matrix(df: pd.DataFrame, metric: str, *, weight: str | None = "numel",
                      roles: Sequence[str] | None = None, **filters: Any) -> pd.DataFrame:
    """The layer x role matrix a heatmap shows: numel-weighted mean of ``metric``.

    Parameters
    ----------
    df : pandas.DataFrame
        A per-tensor frame with columns ``name, layer, role`` and ``metric``
        (``numel`` too unless ``weight=None``).
    metric : str
        The column to aggregate.
    weight : str or None
        Weight column (default ``numel``); None for equal weights.
    roles : sequence of str, optional
        Columns, in this order (default: the roles present, in the fixed order).
    **filters
        ``column=value`` (or a list of values) restricting the rows first, e.g.
        ``expert="math", criterion="fisher", density=0.2``.

    Returns
    -------
    pandas.DataFrame
        Index: layer labels (``"non-layer"`` first when present, then ``"0", "1", ...``);
        columns: roles; NaN where no tensor.

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({
    ...     "name": ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
    ...              "model.layers.0.input_layernorm.weight",
    ...              "model.layers.0.post_attention_layernorm.weight"],
    ...     "layer": [None, 0, 0, 0], "role": ["embed", "q", "norm", "norm"],
    ...     "numel": [100, 64, 8, 24], "kept_frac": [0.5, 0.25, 1.0, 0.0]})
    >>> layer_role_matrix(df, "kept_frac")
               embed     q  norm
    non-layer    0.5   NaN   NaN
    0            NaN  0.25  0.25
    """
    what = "layer_role_matrix"
    g = _grid(df, metric, weight=weight, roles=roles, filters=filters, what=what)
    return pd.DataFrame(g.values, index=pd.Index(g.rows, name=None), columns=g.roles)


def color_setup(values: np.ndarray, metric: str, *, log, cmap, vmin, vmax, center):
    """Colour map and norm for a heatmap: log, diverging (signed) or sequential."""
    import matplotlib as mpl
    from matplotlib import colors

    finite = values[np.isfinite(values)]
    # an explicit non-positive vmin asks for a linear scale: don't switch to log
    use_log = auto_log(finite, log) if (log is not None or vmin is None or vmin > 0) else False
    if use_log and vmin is not None and vmin <= 0:
        raise CurvlensError(f"log colour scale for {metric!r} needs vmin > 0; got vmin={vmin} "
                            "(pass log=False for a linear scale)")
    if use_log:
        pos = finite[finite > 0]
        if pos.size == 0:
            raise CurvlensError(f"log colour scale for {metric!r} needs positive values; "
                                f"got none (pass log=False)")
        lo = float(pos.min()) if vmin is None else vmin
        hi = float(pos.max()) if vmax is None else vmax
        norm = colors.LogNorm(vmin=lo, vmax=max(hi, lo * 1.0001))
        name = cmap or SEQUENTIAL
    elif center is not None or is_signed(finite, metric):
        c = 0.0 if center is None else float(center)
        span = float(np.max(np.abs(finite - c))) if finite.size else 1.0
        span = span or 1.0
        lo = c - span if vmin is None else vmin
        hi = c + span if vmax is None else vmax
        norm = colors.Normalize(vmin=lo, vmax=hi)
        name = cmap or DIVERGING
    else:
        lo = vmin if vmin is not None else float(finite.min()) if finite.size else 0.0
        hi = vmax if vmax is not None else float(finite.max()) if finite.size else 1.0
        if hi == lo:
            lo, hi = lo - 0.5, hi + 0.5
        norm = colors.Normalize(vmin=lo, vmax=hi)
        name = cmap or SEQUENTIAL
    cm = (mpl.colormaps[name] if isinstance(name, str) else name).with_extremes(bad=_NAN_COLOR)
    return cm, norm, use_log


def _draw_grid(ax, g: _Grid, cm, norm, *, annotate: bool, show_ylabels: bool = True):
    data = np.ma.masked_invalid(g.values)
    im = ax.imshow(data, cmap=cm, norm=norm, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(g.roles)), g.roles)
    rows = g.rows
    step = max(1, int(np.ceil(len(rows) / 32)))
    ticks = [i for i in range(len(rows)) if rows[i] == NON_LAYER or i % step == 0]
    ax.set_yticks(ticks, [rows[i] for i in ticks])
    ax.tick_params(length=0, labelleft=show_ylabels)
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    if g.layers and g.layers[0] is None and len(g.layers) > 1:
        ax.axhline(0.5, color="white", lw=2.5)
    ax.set_xlabel("role")
    ax.set_ylabel("layer" if show_ylabels else "")
    if g.bounded is not None and g.bounded.any():
        from matplotlib.patches import Rectangle

        # a lower bound is not a value: hatch it so nobody reads it as one
        for i, j in zip(*np.nonzero(g.bounded)):
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, hatch="///",
                                   edgecolor="white", lw=0, label="lower bound"))
    if annotate:
        size = 7 if len(rows) <= 16 and len(g.roles) <= 10 else 6   # 6 pt: the smallest readable in print
        for i in range(len(rows)):
            for j in range(len(g.roles)):
                v = g.values[i, j]
                if np.isfinite(v):
                    ax.text(j, i, _cell_text(g, i, j), ha="center", va="center", fontsize=size,
                            color=text_color_for(cm(norm(v))))
    return im


def _cell_text(g: _Grid, i: int, j: int) -> str:
    prefix = "≥" if g.bounded is not None and g.bounded[i, j] else ""
    return prefix + fmt_value(g.values[i, j])


@styled
def layer_role_heatmap(df: pd.DataFrame, metric: str, *, ax=None, log: bool | None = None,
                       cmap: str | None = None, vmin: float | None = None,
                       vmax: float | None = None, center: float | None = None,
                       annotate: bool = False, colorbar: bool = True, title: str | None = None,
                       weight: str | None = "numel", roles: Sequence[str] | None = None,
                       **filters: Any):
    """Heatmap of a per-tensor metric by layer (rows) and role (columns), matplotlib.

    Parameters
    ----------
    df, metric, weight, roles, **filters
        As :func:`layer_role_matrix` (e.g. ``expert="math", density=0.2``).
    ax : matplotlib.axes.Axes, optional
        Where to draw; a new figure when None.
    log : bool or None
        Log colour scale; None picks it when all values are positive and span
        at least two decades.
    cmap : str, optional
        Colour map; default viridis, or RdBu_r (centred) for signed metrics.
    vmin, vmax : float, optional
        Colour limits (default: the data range; symmetric about ``center`` for signed data).
    center : float, optional
        Centre of a diverging scale (forces one).
    annotate : bool
        Write each cell's value in it.
    colorbar : bool
        Add a colour bar labelled with the metric.
    title : str, optional
        Default: the metric and the filters applied.

    Returns
    -------
    matplotlib.axes.Axes
    """
    g = _grid(df, metric, weight=weight, roles=roles, filters=filters, what="layer_role_heatmap")
    ax = new_axes(ax, (1.0 + 0.55 * len(g.roles), max(_MIN_PANEL_HEIGHT, 1.2 + 0.26 * len(g.layers))))
    cm, norm, use_log = color_setup(g.values, metric, log=log, cmap=cmap, vmin=vmin,
                                     vmax=vmax, center=center)
    im = _draw_grid(ax, g, cm, norm, annotate=annotate)
    if colorbar:
        label = metric_label(metric) + (" (log scale)" if use_log else "")
        ax.figure.colorbar(im, ax=ax, label=label, shrink=0.9, pad=0.02)
    if title is None:
        ft = filter_title(filters)
        title = metric_label(metric) + (f"\n{ft}" if ft else "")
    ax.set_title(title)
    return ax


@styled
def layer_role_heatmaps(df: pd.DataFrame, metric: str, *, by: str = "expert",
                        ncols: int | None = None, log: bool | None = None,
                        cmap: str | None = None, vmin: float | None = None,
                        vmax: float | None = None, center: float | None = None,
                        annotate: bool = False, title: str | None = None,
                        weight: str | None = "numel", roles: Sequence[str] | None = None,
                        **filters: Any):
    """Small multiples: one layer x role heatmap per value of ``by``, one colour scale.

    Parameters
    ----------
    by : str
        Column splitting the panels (default ``expert``; e.g. ``criterion``, or
        ``expert_a`` for pair frames).
    ncols : int, optional
        Panels per row (default: up to 3, 2 x 2 for 4, fewer when a row of them
        would be wider than 13 in).
    Others
        As :func:`layer_role_heatmap`.

    Returns
    -------
    matplotlib.figure.Figure
    """
    import matplotlib.pyplot as plt

    what = "layer_role_heatmaps"
    check_frame(df, ["name", "layer", "role", metric, by], what)
    df = apply_filters(df, filters, what)
    keys = first_seen(df[by])
    layers_all = [layer_value(x) for x in df["layer"]]
    ints = sorted({x for x in layers_all if x is not None})
    layers = ([None] if any(x is None for x in layers_all) else []) + ints
    cols = role_order(df["role"].astype(str), roles)
    grids = [_grid(df[df[by] == k], metric, weight=weight, roles=cols, filters={}, what=what,
                   layers=layers) for k in keys]
    allv = np.concatenate([g.values.ravel() for g in grids])
    cm, norm, use_log = color_setup(allv, metric, log=log, cmap=cmap, vmin=vmin, vmax=vmax,
                                     center=center)
    n = len(grids)
    w = 0.4 + 0.48 * len(cols)
    h = max(_MIN_PANEL_HEIGHT, 1.0 + 0.28 * len(layers))
    if ncols is None:   # up to 3 panels a row (2 x 2 for 4), no row wider than a page allows
        ncols = max(1, min(n, 2 if n == 4 else 3, int((_MAX_ROW_WIDTH - 1.2) // w)))
    ncols = max(1, int(ncols))
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(w * ncols + 1.2, h * nrows + 0.4),
                             squeeze=False)
    im = None
    for k, (key, g) in enumerate(zip(keys, grids)):
        ax = axes.flat[k]
        im = _draw_grid(ax, g, cm, norm, annotate=annotate, show_ylabels=(k % ncols == 0))
        ax.set_title(f"{by} = {key}" if not isinstance(key, float) else f"{by} = {key:g}")
        if k // ncols != nrows - 1 and k + ncols < n:
            ax.set_xlabel("")
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    label = metric_label(metric) + (" (log scale)" if use_log else "")
    fig.colorbar(im, ax=axes.ravel().tolist(), label=label, shrink=0.85, pad=0.02)
    if title is None:
        ft = filter_title(filters)
        title = metric_label(metric) + (f" ({ft})" if ft else "")
    fig.suptitle(title)
    return fig


def layer_role_heatmap_plotly(df: pd.DataFrame, metric: str, *, log: bool | None = None,
                              colorscale: str | None = None, zmin: float | None = None,
                              zmax: float | None = None, center: float | None = None,
                              annotate: bool = False, title: str | None = None,
                              weight: str | None = "numel", roles: Sequence[str] | None = None,
                              **filters: Any):
    """Interactive layer x role heatmap (plotly).

    Hover shows the tensor name(s) in the cell, the layer, the role, the value
    and how many tensors were averaged. Arguments as :func:`layer_role_heatmap`
    (``colorscale`` is a plotly or matplotlib colour-map name).

    Returns
    -------
    plotly.graph_objects.Figure
    """
    go = require_plotly()
    g = _grid(df, metric, weight=weight, roles=roles, filters=filters,
              what="layer_role_heatmap_plotly")
    finite = g.values[np.isfinite(g.values)]
    use_log = auto_log(finite, log)
    label = metric_label(metric)
    colorbar: dict[str, Any] = {"title": {"text": label + (" (log scale)" if use_log else ""),
                                          "side": "right"}}
    kw: dict[str, Any] = {}
    if use_log:
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(g.values > 0, np.log10(g.values), np.nan)
        zf = z[np.isfinite(z)]
        if zf.size == 0:
            raise CurvlensError(f"log colour scale for {metric!r} needs positive values")
        lo = np.log10(zmin) if zmin is not None else float(zf.min())
        hi = np.log10(zmax) if zmax is not None else float(zf.max())
        ticks = list(range(int(np.floor(lo)), int(np.ceil(hi)) + 1))
        colorbar.update(tickvals=ticks, ticktext=[f"1e{t}" for t in ticks])
        kw.update(zmin=lo, zmax=hi, colorscale=plotly_scale(colorscale or SEQUENTIAL))
    else:
        z = g.values
        kw.update(plotly_color_kwargs(finite, metric, center=center, zmin=zmin, zmax=zmax,
                                      colorscale=colorscale))
    rows = g.rows
    custom = np.empty(g.values.shape + (5,), dtype=object)
    text = np.empty(g.values.shape, dtype=object)
    for i, layer in enumerate(rows):
        for j, role in enumerate(g.roles):
            names = g.names[i][j]
            shown = "<br>".join(names[:4]) + (f"<br>... (+{len(names) - 4} more)"
                                               if len(names) > 4 else "")
            v = g.values[i, j]
            shown_v = _cell_text(g, i, j) if np.isfinite(v) else "n/a"
            if g.bounded[i, j]:
                shown_v += " (lower bound: exact value not computed)"
            custom[i, j] = [shown or "(no tensor)", layer, role, shown_v, len(names)]
            text[i, j] = _cell_text(g, i, j) if np.isfinite(v) else ""
    trace = go.Heatmap(
        z=z, x=g.roles, y=rows, customdata=custom, colorbar=colorbar, hoverongaps=False,
        xgap=1, ygap=1,
        hovertemplate=("<b>%{customdata[0]}</b><br>layer: %{customdata[1]}<br>"
                       "role: %{customdata[2]}<br>" + label + ": %{customdata[3]}"
                       "<br>tensors averaged: %{customdata[4]}<extra></extra>"),
        **kw,
    )
    if annotate:
        trace.update(text=text, texttemplate="%{text}", textfont={"size": 9})
    elif g.bounded.any():  # bounded cells always say so
        only = np.where(g.bounded, text, "")
        trace.update(text=only, texttemplate="%{text}", textfont={"size": 9})
    fig = go.Figure(trace)
    if title is None:
        ft = filter_title(filters)
        title = label + (f" ({ft})" if ft else "")
    fig.update_layout(
        title=title, template="plotly_white", xaxis_title="role", yaxis_title="layer",
        yaxis={"autorange": "reversed", "type": "category"}, xaxis={"type": "category"},
        height=max(340, 170 + 32 * len(rows)), width=max(460, 260 + 62 * len(g.roles)),
    )
    return fig
