import numpy as np
import pandas as pd
import pytest

from curvlens.errors import CurvlensError
from curvlens.views import merge_scores, merge_scores_plotly, normalized_scores

CMAP = {"math": "addition", "code": "brackets"}


def table():
    acc = {"base": (0.1, 0.0), "expert: math": (0.8, 0.1), "expert: code": (0.2, 0.5),
           "OTA": (0.6, 0.5), "TIES": (0.4, 0.6)}
    method = {"base": "base", "expert: math": "expert", "expert: code": "expert",
              "OTA": "ota", "TIES": "ties"}
    return pd.DataFrame([dict(model=m, method=method[m], capability=c, accuracy=a, n=100)
                         for m, pair in acc.items() for c, a in zip(("addition", "brackets"),
                                                                    pair)])


def test_normalized_scores_divide_by_the_matching_expert():
    n = normalized_scores(table(), CMAP)
    r = n.set_index(["model", "capability"])["relative"]
    assert r["OTA", "addition"] == pytest.approx(0.75)
    assert r["TIES", "brackets"] == pytest.approx(1.2)
    assert r["expert: code", "brackets"] == pytest.approx(1.0)
    assert (n.expert_accuracy[n.capability == "addition"] == 0.8).all()


def test_normalized_scores_errors():
    with pytest.raises(CurvlensError, match="no model 'expert: knowledge'"):
        normalized_scores(table(), {"knowledge": "facts"})
    with pytest.raises(CurvlensError, match="share a capability"):
        normalized_scores(table(), {"math": "addition", "code": "addition"})
    with pytest.raises(CurvlensError, match="needs a capability_map"):
        merge_scores(table(), normalized=True)


def test_dot_plot_rows_are_models_and_markers_capabilities():
    ax = merge_scores(table())
    assert [t.get_text() for t in ax.get_yticklabels()] == ["base", "expert: math",
                                                            "expert: code", "OTA", "TIES"]
    add, brk = ax.collections
    assert add.get_label() == "addition" and brk.get_label() == "brackets"
    np.testing.assert_allclose(add.get_offsets()[:, 0], [0.1, 0.8, 0.2, 0.6, 0.4])
    np.testing.assert_allclose(brk.get_offsets()[:, 0], [0.0, 0.1, 0.5, 0.5, 0.6])
    # dodged rows, around the model's row
    assert np.all(np.abs(add.get_offsets()[:, 1] - np.arange(5)) < 0.5)
    assert ax.get_xlabel() == "exact-match accuracy"


def test_normalized_dot_plot_has_reference_line_at_one():
    ax = merge_scores(table(), CMAP, normalized=True, models=["OTA", "TIES"])
    add = ax.collections[0]
    np.testing.assert_allclose(add.get_offsets()[:, 0], [0.75, 0.5])
    assert any(np.allclose(ln.get_xdata(), 1.0) for ln in ax.get_lines())
    assert "matching expert" in ax.get_xlabel()


def test_grouped_bars_heights():
    ax = merge_scores(table(), kind="bars", models=["OTA", "TIES"])
    heights = [p.get_height() for p in ax.patches]
    assert heights == pytest.approx([0.6, 0.5, 0.4, 0.6])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["addition", "brackets"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["OTA", "TIES"]


def test_plotly_merge_scores():
    fig = merge_scores_plotly(table(), CMAP, normalized=True)
    add = fig.data[0]
    assert add.name == "addition"
    assert list(fig.layout.yaxis.ticktext) == ["base", "expert: math", "expert: code", "OTA",
                                               "TIES"]
    assert np.all(np.abs(np.array(add.y) - np.arange(5)) < 0.5)
    assert add.x[3] == pytest.approx(0.75)
    assert add.customdata[3][0] == "OTA" and add.customdata[3][1] == "ota"
    assert "expert" in add.hovertemplate
    fig = merge_scores_plotly(table(), kind="bars")
    assert [t.name for t in fig.data][:2] == ["base", "expert: math"]
    assert list(fig.data[3].y) == [0.6, 0.5]
    assert fig.layout.yaxis.title.text == "exact-match accuracy"
