import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from curvlens.errors import CurvlensError
from curvlens.views import front_plot, soup_curve


def curve():
    return pd.DataFrame({
        "step": [0, 0, 0, 1, 2, 3], "phase": ["rank"] * 3 + ["soup"] * 3,
        "candidate": ["b", "a", "c", "b", "a", "c"], "score": [0.6, 0.5, 0.1, 0.6, 0.7, 0.3],
        "kept": [None, None, None, True, True, False], "best": [np.nan] * 3 + [0.6, 0.7, 0.7]})


def test_soup_curve_marks_kept_and_rejected_steps():
    fig = soup_curve(curve())
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == ["b", "+ a", "+ c"]
    kept, rejected = ax.collections[0], ax.collections[1]
    assert kept.get_offsets().tolist() == [[0, 0.6], [1, 0.7]] and rejected.get_offsets().tolist() == [[2, 0.3]]
    with pytest.raises(CurvlensError, match="no soup steps"):
        soup_curve(curve().query("phase == 'rank'"))
    with pytest.raises(CurvlensError, match="needs columns"):
        soup_curve(curve().drop(columns="best"))


def fronts():
    c = np.linspace(0, 1, 11)
    dense = pd.DataFrame({"source": "random", "c_x": c, "c_y": 1 - c, "pred_x": -(1 - c) ** 2,
                          "pred_y": -c ** 2, "on_front": c <= 0.5})
    ev = dense.iloc[[0, 5, 10]].drop(columns=["source", "on_front"]).assign(
        role="check", label=["p", "q", "r"], status=["ok", "ok", "error"], error=None,
        x=[-1.0, -0.3, np.nan], y=[0.0, -0.2, np.nan], measured_front=[True, True, False],
        predicted_front=[True, False, False])
    return dense, ev


def test_front_plot_panels_and_points():
    dense, ev = fronts()
    fig = front_plot(dense, ev)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    coef_ax, obj_ax, meas_ax = fig.axes
    assert len(coef_ax.collections[1].get_offsets()) == 6          # the 6 front points
    assert coef_ax.get_xlabel() == "c_x" and meas_ax.get_xlabel() == "x (measured)"
    ringed = meas_ax.collections[-1].get_offsets().tolist()
    assert ringed == [[-1.0, 0.0], [-0.3, -0.2]]                   # the failed job is not drawn
    assert len(front_plot(dense).axes) == 2
    with pytest.raises(CurvlensError, match="coefficient"):
        front_plot(dense, coefficients=["c_x", "c_z"])


def test_soup_curve_plotly_has_the_same_points():
    from curvlens.views import soup_curve_plotly

    fig = soup_curve_plotly(curve())
    best, kept, rejected, alone = fig.data
    assert [t.name for t in fig.data] == ["soup (best so far)", "kept", "rejected", "ingredients alone"]
    assert list(best.y) == [0.6, 0.7, 0.7] and best.line.shape == "hv"
    assert list(zip(kept.x, kept.y)) == [(0, 0.6), (1, 0.7)] and list(kept.customdata) == ["b", "a"]
    assert list(zip(rejected.x, rejected.y)) == [(2, 0.3)] and rejected.marker.symbol == "x"
    assert list(alone.customdata) == ["b", "a", "c"] and set(alone.x) == {-0.6}
    assert list(fig.layout.xaxis.ticktext) == ["b", "+ a", "+ c"] and "customdata" in kept.hovertemplate
    with pytest.raises(CurvlensError, match="soup_curve_plotly: the curve has no soup steps"):
        soup_curve_plotly(curve().query("phase == 'rank'"))
    assert len(soup_curve_plotly(curve().query("phase == 'soup'")).data) == 3  # no ingredients-alone trace


def test_front_plot_plotly_has_the_same_panels_and_points():
    from curvlens.views import front_plot_plotly

    dense, ev = fronts()
    fig = front_plot_plotly(dense, ev)
    assert [a.text for a in fig.layout.annotations] == ["coefficients", "predicted objectives", "measured scores"]
    by = {(t.name, t.xaxis): t for t in fig.data}
    front = by["predicted front", "x"]
    assert len(front.x) == 6 and list(front.x) == list(dense.c_x[dense.on_front])  # the 6 front points
    assert len(by["predicted front", "x2"].x) == 6 and len(by["sampled c", "x2"].x) == 5
    assert list(by["predicted front", "x3"].x) == list(dense.pred_x[dense.on_front])  # same units: drawn under
    ringed = by["measured non-dominated", "x3"]
    assert list(zip(ringed.x, ringed.y)) == [(-1.0, 0.0), (-0.3, -0.2)]  # the failed job is not drawn
    assert list(ringed.text) == ["p", "q"] and "x: %{x:.3f}" in ringed.hovertemplate
    assert list(by["predicted on front", "x3"].text) == ["p"]
    assert fig.layout.xaxis.title.text == "c_x" and fig.layout.xaxis3.title.text == "x (measured)"
    assert front.customdata.shape == (6, 4) and "c_x: %{customdata[0]" in front.hovertemplate
    two = front_plot_plotly(dense)
    assert len(two.layout.annotations) == 2 and {t.xaxis for t in two.data} == {"x", "x2"}
    with pytest.raises(CurvlensError, match="front_plot_plotly: coefficient"):
        front_plot_plotly(dense, coefficients=["c_x", "c_z"])
