"""Shared pieces of the views: the fixed style, palettes, input checks and the
numel-weighted aggregation every per-tensor figure uses.

Nothing here draws; the figure modules do.
"""
from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from curvlens.errors import CurvlensError
from curvlens.roles import ROLES
from curvlens.passes.analysis_common import metric_weights

#: Label of the heatmap row that holds tensors outside the transformer blocks
#: (token embeddings, final norm, LM head).
NON_LAYER = "non-layer"

#: Okabe-Ito: distinguishable with the common colour-vision deficiencies.
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000")

#: Okabe-Ito reordered for lines and markers on white: the two blues are as far
#: apart as the palette allows (orange, blue, green, vermillion come first, so four
#: experts never share a hue family), and the yellow, hard to see on a white
#: background, comes last.
CATEGORICAL = tuple(OKABE_ITO[i] for i in (0, 4, 2, 5, 6, 1, 7, 3))

#: Sequential maps (perceptually uniform, colour-vision-deficiency safe) and the
#: diverging map used for signed metrics. Plotly names are given beside.
SEQUENTIAL = "viridis"
SEQUENTIAL_ALT = "cividis"
DIVERGING = "RdBu_r"
PLOTLY_SCALES = {"viridis": "Viridis", "cividis": "Cividis", "RdBu_r": "RdBu_r",
                 "magma": "Magma", "plasma": "Plasma", "inferno": "Inferno", "PuOr": "PuOr"}

#: Line styles by pruning criterion: FFG (Fisher saliency) solid, magnitude dashed.
CRITERION_STYLES = {"fisher": "-", "ffg": "-", "saliency": "-", "magnitude": "--",
                    "random": ":"}
CRITERION_LABELS = {"fisher": "FFG (Fisher)", "ffg": "FFG (Fisher)", "saliency": "FFG (Fisher)",
                    "magnitude": "magnitude", "random": "random"}

#: Readable axis / colour-bar labels for the metric columns of the analysis frames.
METRIC_LABELS = {
    "mean_log10": "mean log10 v", "median_log10": "median log10 v",
    "q01": "1% quantile of log10 v", "q10": "10% quantile of log10 v",
    "q50": "median log10 v", "q90": "90% quantile of log10 v", "q99": "99% quantile of log10 v",
    "frac_zero": "fraction of v = 0",
    "cosine": "cosine of v", "pearson_log": "Pearson r of log10 v",
    "spearman_log": "Spearman rho of log10 v",
    "jaccard_top1": "Jaccard of top-1% v", "jaccard_top10": "Jaccard of top-10% v",
    "kept_frac": "kept fraction", "row_sparsity": "fraction of empty rows",
    "col_sparsity": "fraction of empty columns", "mask_rank": "mask rank",
    "random_row_sparsity": "fraction of empty rows", "random_col_sparsity": "fraction of empty columns",
    "mask_effective_rank": "mask effective rank", "stable_rank": "mask stable rank",
    "saliency_kept": "fraction of saliency kept", "threshold": "saliency threshold",
    "jaccard": "mask Jaccard", "tv_cosine": "task-vector cosine",
    "sign_conflict": "sign-conflict fraction",
    "curvature_weighted_conflict": "curvature-weighted conflict",
    "predicted_loss_increase": "predicted loss increase",
    "log10_v": "log10 v", "accuracy": "accuracy", "score": "accuracy",
}

#: Metrics whose natural range is signed around 0 (diverging colour map).
SIGNED_METRICS = frozenset({"tv_cosine"})

