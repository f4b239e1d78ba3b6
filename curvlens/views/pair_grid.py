"""The paper's pair grid: two experts' pooled log10 v side by side, layer by layer.

Input is the ``pooled_moments`` frame (one row per expert, tensor and block:
``expert, name, layer, role, row_block, col_block, log10_v, mask_frac``). For each
chosen layer (rows) and role (column pairs) the two experts' block maps are drawn
next to each other on one shared colour scale, so similar curvature shows as
similar pictures. Where ``mask_frac`` is present, the FFG mask can be overlaid:
an outline (``mask="contour"``) or hatching (``mask="hatch"``) around the blocks
in which the mask keeps at least ``mask_level`` of the entries.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from curvlens.errors import CurvlensError, check_choice
from curvlens.views._common import (
    SEQUENTIAL, apply_filters, check_frame, check_numeric, first_seen, fmt_value, layer_label,
    layer_value, plotly_scale, require_plotly, role_order, styled,
)

__all__ = ["pair_grid", "pair_grid_plotly"]

_COLUMNS = ["expert", "name", "layer", "role", "row_block", "col_block", "log10_v", "mask_frac"]
_MATRIX_ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "down")


@dataclass(frozen=True)
class _Panel:
    layer: int | None
    role: str
    expert: str
    name: str | None
    v: np.ndarray | None       # (row blocks, col blocks) log10 v, NaN where missing
    mask: np.ndarray | None    # same shape, kept fraction; None when no mask


def _block_map(sub: pd.DataFrame, column: str) -> np.ndarray:
    r = sub["row_block"].to_numpy(dtype="int64")
    c = sub["col_block"].to_numpy(dtype="int64")
    out = np.full((r.max() + 1, c.max() + 1), np.nan)
    out[r, c] = sub[column].to_numpy(dtype="float64", na_value=np.nan)
    return out


def _default_layers(present: list[int]) -> list[int]:
    if len(present) <= 4:
        return present
    idx = np.unique(np.round(np.linspace(0, len(present) - 1, 4)).astype(int))
    return [present[i] for i in idx]


def _panels(pooled, experts, layers, roles, filters, what):
    check_frame(pooled, _COLUMNS, what)
    pooled = apply_filters(pooled, filters, what)
    for col in ("row_block", "col_block", "log10_v", "mask_frac"):
        check_numeric(pooled, col, what)
    present = first_seen(pooled["expert"])
    if experts is None:
        if len(present) < 2:
            raise CurvlensError(f"{what} needs two experts; the frame has {present}")
        experts = present[:2]
    experts = list(experts)
    if len(experts) != 2:
        raise CurvlensError(f"{what}: experts must name exactly two experts; got {experts}")
    for e in experts:
        check_choice("experts", e, present)
    layer_keys = [layer_value(x) for x in pooled["layer"]]
    pooled = pooled.assign(_layer=pd.Series(layer_keys, index=pooled.index, dtype=object),
                           role=pooled["role"].astype(str))
    if roles is None:
        roles = ([r for r in role_order(pooled["role"]) if r in _MATRIX_ROLES]
                 or role_order(pooled["role"]))[:4]
    roles = list(roles)
    if layers is None:
        layers = _default_layers(sorted({x for x in layer_keys if x is not None}))
        if not layers:
            layers = [None]
    layers = [layer_value(x) for x in layers]
    panels = []
    for layer in layers:
        at_layer = pooled[[x == layer for x in pooled["_layer"]]]
        for role in roles:
            for e in experts:
                sub = at_layer[(at_layer["role"] == role) & (at_layer["expert"] == e)]
                if sub.empty:
                    panels.append(_Panel(layer, role, e, None, None, None))
                    continue
                name = sorted(sub["name"].astype(str).unique())[0]
                sub = sub[sub["name"] == name]
                m = _block_map(sub, "mask_frac")
                panels.append(_Panel(layer, role, e, name, _block_map(sub, "log10_v"),
                                     None if np.isnan(m).all() else m))
    if all(p.v is None for p in panels):
        raise CurvlensError(f"{what}: no tensor for layers {layers} and roles {roles} "
                            f"(roles present: {sorted(pooled['role'].unique())})")
    return experts, layers, roles, panels


def _limits(panels, vmin, vmax):
    allv = np.concatenate([p.v[np.isfinite(p.v)] for p in panels if p.v is not None])
    lo = float(np.percentile(allv, 1)) if vmin is None else float(vmin)
    hi = float(np.percentile(allv, 99)) if vmax is None else float(vmax)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    clipped = bool((allv < lo).any() or (allv > hi).any())
    return lo, hi, clipped


def _overlay(ax, m: np.ndarray, mode: str, level: float):
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    kept = np.argwhere(np.nan_to_num(m, nan=0.0) >= level)
    if mode == "contour" and min(m.shape) >= 2:
        z = np.nan_to_num(m, nan=0.0)
        if z.min() < level <= z.max():
            ax.contour(z, levels=[level], colors="white", linewidths=1.8)
            ax.contour(z, levels=[level], colors="black", linewidths=0.7)
        return
    if kept.size == 0:
        return
    rects = [Rectangle((c - 0.5, r - 0.5), 1, 1) for r, c in kept]
    if mode == "hatch":
        coll = PatchCollection(rects, facecolor="none", edgecolor="white", hatch="///",
                               linewidth=0)
    else:
        coll = PatchCollection(rects, facecolor="none", edgecolor="white", linewidth=1.2)
    coll.set_gid("ffg-mask")
    ax.add_collection(coll)


@styled
def pair_grid(pooled: pd.DataFrame, experts: Sequence[str] | None = None, *,
              layers: Sequence[int | None] | None = None, roles: Sequence[str] | None = None,
              mask: str | None = "contour", mask_level: float = 0.5, cmap: str = SEQUENTIAL,
              vmin: float | None = None, vmax: float | None = None, title: str | None = None,
              **filters: Any):
    """Two experts' block-pooled log10 v side by side, for chosen layers and roles.

    Parameters
    ----------
    pooled : pandas.DataFrame
        The ``pooled_moments`` frame.
    experts : pair of str, optional
        The two experts (default: the first two in the frame).
    layers : sequence of int or None, optional
        Rows of the grid (default: up to four layers spread over the depth);
        ``None`` selects the tensors outside the blocks (embeddings, LM head).
    roles : sequence of str, optional
        Column pairs (default: the first four matrix roles present, in the order
        q, k, v, qkv, o, gate, up, down).
    mask : {"contour", "hatch", None}
        How to overlay the FFG mask from ``mask_frac`` (nothing when it is all NaN).
    mask_level : float
        Blocks whose kept fraction is at least this are outlined / hatched.
    cmap, vmin, vmax : optional
        Colour map and limits shared by all panels (default: the 1st..99th
        percentile of all panels' values).
    title : str, optional
        Figure title.
    **filters
        Extra ``column=value`` filters on the frame.

    Returns
    -------
    matplotlib.figure.Figure
        Its ``axes`` are the panels, row by row (layer), then role, then expert,
        followed by the colour bar.
    """
    import matplotlib.pyplot as plt

    check_choice("mask", mask, ["contour", "hatch", None])
    experts, layers, roles, panels = _panels(pooled, experts, layers, roles, filters,
                                             "pair_grid")
    lo, hi, clipped = _limits(panels, vmin, vmax)
    nr, nrole = len(layers), len(roles)
    gap = 0.18
    widths = []
    for k in range(nrole):
        widths += [1.0, 1.0] + ([gap] if k < nrole - 1 else [])
    fig = plt.figure(figsize=(1.0 + 1.25 * 2 * nrole + gap * (nrole - 1), 0.9 + 1.15 * nr))
    gs = fig.add_gridspec(nr, len(widths), width_ratios=widths)
    axes = []
    im = None
    any_mask = False
    it = iter(panels)
    for i, layer in enumerate(layers):
        for k, role in enumerate(roles):
            for e_i, e in enumerate(experts):
                p = next(it)
                ax = fig.add_subplot(gs[i, 3 * k + e_i])
                axes.append(ax)
                ax.set_xticks([])
                ax.set_yticks([])
                for s in ax.spines.values():
                    s.set_visible(False)
                if p.v is None:
                    ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes,
                            color="0.5")
                else:
                    im = ax.imshow(p.v, cmap=cmap, vmin=lo, vmax=hi, aspect="auto",
                                   interpolation="nearest")
                    if mask is not None and p.mask is not None:
                        any_mask = True
                        _overlay(ax, p.mask, mask, mask_level)
                if i == 0:
                    ax.set_title(f"{role} · {e}", fontsize=9)
                if k == 0 and e_i == 0:
                    ax.set_ylabel(layer_label(layer) if layer is None else f"layer {layer}")
    cb = fig.colorbar(im, ax=axes, shrink=0.8, pad=0.015, extend="both" if clipped else "neither")
    cb.set_label("log10 v (pooled per block)")
    if title is None:
        title = f"Adam second moments, {experts[0]} vs {experts[1]}"
    fig.suptitle(title)
    if any_mask:
        how = "outlined" if mask == "contour" else "hatched"
        fig.supxlabel(f"{how}: blocks where the FFG mask keeps ≥ {mask_level:.0%} of the entries",
                      fontsize=8)
    return fig


def pair_grid_plotly(pooled: pd.DataFrame, experts: Sequence[str] | None = None, *,
                     layers: Sequence[int | None] | None = None,
                     roles: Sequence[str] | None = None, mask: bool = True,
                     mask_level: float = 0.5, colorscale: str = SEQUENTIAL,
                     vmin: float | None = None, vmax: float | None = None,
                     title: str | None = None, **filters: Any):
    """Interactive pair grid (plotly): one shared colour axis, optional mask contours.

    Hover shows the tensor name, layer, role, expert, block, log10 v and the
    mask's kept fraction. Arguments as :func:`pair_grid`.

    Returns
    -------
    plotly.graph_objects.Figure
    """
    go = require_plotly()
    from plotly.subplots import make_subplots

    experts, layers, roles, panels = _panels(pooled, experts, layers, roles, filters,
                                             "pair_grid_plotly")
    lo, hi, _ = _limits(panels, vmin, vmax)
    nr, nc = len(layers), 2 * len(roles)
    fig = make_subplots(
        rows=nr, cols=nc, horizontal_spacing=min(0.02, 0.5 / nc), vertical_spacing=0.04,
        column_titles=[f"{r} · {e}" for r in roles for e in experts],
        row_titles=[layer_label(x) if x is None else f"layer {x}" for x in layers],
    )
    it = iter(panels)
    for i in range(nr):
        for j in range(nc):
            p = next(it)
            if p.v is None:
                continue
            m = p.mask if p.mask is not None else np.full(p.v.shape, np.nan)
            custom = np.empty(p.v.shape + (5,), dtype=object)
            for (r, c), _ in np.ndenumerate(p.v):
                custom[r, c] = [p.name, layer_label(p.layer), p.role, p.expert,
                                fmt_value(m[r, c]) or "n/a"]
            fig.add_trace(go.Heatmap(
                z=p.v, coloraxis="coloraxis", customdata=custom, name=f"{p.expert}: {p.name}",
                hovertemplate=("<b>%{customdata[0]}</b><br>layer: %{customdata[1]}<br>"
                               "role: %{customdata[2]}<br>expert: %{customdata[3]}<br>"
                               "block: (%{y}, %{x})<br>log10 v: %{z:.2f}<br>"
                               "mask kept fraction: %{customdata[4]}<extra></extra>")),
                row=i + 1, col=j + 1)
            if mask and p.mask is not None and min(p.mask.shape) >= 2:
                fig.add_trace(go.Contour(
                    z=np.nan_to_num(p.mask, nan=0.0), showscale=False, hoverinfo="skip",
                    name=f"FFG mask {p.expert}: {p.name}",
                    contours={"start": mask_level, "end": mask_level, "size": 1,
                              "coloring": "lines"},
                    line={"color": "white", "width": 2}, colorscale=[[0, "white"], [1, "white"]]),
                    row=i + 1, col=j + 1)
    fig.update_xaxes(showticklabels=False, showgrid=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, showgrid=False, zeroline=False, autorange="reversed")
    fig.update_layout(
        coloraxis={"colorscale": plotly_scale(colorscale), "cmin": lo, "cmax": hi,
                   "colorbar": {"title": {"text": "log10 v", "side": "right"}, "x": 1.06}},
        title=title or f"Adam second moments, {experts[0]} vs {experts[1]}",
        template="plotly_white", height=160 + 150 * nr, width=160 + 120 * nc,
    )
    return fig
