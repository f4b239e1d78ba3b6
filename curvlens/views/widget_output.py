"""Showing a figure in an ``ipywidgets.Output`` area, the one way every curvlens widget does it.

The explorers, the merge explorer and :func:`curvlens.views.sliders.figure_sliders`
never *capture* output into an Output widget (``with out: display(fig)``, which is
what ``ipywidgets.interactive`` does): captured output is routed through the
front-end, and nbclient's front-end mimic (what ``jupyter nbconvert --execute`` and
``jupytext --execute`` run) answers it with comm messages on the shell socket while
it waits for the cell's reply there, which stalls the run until the cell timeout
(measured on ``notebooks/06_teaching``: every slider cell waited the full timeout).
They set the figure as the widget's ``outputs`` state instead, which every
front-end renders the same way and which nbclient records in the notebook's widget
state (:func:`curvlens.notebooks.render_markdown` draws it from there).
"""
from __future__ import annotations

from typing import Any

__all__ = ["assemble", "in_kernel", "show_figure"]


def in_kernel() -> bool:
    """True inside a running IPython kernel (a notebook), False in a plain interpreter."""
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with ipywidgets
        return False
    ip = get_ipython()
    return ip is not None and getattr(ip, "kernel", None) is not None


def show_figure(out, fig) -> None:
    """Replace what the Output widget ``out`` shows by ``fig`` (only inside a kernel).

    ``fig`` is anything IPython can display: a plotly Figure (its own bundle), a
    matplotlib Figure (PNG through the display formatter), a DataFrame. Headless,
    nothing happens.
    """
    if not in_kernel():
        return
    from IPython import get_ipython

    data, metadata = {}, {}
    if hasattr(fig, "_repr_mimebundle_"):  # plotly: its bundle as the current renderer builds it
        data = fig._repr_mimebundle_(include=None, exclude=None) or {}
    if not data:
        data, metadata = get_ipython().display_formatter.format(fig)
    out.outputs = ({"output_type": "display_data", "data": data, "metadata": metadata},)


def assemble(widgets, rows, controls, update, figures) -> Any:
    """A ``VBox`` of ``rows`` carrying ``controls``, ``figures``, ``figure`` and ``update``."""
    box = widgets.VBox(rows)
    box.controls = controls
    box.figures = figures
    box.figure = None
    box.update = update
    return box