#: The range a bounded metric can take, used as colour limits where the cells are
#: few and annotated (pair matrices), so small differences are not blown up.
METRIC_RANGES = {
    "cosine": (0.0, 1.0), "pearson_log": (-1.0, 1.0), "spearman_log": (-1.0, 1.0),
    "jaccard_top1": (0.0, 1.0), "jaccard_top10": (0.0, 1.0), "jaccard": (0.0, 1.0),
    "tv_cosine": (-1.0, 1.0), "sign_conflict": (0.0, 1.0),
    "curvature_weighted_conflict": (0.0, 1.0), "kept_frac": (0.0, 1.0),
    "row_sparsity": (0.0, 1.0), "col_sparsity": (0.0, 1.0), "saliency_kept": (0.0, 1.0),
    "random_row_sparsity": (0.0, 1.0), "random_col_sparsity": (0.0, 1.0),
    "frac_zero": (0.0, 1.0),
}

# Fixed rcParams for every static figure: applied in a context, never globally.
# DejaVu Sans ships with matplotlib, so text renders the same on every machine.
_RC: dict[str, Any] = {
    "font.family": "DejaVu Sans",
    "font.size": 9.0,
    "axes.titlesize": 10.0,
    "axes.labelsize": 9.0,
    "xtick.labelsize": 8.0,
    "ytick.labelsize": 8.0,
    "legend.fontsize": 8.0,
    "legend.title_fontsize": 8.0,
    "legend.frameon": False,
    "figure.titlesize": 11.0,
    "figure.dpi": 100.0,
    "figure.facecolor": "white",
    "figure.constrained_layout.use": True,
    "savefig.dpi": 200.0,
    "savefig.facecolor": "white",
    "savefig.bbox": "tight",
    "axes.facecolor": "white",
    "axes.grid": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.formatter.useoffset": False,
    "axes.formatter.limits": (-3, 4),
    "lines.linewidth": 1.6,
    "lines.markersize": 4.5,
    "image.interpolation": "nearest",
    "image.cmap": SEQUENTIAL,
    "hatch.color": "white",
    "hatch.linewidth": 0.8,
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "svg.hashsalt": "curvlens",
}


@contextlib.contextmanager
def figure_style(**overrides: Any):
    """Context manager with curvlens' fixed matplotlib rcParams.

    Every static figure function draws inside it, so figures look the same
    whatever the global rcParams are; nothing global is changed.

    Examples
    --------
    >>> import matplotlib as mpl
    >>> with figure_style():
    ...     mpl.rcParams["font.family"]
    ['DejaVu Sans']
    """
    from cycler import cycler
    import matplotlib as mpl

    rc = dict(_RC, **{"axes.prop_cycle": cycler(color=list(CATEGORICAL))})
    rc.update(overrides)
    # Resolve the backend first: if pyplot's first figure is made inside
    # rc_context, leaving the context resets the backend and interactive mode, and
    # in a fresh Jupyter kernel no later figure would display.
    mpl.get_backend()
    interactive = mpl.is_interactive()
    try:
        with mpl.rc_context(rc):
            yield
    finally:
        mpl.interactive(interactive)


