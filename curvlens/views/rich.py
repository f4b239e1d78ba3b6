"""Results that render themselves in a notebook: a table plus a figure, as HTML.

:func:`result_html` turns a summary DataFrame and a figure function into one
HTML block (the table, then the figure as an inline base64 PNG).
:func:`html_repr` makes a ``_repr_html_`` method out of it for any result class,
and :class:`ResultFrame` wraps a DataFrame with a default figure. The PNG is
written without a date or version, so the same data gives the same HTML.
"""
from __future__ import annotations

import base64
import html
import io
from typing import Any, Callable

import pandas as pd

from curvlens.errors import CurvlensError
from curvlens.views._common import figure_style
from curvlens.views.heatmaps import layer_role_heatmap

__all__ = ["figure_png", "result_html", "html_repr", "ResultFrame"]

FigureFn = Callable[[pd.DataFrame], Any]


def figure_png(fig, *, dpi: float = 100) -> bytes:
    """PNG bytes of a matplotlib Figure (or Axes), with no date/version metadata."""
    fig = getattr(fig, "figure", fig)
    buf = io.BytesIO()
    with figure_style():
        fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def _draw(figure: FigureFn, frame: pd.DataFrame, dpi: float) -> bytes:
    import matplotlib.pyplot as plt

    drawn = figure(frame)
    fig = getattr(drawn, "figure", drawn)
    if not hasattr(fig, "savefig"):
        raise CurvlensError(f"the figure function must return a matplotlib Axes or Figure; "
                            f"got {type(drawn).__name__}")
    try:
        return figure_png(fig, dpi=dpi)
    finally:
        plt.close(fig)


def result_html(frame: pd.DataFrame, figure: FigureFn | None = None, *,
                title: str | None = None, max_rows: int = 20, dpi: float = 100,
                float_format: str = "{:.4g}") -> str:
    """HTML with ``title``, the table (at most ``max_rows`` rows) and the figure.

    Parameters
    ----------
    frame : pandas.DataFrame
        The summary to show.
    figure : callable ``frame -> Axes or Figure``, optional
        Draws the default figure (it is closed after rendering). A failing
        figure is reported in the HTML instead of hiding the table.
    title : str, optional
    max_rows : int
        Longer tables are cut, with a note saying how many rows there are.
    dpi : float
        Resolution of the inline PNG.
    float_format : str

    Returns
    -------
    str

    Examples
    --------
    >>> import pandas as pd
    >>> out = result_html(pd.DataFrame({"x": [1.5]}), title="demo")
    >>> out.startswith("<div class='curvlens-result'><h4>demo</h4>")
    True
    """
    if not isinstance(frame, pd.DataFrame):
        raise CurvlensError(f"result_html expects a DataFrame; got {type(frame).__name__}")
    parts = ["<div class='curvlens-result'>"]
    if title:
        parts.append(f"<h4>{html.escape(title)}</h4>")
    shown = frame.head(max_rows)
    parts.append(shown.to_html(float_format=float_format.format, border=0, max_cols=30))
    if len(frame) > max_rows:
        parts.append(f"<p><i>{max_rows} of {len(frame)} rows shown</i></p>")
    if figure is not None:
        try:
            png = _draw(figure, frame, dpi)
        except Exception as err:  # a repr must not raise; say what went wrong instead
            parts.append(f"<p><i>figure failed: {html.escape(type(err).__name__)}: "
                         f"{html.escape(str(err))}</i></p>")
        else:
            b64 = base64.b64encode(png).decode("ascii")
            parts.append(f"<img src='data:image/png;base64,{b64}' alt='"
                         f"{html.escape(title or 'figure')}'/>")
    parts.append("</div>")
    return "".join(parts)


def html_repr(frame_of: Callable[[Any], pd.DataFrame], figure: FigureFn | None = None, *,
              title: str | Callable[[Any], str] | None = None, **kwargs: Any):
    """A ``_repr_html_`` method for a result class.

    Parameters
    ----------
    frame_of : callable ``obj -> DataFrame``
        The summary of a result object.
    figure : callable ``frame -> Axes or Figure``, optional
    title : str or callable ``obj -> str``, optional
    **kwargs
        Passed to :func:`result_html`.

    Examples
    --------
    >>> import pandas as pd
    >>> class Result:
    ...     def __init__(self, df):
    ...         self.df = df
    ...     _repr_html_ = html_repr(lambda r: r.df, title="a result")
    >>> "<h4>a result</h4>" in Result(pd.DataFrame({"x": [1]}))._repr_html_()
    True
    """

    def _repr_html_(self) -> str:
        t = title(self) if callable(title) else title
        return result_html(frame_of(self), figure, title=t, **kwargs)

    return _repr_html_


def merge_result_html(result) -> str:
    """A :class:`~curvlens.passes.merge_result.MergeResult` in a notebook: its
    summary and the relative change by layer x role (what
    ``MergeResult.html_renderer`` is set to)."""
    table = result.summary().to_frame("value")
    return result_html(
        table, lambda _: layer_role_heatmap(result.report, "rel_delta",
                                            title=f"{result.method}: relative change by layer x role"),
        title=f"MergeResult: {result.method}, {len(result.report)} tensors"
              + (f", saved to {result.path}" if result.path else ""))


class ResultFrame:
    """A DataFrame with a default figure; renders as table + figure in a notebook.

    Parameters
    ----------
    frame : pandas.DataFrame
    figure : callable ``frame -> Axes or Figure``, optional
    title : str, optional

    Examples
    --------
    >>> import pandas as pd
    >>> r = ResultFrame(pd.DataFrame({"x": [1, 2]}), title="two rows")
    >>> len(r), r.frame.columns.tolist()
    (2, ['x'])
    """

    def __init__(self, frame: pd.DataFrame, figure: FigureFn | None = None, *,
                 title: str | None = None):
        if not isinstance(frame, pd.DataFrame):
            raise CurvlensError(f"ResultFrame expects a DataFrame; got {type(frame).__name__}")
        self.frame = frame
        self.figure = figure
        self.title = title

    def __len__(self) -> int:
        return len(self.frame)

    def __repr__(self) -> str:
        head = f"{self.title}\n" if self.title else ""
        return head + repr(self.frame)

    def plot(self, **kwargs: Any):
        """Draw the default figure (keyword arguments go to the figure function)."""
        if self.figure is None:
            raise CurvlensError("this ResultFrame has no default figure")
        return self.figure(self.frame, **kwargs)

    def png(self, *, dpi: float = 100) -> bytes:
        """The default figure as PNG bytes (deterministic)."""
        if self.figure is None:
            raise CurvlensError("this ResultFrame has no default figure")
        return _draw(self.figure, self.frame, dpi)

    def _repr_html_(self) -> str:
        # HTML only (no _repr_png_): a notebook would otherwise draw the figure twice.
        return result_html(self.frame, self.figure, title=self.title)
