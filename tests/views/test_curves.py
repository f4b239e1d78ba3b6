import numpy as np
import pandas as pd
import pytest

from curvlens.errors import CurvlensError
from curvlens.views import density_curve_panels, density_curves, density_curves_plotly
from curvlens.views.curves import own_capability_scores


def sweep():
    rows = []
    for e, own in (("math", "addition"), ("code", "brackets")):
        for crit, k in (("fisher", 0.05), ("magnitude", 0.3)):
            for d in (0.05, 0.2, 1.0):
                for cap in ("addition", "brackets"):
                    score = (1 - np.exp(-d / k)) if cap == own else 0.1
                    rows.append(dict(expert=e, criterion=crit, density=d, capability=cap,
                                     score=score))
    return pd.DataFrame(rows)


def test_own_capability_scores_picks_each_experts_capability():
    df = own_capability_scores(sweep(), {"math": "addition", "code": "brackets"})
    assert set(df.capability) == {"addition", "brackets"} and len(df) == 12
    mean = own_capability_scores(sweep())
    assert set(mean.capability) == {"mean"}
    row = mean[(mean.expert == "math") & (mean.criterion == "fisher") & (mean.density == 1.0)]
    assert row.score.item() == pytest.approx(((1 - np.exp(-20)) + 0.1) / 2)


def test_own_capability_scores_errors():
    with pytest.raises(CurvlensError, match="no capability for experts \\['code'\\]"):
        own_capability_scores(sweep(), {"math": "addition"})
    with pytest.raises(CurvlensError, match="no score on the own capability"):
        own_capability_scores(sweep(), {"math": "facts", "code": "brackets"})


def test_lines_per_expert_and_criterion():
    cmap = {"math": "addition", "code": "brackets"}
    ax = density_curves(sweep(), cmap)
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert set(lines) == {"math · FFG (Fisher)", "math · magnitude", "code · FFG (Fisher)",
                          "code · magnitude"}
    ln = lines["math · magnitude"]
    np.testing.assert_allclose(ln.get_xdata(), [0.05, 0.2, 1.0])
    np.testing.assert_allclose(ln.get_ydata(), 1 - np.exp(-np.array([0.05, 0.2, 1.0]) / 0.3))
    assert lines["math · FFG (Fisher)"].get_linestyle() == "-" and ln.get_linestyle() == "--"
    assert lines["math · FFG (Fisher)"].get_color() == ln.get_color()
    assert lines["code · magnitude"].get_color() != ln.get_color()
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.05", "0.2", "1"]
    assert ax.get_ylabel() == "accuracy on the expert's own capability"


def test_selection_and_linear_x():
    ax = density_curves(sweep(), experts=["code"], criteria=["fisher"], logx=False)
    assert [ln.get_label() for ln in ax.get_lines()] == ["code · FFG (Fisher)"]
    assert ax.get_xscale() == "linear" and ax.get_ylabel() == "mean accuracy over capabilities"


def test_plotly_curves():
    fig = density_curves_plotly(sweep(), {"math": "addition", "code": "brackets"})
    by = {t.name: t for t in fig.data}
    t = by["code · magnitude"]
    assert t.line.dash == "dash" and by["code · FFG (Fisher)"].line.dash == "solid"
    np.testing.assert_allclose(t.x, [0.05, 0.2, 1.0])
    assert list(t.customdata) == ["brackets"] * 3
    assert "expert: code" in t.hovertemplate and "density" in t.hovertemplate
    assert fig.layout.xaxis.type == "log"
    assert fig.layout.yaxis.title.text == "accuracy on the expert's own capability"


def test_base_line_fitted_axis_and_marked_log_scale():
    cmap = {"math": "addition", "code": "brackets"}
    ax = density_curves(sweep(), cmap, base={"math": 0.5, "code": 0.6})
    base_lines = [ln for ln in ax.lines if ln.get_linestyle() == ":" and len(set(ln.get_ydata())) == 1]
    assert sorted(float(ln.get_ydata()[0]) for ln in base_lines) == [0.5, 0.6]
    scores = own_capability_scores(sweep(), cmap)["score"]
    lo, hi = ax.get_ylim()
    assert lo <= scores.min() and hi >= scores.max() and lo > 0.0   # the data's range, not 0-1
    assert "log scale" in ax.get_xlabel()
    labels = [t.get_text() for leg in ax.figure.legends + [ax.get_legend()] if leg for t in leg.get_texts()]
    assert "base model (density 0)" in labels
    with pytest.raises(CurvlensError, match=r"base names experts \['art'\]"):
        density_curves(sweep(), cmap, base={"art": 0.1})


def test_panels_give_each_expert_its_own_range():
    cmap = {"math": "addition", "code": "brackets"}
    sw = sweep()
    sw.loc[(sw.expert == "code"), "score"] = 0.9 + 0.05 * sw.loc[(sw.expert == "code"), "score"]   # a narrow band
    fig = density_curve_panels(sw, cmap, base={"math": 0.2, "code": 0.85})
    axes = [a for a in fig.axes if a.get_visible()]
    assert [a.get_title() for a in axes] == ["math (on addition)", "code (on brackets)"]
    lo, hi = axes[1].get_ylim()
    assert lo >= 0.8 and hi - lo < 0.2          # code's band fills its panel
    assert axes[0].get_ylim()[0] < 0.2 <= axes[0].get_ylim()[1]
    assert all("log scale" in a.get_xlabel() for a in axes)


def test_plotly_range_fits_the_data():
    fig = density_curves_plotly(sweep(), {"math": "addition", "code": "brackets"}, base={"math": 0.5})
    lo, hi = fig.layout.yaxis.range
    assert lo < 0.5 < hi and hi < 1.1 and "log scale" in fig.layout.xaxis.title.text