def styled(fn):
    """Decorator: run a static figure function inside :func:`figure_style`."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with figure_style():
            return fn(*args, **kwargs)

    return wrapper


def new_axes(ax, figsize):
    """Return ``ax`` or a new Axes on a new figure of ``figsize`` inches."""
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize)
    return ax


def color(i: int) -> str:
    """The i-th categorical colour (Okabe-Ito, cycling)."""
    return CATEGORICAL[i % len(CATEGORICAL)]


def dashes(i: int) -> str:
    """Line style of the i-th category: solid for the first 8, then dashed, dotted."""
    return ("-", "--", ":", "-.")[(i // len(CATEGORICAL)) % 4]


def metric_label(metric: str) -> str:
    """A readable label for a metric column (the column name when unknown)."""
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


def criterion_label(criterion: str) -> str:
    return CRITERION_LABELS.get(str(criterion).lower(), str(criterion))


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------


def check_frame(df, needed: Sequence[str], what: str) -> pd.DataFrame:
    """Raise CurvlensError unless ``df`` is a DataFrame holding ``needed`` columns."""
    if not isinstance(df, pd.DataFrame):
        raise CurvlensError(f"{what} expects a pandas DataFrame; got {type(df).__name__}")
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise CurvlensError(
            f"{what} needs columns {list(needed)}; missing {missing} (has {list(df.columns)})"
        )
    if df.empty:
        raise CurvlensError(f"{what} got an empty DataFrame")
    return df


def check_numeric(df: pd.DataFrame, column: str, what: str) -> np.ndarray:
    """The column as float64, or a CurvlensError naming it."""
    try:
        return pd.to_numeric(df[column], errors="raise").to_numpy(dtype="float64", na_value=np.nan)
    except (TypeError, ValueError) as err:
        raise CurvlensError(f"{what}: column {column!r} must be numeric; got "
                            f"{df[column].dtype}") from err


def _matches(series: pd.Series, value: Any) -> pd.Series:
    if isinstance(value, (list, tuple, set, frozenset)):
        out = pd.Series(False, index=series.index)
        for v in value:
            out |= _matches(series, v)
        return out
    if isinstance(value, (float, np.floating)) and pd.api.types.is_numeric_dtype(series):
        return pd.Series(np.isclose(series.to_numpy(dtype="float64", na_value=np.nan), value,
                                    rtol=1e-9, atol=1e-12), index=series.index)
    if value is None:
        return series.isna()
    return series == value


def apply_filters(df: pd.DataFrame, filters: Mapping[str, Any], what: str) -> pd.DataFrame:
    """Keep the rows where each ``column == value`` (a list/tuple means any of).

    Floats are compared with a tolerance (densities such as 0.1 survive a CSV
    round trip). A filter value of ``None`` is ignored. An unknown column or a
    filter that keeps nothing raises CurvlensError listing what is available.
    """
    for column, value in filters.items():
        if value is None:
            continue
        if column not in df.columns:
            raise CurvlensError(f"{what}: cannot filter on {column}={value!r}; the frame has "
                                f"no column {column!r} (columns: {list(df.columns)})")
        kept = df[_matches(df[column], value)]
        if kept.empty:
            available = sorted(map(str, pd.unique(df[column].dropna())))
            raise CurvlensError(f"{what}: {column}={value!r} matches no row; available: "
                                f"{', '.join(available)}")
        df = kept
    return df


def filter_title(filters: Mapping[str, Any]) -> str:
    """``"expert=math, density=0.2"`` from the filters that were applied."""
    parts = []
    for k, v in filters.items():
        if v is None:
            continue
        if isinstance(v, (list, tuple, set, frozenset)):
            v = "/".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
        elif isinstance(v, float):
            v = f"{v:g}"
        parts.append(f"{k}={v}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------
# Layers, roles, orders
# ---------------------------------------------------------------------------


def layer_value(x: Any) -> int | None:
    """An int layer index, or None for missing (None, NaN, pd.NA)."""
    if x is None or (not isinstance(x, str) and pd.isna(x)):
        return None
    try:
        f = float(x)
    except (TypeError, ValueError) as err:
        raise CurvlensError(f"layer must be an integer or missing; got {x!r}") from err
    if not math.isfinite(f) or f != int(f):
        raise CurvlensError(f"layer must be an integer or missing; got {x!r}")
    return int(f)


def layer_label(layer: int | None) -> str:
    return NON_LAYER if layer is None else str(layer)


def role_order(present: Iterable[str], roles: Sequence[str] | None = None) -> list[str]:
    """Roles in curvlens' fixed order (``ROLES``), unknown ones appended sorted.

    With ``roles`` given, exactly those (in that order).
    """
    if roles is not None:
        return list(roles)
    present = set(map(str, present))
    known = [r for r in ROLES if r in present]
    return known + sorted(present - set(ROLES))


def first_seen(values: Iterable[Any]) -> list:
    """Unique values in order of first appearance, missing values dropped."""
    def missing(v):
        return v is None or (not isinstance(v, (str, tuple)) and bool(pd.isna(v)))

    return [v for v in dict.fromkeys(values) if not missing(v)]


def weights_of(df: pd.DataFrame, weight: str | None, what: str, metric: str | None = None) -> np.ndarray | None:
    """The weight column (``numel`` by default) as floats, or None for equal
    weights; for ``metric``, the analyses' own rule
    (:func:`curvlens.passes.analysis_common.metric_weights`)."""
    if weight is None:
        return None
    if weight not in df.columns:
        raise CurvlensError(f"{what}: weight column {weight!r} is not in the frame "
                            f"(columns: {list(df.columns)}); pass weight=None for equal weights")
    check_numeric(df, weight, what)
    return metric_weights(df, metric, weight)


def auto_log(values: np.ndarray, log: bool | None, *, decades: float = 2.0) -> bool:
    """Whether to use a log colour scale: ``log`` if given, else when every finite
    value is positive and they span at least ``decades`` decades."""
    if log is not None:
        return bool(log)
    v = np.asarray(values, dtype="float64")
    v = v[np.isfinite(v)]
    if v.size < 2 or (v <= 0).any():
        return False
    return float(np.log10(v.max() / v.min())) >= decades


def is_signed(values: np.ndarray, metric: str) -> bool:
    """A diverging map fits: the metric is signed by nature or the data has both signs."""
    v = np.asarray(values, dtype="float64")
    v = v[np.isfinite(v)]
    return metric in SIGNED_METRICS or (v.size > 0 and v.min() < 0 < v.max())


def fmt_value(x: float) -> str:
    """Compact text for a cell annotation or hover value.

    Examples
    --------
    >>> [fmt_value(x) for x in (0.0882, 0.2, -10.53, 123.4, 3.2e-5, float("nan"))]
    ['0.09', '0.20', '-10.5', '123', '3.2e-05', '']
    """
    if x is None or not np.isfinite(x):
        return ""
    a = abs(x)
    if a == 0:
        return "0"
    if a < 1e-2 or a >= 1e4:
        return f"{x:.1e}"
    if a < 10:
        return f"{x:.2f}"
    return f"{x:.3g}"


def plotly_scale(cmap: str) -> str:
    """Plotly's name for a matplotlib colour map name (known ones), else unchanged."""
    return PLOTLY_SCALES.get(cmap, cmap)


