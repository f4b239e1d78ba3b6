"""Sliders that redraw one figure: ``ipywidgets.interactive`` without output capture.

``ipywidgets.interactive`` shows what its function draws by capturing the output
into an Output widget; under ``jupyter nbconvert --execute`` that stalls every such
cell until the cell timeout (see :mod:`curvlens.views.widget_output`).
:func:`figure_sliders` takes a function that *returns* its figure and sets it as
the Output widget's state: the same sliders in a live notebook, no stall in a
batch run, and the figure kept in the notebook's widget state, from which
``curvlens notebooks`` draws it on the rendered page.
"""
from __future__ import annotations

from typing import Any, Callable

from curvlens.errors import CurvlensError
from curvlens.views._common import require_widgets
from curvlens.views.widget_output import assemble, show_figure

__all__ = ["figure_sliders"]


def figure_sliders(draw: Callable[..., Any], **controls: Any):
    """Controls that redraw ``draw(**values)`` whenever one of them changes.

    Parameters
    ----------
    draw : callable
        Called with one keyword argument per control (its current ``value``);
        returns what to show: a matplotlib Figure or Axes, a plotly Figure, or
        anything IPython displays. It must not show the figure itself
        (``plt.show()``); a returned matplotlib figure is closed once shown.
    **controls : ipywidgets value widgets
        E.g. ``alpha=widgets.FloatSlider(...)``; the keyword is the argument name.

    Returns
    -------
    ipywidgets.VBox
        The controls above an Output area, with ``controls`` (name -> widget),
        ``figure`` (what ``draw`` last returned), ``figures`` (``{"figure": ...}``)
        and ``update()`` (redraw from the current values). Headless (no kernel),
        ``draw`` still runs on every change and ``figure`` follows it.

    Examples
    --------
    >>> import ipywidgets as widgets
    >>> box = figure_sliders(lambda n: "x" * n, n=widgets.IntSlider(value=2, min=0, max=5))
    >>> box.figure
    'xx'
    >>> box.controls["n"].value = 4
    >>> box.figure
    'xxxx'
    """
    widgets = require_widgets()
    if not callable(draw):
        raise CurvlensError(f"figure_sliders: draw must be callable; got {type(draw).__name__}")
    if not controls:
        raise CurvlensError("figure_sliders: give at least one control, e.g. alpha=FloatSlider(...)")
    bad = [k for k, c in controls.items() if not isinstance(c, widgets.ValueWidget)]
    if bad:
        raise CurvlensError(f"figure_sliders: controls {bad} are not ipywidgets value widgets "
                            "(FloatSlider, IntSlider, Dropdown, ...)")
    out = widgets.Output()
    figures: dict[str, Any] = {}

    def update(*_):
        shown = draw(**{k: c.value for k, c in controls.items()})
        fig = shown.figure if _is_axes(shown) else shown
        box.figure = figures["figure"] = fig
        show_figure(out, fig)
        _close(fig)

    box = assemble(widgets, [*controls.values(), out], controls, update, figures)
    for c in controls.values():
        c.observe(update, names="value")
    update()
    return box


def _is_axes(obj) -> bool:
    try:
        from matplotlib.axes import Axes
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        return False
    return isinstance(obj, Axes)


def _close(fig) -> None:
    """Close a matplotlib figure once shown: the inline backend would show it again
    at the end of the cell, and open figures pile up in memory."""
    try:
        import matplotlib.pyplot as plt
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover
        return
    if isinstance(fig, Figure):
        plt.close(fig)
