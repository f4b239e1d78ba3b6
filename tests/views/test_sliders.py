"""figure_sliders: ipywidgets.interactive without output capture."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from curvlens.errors import CurvlensError
from curvlens.views import figure_sliders

widgets = pytest.importorskip("ipywidgets")


def test_redraws_on_every_change_and_closes_matplotlib_figures():
    calls = []

    def draw(alpha, n):
        calls.append((alpha, n))
        fig, ax = plt.subplots()
        ax.plot(range(n), [alpha] * n)
        return ax  # an Axes is shown as its figure

    box = figure_sliders(draw, alpha=widgets.FloatSlider(value=0.5, min=0, max=1),
                         n=widgets.IntSlider(value=3, min=1, max=9))
    assert calls == [(0.5, 3)] and box.figure is box.figures["figure"]
    first = box.figure
    assert not plt.fignum_exists(first.number)   # shown, then closed
    box.controls["n"].value = 5
    assert calls[-1] == (0.5, 5) and box.figure is not first
    assert box.figure.axes[0].lines[0].get_xdata().tolist() == [0, 1, 2, 3, 4]
    assert list(box.controls) == ["alpha", "n"] and box.children[-1].__class__.__name__ == "Output"


def test_rejects_what_is_not_a_control_or_not_callable():
    with pytest.raises(CurvlensError, match="not ipywidgets value widgets"):
        figure_sliders(lambda a: a, a=0.5)
    with pytest.raises(CurvlensError, match="at least one control"):
        figure_sliders(lambda: 1)
    with pytest.raises(CurvlensError, match="must be callable"):
        figure_sliders(3, a=widgets.FloatSlider())
