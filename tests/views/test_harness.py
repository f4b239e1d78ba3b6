"""Harness score bars: one bar per model and task at the selected metric's value,
its standard error as the error bar; failed and unselected rows are not drawn."""
import numpy as np
import pandas as pd
import pytest

from curvlens import CurvlensError
from curvlens.views.harness import harness_scores, harness_scores_plotly


@pytest.fixture
def scores():
    rows = [("m1", "arc", "acc", 0.50, 0.02, True, "ok"), ("m1", "arc", "acc_norm", 0.55, 0.02, False, "ok"),
            ("m1", "gsm", "exact_match", 0.10, 0.01, True, "ok"), ("m2", "arc", "acc", 0.60, 0.03, True, "ok"),
            ("m2", "gsm", "exact_match", 0.20, np.nan, True, "ok"), ("m3", "arc", None, np.nan, np.nan, False, "error")]
    return pd.DataFrame(rows, columns=["model", "task", "metric", "value", "stderr", "selected", "status"])


def test_bars_are_the_selected_scores_with_their_errors(scores):
    ax = harness_scores(scores, title="t")
    heights = [round(float(p.get_height()), 3) for p in ax.patches]
    assert heights == [0.5, 0.1, 0.6, 0.2]                     # m1 (arc, gsm), then m2; m3 failed
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["m1", "m2"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["arc\n(acc)", "gsm\n(exact_match)"]
    caps = [c for c in ax.containers if hasattr(c, "has_yerr") and c.has_yerr]
    assert len(caps) == 2


def test_plotly_twin_carries_values_and_errors(scores):
    fig = harness_scores_plotly(scores)
    assert [tr.name for tr in fig.data] == ["m1", "m2"]
    np.testing.assert_allclose(fig.data[1].y, [0.6, 0.2])
    np.testing.assert_allclose(fig.data[1].error_y.array, [0.03, 0.0])   # no stderr: no bar, not a crash
    assert "±" in fig.data[0].hovertemplate


def test_a_frame_without_scores_is_refused(scores):
    with pytest.raises(CurvlensError, match="scored rows"):
        harness_scores(scores[scores["status"] == "error"])
    with pytest.raises(CurvlensError, match="needs columns"):
        harness_scores(scores.drop(columns="stderr"))