def text_color_for(rgba) -> str:
    """Black or white text, whichever reads better on a cell of colour ``rgba``."""
    r, g, b = rgba[:3]
    lum = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "black" if lum > 0.45 else "white"


def require_plotly():
    """Import plotly.graph_objects, or say what to install."""
    try:
        import plotly.graph_objects as go
    except ImportError as err:  # pragma: no cover - plotly is a declared dependency
        raise CurvlensError("interactive figures need plotly: pip install plotly") from err
    return go


def require_widgets():
    """Import ipywidgets, or say what to install."""
    try:
        import ipywidgets
    except ImportError as err:  # pragma: no cover - ipywidgets is a declared dependency
        raise CurvlensError("explorers need ipywidgets: pip install ipywidgets") from err
    return ipywidgets


def plotly_color_kwargs(finite: np.ndarray, metric: str, *, center=None, zmin=None, zmax=None,
                        colorscale: str | None = None) -> dict:
    """Heatmap colour settings: a diverging scale centred on ``center`` (or 0) for
    signed metrics, else a sequential one; explicit ``zmin``/``zmax`` win."""
    if center is not None or is_signed(finite, metric):
        c = 0.0 if center is None else float(center)
        span = float(np.max(np.abs(finite - c))) if finite.size else 1.0
        return {"zmid": c, "zmin": c - span if zmin is None else zmin,
                "zmax": c + span if zmax is None else zmax,
                "colorscale": plotly_scale(colorscale or DIVERGING)}
    kw = {"colorscale": plotly_scale(colorscale or SEQUENTIAL)}
    if zmin is not None:
        kw["zmin"] = zmin
    if zmax is not None:
        kw["zmax"] = zmax
    return kw
