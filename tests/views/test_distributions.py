import numpy as np
import pandas as pd
import pytest

from curvlens.errors import CurvlensError
from curvlens.views import log10_histogram_grid, log10_histogram_plot, log10_histogram_plotly
from curvlens.views.distributions import histogram_steps


def hand_hist():
    rows = []
    for expert, counts in (("a", [1, 3]), ("b", [2, 2])):
        for role, scale in (("q", 1), ("down", 3)):
            for (lo, hi), c in zip([(-10.0, -9.0), (-9.0, -8.0)], counts):
                rows.append(dict(expert=expert, role=role, bin_left=lo, bin_right=hi,
                                 count=c * scale))
    return pd.DataFrame(rows)


def test_histogram_steps_sums_bins_and_fills_gaps():
    df = pd.DataFrame({"bin_left": [-3.0, -1.0, -3.0], "bin_right": [-2.0, 0.0, -2.0],
                       "count": [1, 2, 1]})
    edges, h = histogram_steps(df, stat="count")
    assert edges.tolist() == [-3.0, -2.0, -1.0, 0.0] and h.tolist() == [2.0, 0.0, 2.0]


def test_histogram_steps_rejects_mixed_binnings():
    df = pd.DataFrame({"bin_left": [-3.0, -2.5], "bin_right": [-2.0, -1.5], "count": [1, 1]})
    with pytest.raises(CurvlensError, match="binned differently"):
        histogram_steps(df)


def test_one_axes_one_stairs_per_expert_as_fractions():
    ax = log10_histogram_plot(hand_hist(), role="q")
    steps = ax.patches
    assert [s.get_label() for s in steps] == ["a", "b"]
    vals, edges = steps[0].get_data().values, steps[0].get_data().edges
    np.testing.assert_allclose(vals, [0.25, 0.75])
    np.testing.assert_allclose(edges, [-10, -9, -8])
    assert ax.get_xlabel() == "log10 v" and ax.get_ylabel() == "fraction of entries"
    assert "role=q" in ax.get_title()


def test_hue_role_sums_over_experts_and_counts():
    ax = log10_histogram_plot(hand_hist(), hue="role", stat="count", logy=True)
    by = {s.get_label(): s.get_data().values for s in ax.patches}
    np.testing.assert_allclose(by["q"], [3, 5])
    np.testing.assert_allclose(by["down"], [9, 15])
    assert ax.get_yscale() == "log"
    assert list(by) == ["q", "down"]   # fixed role order


def test_grid_has_a_panel_per_role_and_consistent_colours(frames):
    fig = log10_histogram_grid(frames["log10_histogram"], by="role", panels=["q", "down"])
    panels = [ax for ax in fig.axes if ax.patches]
    assert [ax.get_title() for ax in panels] == ["role: q", "role: down"]
    colours = [[tuple(p.get_edgecolor()) for p in ax.patches] for ax in panels]
    assert colours[0] == colours[1]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["math", "code", "instruct"]


def test_plotly_histograms(frames):
    fig = log10_histogram_plotly(hand_hist(), by="role")
    tr = fig.data[0]
    assert tr.name == "a" and "expert: a" in tr.hovertemplate and "role: q" in tr.hovertemplate
    np.testing.assert_allclose(tr.y, [0.25, 0.25, 0.75, 0.75])
    np.testing.assert_allclose(tr.x, [-10, -9, -9, -8])
    assert [a.text for a in fig.layout.annotations] == ["role: q", "role: down"]
    assert fig.layout.xaxis.title.text == "log10 v" or fig.layout.xaxis2.title.text == "log10 v"
    assert sum(t.showlegend for t in fig.data) == 2


def test_x_range_spans_the_occupied_bins_not_the_binning():
    wide = pd.concat([hand_hist(), pd.DataFrame([dict(expert=e, role=r, bin_left=lo, bin_right=lo + 1.0, count=0)
                                                 for e in "ab" for r in ("q", "down")
                                                 for lo in (-30.0, -29.0, -1.0)])], ignore_index=True)
    fig = log10_histogram_grid(wide)
    assert fig.axes[0].get_xlim() == (-10.5, -7.5)
    assert log10_histogram_plot(wide).get_xlim() == (-10.5, -7.5)
    assert tuple(log10_histogram_plotly(wide).layout.xaxis.range) == (-10.5, -7.5)
