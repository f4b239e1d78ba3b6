import numpy as np
import pandas as pd
import pytest

from curvlens.errors import CurvlensError
from curvlens.views import pair_matrix, pair_matrix_heatmap, pair_matrix_plotly


def pairs():
    return pd.DataFrame({
        "expert_a": ["a", "a", "b", "a"], "expert_b": ["b", "b", "c", "c"],
        "name": ["x", "y", "x", "x"], "layer": [0, 1, 0, 0], "role": ["q", "k", "q", "q"],
        "numel": [10, 30, 10, 10], "tv_cosine": [0.4, -0.4, 0.1, 0.2],
        "sign_conflict": [0.2, 0.6, 0.3, 0.4],
    })


def test_pair_matrix_symmetric_and_numel_weighted():
    m = pair_matrix(pairs(), "sign_conflict")
    assert list(m.index) == ["a", "b", "c"]
    assert m.loc["a", "b"] == m.loc["b", "a"] == pytest.approx(0.5)
    assert m.loc["c", "b"] == pytest.approx(0.3)
    assert np.isnan(np.diag(m.to_numpy())).all()
    m = pair_matrix(pairs(), "sign_conflict", role="q", diagonal=0.0)
    assert m.loc["a", "b"] == pytest.approx(0.2) and m.loc["a", "a"] == 0.0


def test_reversed_rows_feed_the_same_cell():
    df = pairs().assign(expert_a=["b", "a", "b", "a"], expert_b=["a", "b", "c", "c"])
    assert pair_matrix(df, "sign_conflict").loc["a", "b"] == pytest.approx(0.5)


def test_pair_heatmap_image_annotations_and_natural_limits():
    ax = pair_matrix_heatmap(pairs(), "sign_conflict")
    img = ax.images[0].get_array()
    np.testing.assert_allclose(img.filled(np.nan), pair_matrix(pairs(), "sign_conflict"))
    assert ax.images[0].get_clim() == (0.0, 1.0)
    assert sorted(t.get_text() for t in ax.texts) == sorted(["0.50", "0.50", "0.40", "0.40",
                                                              "0.30", "0.30"])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    assert ax.images[0].colorbar.ax.get_ylabel() == "sign-conflict fraction"
    ax = pair_matrix_heatmap(pairs(), "sign_conflict", limits="data")
    assert ax.images[0].get_clim() == pytest.approx((0.3, 0.5))


def test_signed_metric_uses_a_centred_diverging_map():
    ax = pair_matrix_heatmap(pairs(), "tv_cosine")
    im = ax.images[0]
    assert im.get_cmap().name.startswith("RdBu_r") and im.get_clim() == (-1.0, 1.0)


def test_errors():
    with pytest.raises(CurvlensError, match="experts='z'"):
        pair_matrix(pairs(), "tv_cosine", experts=["a", "z"])
    with pytest.raises(CurvlensError, match="limits="):
        pair_matrix_heatmap(pairs(), "tv_cosine", limits="auto")


def test_plotly_pair_matrix():
    fig = pair_matrix_plotly(pairs(), "tv_cosine")
    tr = fig.data[0]
    assert list(tr.x) == ["a", "b", "c"]
    np.testing.assert_allclose(np.array(tr.z, dtype=float),
                               pair_matrix(pairs(), "tv_cosine").to_numpy())
    a, b, value, n, numel = tr.customdata[0][1]
    assert (a, b, value, n, numel) == ("a", "b", "-0.20", 2, "40")
    assert tr.zmid == 0 and tr.zmin == -1 and tr.zmax == 1
    assert tr.colorbar.title.text == "task-vector cosine"


def test_heatmap_marks_chance_and_formats_every_cell_alike():
    import pandas as pd

    from curvlens.views import pair_matrix_heatmap

    rows = [dict(expert_a=a, expert_b=b, name="t", layer=0, role="q", numel=10, jaccard_top1=v)
            for (a, b), v in {("x", "y"): 0.0027, ("x", "z"): 0.01, ("y", "z"): 0.03}.items()]
    ax = pair_matrix_heatmap(pd.DataFrame(rows), "jaccard_top1")
    cells = sorted(t.get_text() for t in ax.texts)
    assert cells == ["0.003", "0.003", "0.010", "0.010", "0.030", "0.030"]
    assert ax.get_title().endswith("(chance 0.0050)")
    cbar = ax.figure.axes[-1]
    assert any(abs(ln.get_ydata()[0] - 0.01 / 1.99) < 1e-12 for ln in cbar.lines)
    assert "chance" not in pair_matrix_heatmap(pd.DataFrame(rows), "jaccard_top1", chance=None).get_title()
