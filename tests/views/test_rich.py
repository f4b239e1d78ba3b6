import base64
import re

import pandas as pd
import pytest

from curvlens.errors import CurvlensError
from curvlens.views import merge_scores
from curvlens.views.rich import ResultFrame, html_repr, result_html


def table():
    return pd.DataFrame({"model": ["OTA", "OTA"], "method": ["ota", "ota"],
                         "capability": ["addition", "facts"], "accuracy": [0.5, 0.25],
                         "n": [10, 10]})


def inline_png(html):
    (b64,) = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    return base64.b64decode(b64)


def test_result_html_has_table_and_deterministic_inline_png():
    a = result_html(table(), merge_scores, title="scores")
    b = result_html(table(), merge_scores, title="scores")
    assert a == b
    assert "<h4>scores</h4>" in a and "<table" in a and "addition" in a
    assert inline_png(a)[:8] == b"\x89PNG\r\n\x1a\n"


def test_result_html_truncates_and_reports_figure_errors():
    big = pd.DataFrame({"x": range(50)})
    out = result_html(big, lambda df: 1 / 0, max_rows=5)
    assert "5 of 50 rows shown" in out and "ZeroDivisionError" in out
    with pytest.raises(CurvlensError, match="DataFrame"):
        result_html([1, 2])


def test_html_repr_attaches_to_a_result_class():
    class MergeResult:
        def __init__(self, t):
            self.t = t
        _repr_html_ = html_repr(lambda r: r.t, merge_scores, title=lambda r: f"{len(r.t)} rows")

    html = MergeResult(table())._repr_html_()
    assert "<h4>2 rows</h4>" in html and inline_png(html)


def test_result_frame():
    r = ResultFrame(table(), merge_scores, title="demo")
    assert len(r) == 2 and "demo" in repr(r)
    assert r.png() == r.png()
    assert r.plot(kind="bars").patches
    assert "<img" in r._repr_html_()
    with pytest.raises(CurvlensError, match="no default figure"):
        ResultFrame(table()).plot()
