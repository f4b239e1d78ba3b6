import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import LogNorm

from curvlens.errors import CurvlensError
from curvlens.views import layer_role_heatmap, layer_role_heatmap_plotly, layer_role_heatmaps
from curvlens.views.heatmaps import layer_role_matrix

Q0 = "model.layers.0.self_attn.q_proj.weight"


def hand_frame(layer_missing=None):
    return pd.DataFrame({
        "expert": ["a", "a", "a", "a", "b", "b"],
        "name": ["model.embed_tokens.weight", Q0, "model.layers.1.self_attn.q_proj.weight",
                 "model.layers.1.input_layernorm.weight", Q0, "lm_head.weight"],
        "layer": [layer_missing, 0, 1, 1, 0, layer_missing],
        "role": ["embed", "q", "q", "norm", "q", "lm_head"],
        "numel": [100, 10, 10, 2, 30, 100],
        "kept_frac": [0.5, 0.2, 0.4, 1.0, 0.6, 0.1],
    })


EXPECTED = np.array([[0.5, np.nan, np.nan, 0.1],      # non-layer: embed, lm_head
                     [np.nan, 0.5, np.nan, np.nan],   # layer 0: q = (10*.2 + 30*.6) / 40
                     [np.nan, 0.4, 1.0, np.nan]])     # layer 1


@pytest.mark.parametrize("missing", [None, np.nan, pd.NA])
def test_matrix_is_numel_weighted_with_a_non_layer_row_first(missing):
    m = layer_role_matrix(hand_frame(missing), "kept_frac")
    assert list(m.index) == ["non-layer", "0", "1"]
    assert list(m.columns) == ["embed", "q", "norm", "lm_head"]
    np.testing.assert_allclose(m.to_numpy(), EXPECTED)


def test_matrix_filters_and_equal_weights():
    m = layer_role_matrix(hand_frame(), "kept_frac", expert="b")
    assert m.loc["0", "q"] == pytest.approx(0.6)
    m = layer_role_matrix(hand_frame(), "kept_frac", weight=None)
    assert m.loc["0", "q"] == pytest.approx(0.4)


def test_matrix_errors_are_specific():
    with pytest.raises(CurvlensError, match="missing \\['nope'\\]"):
        layer_role_matrix(hand_frame(), "nope")
    with pytest.raises(CurvlensError, match="expert='zz' matches no row; available: a, b"):
        layer_role_matrix(hand_frame(), "kept_frac", expert="zz")
    with pytest.raises(CurvlensError, match="DataFrame"):
        layer_role_matrix({"a": 1}, "kept_frac")


def test_static_heatmap_image_ticks_and_colorbar():
    ax = layer_role_heatmap(hand_frame(), "kept_frac", annotate=True, expert="a")
    img = ax.images[0].get_array()
    expected = layer_role_matrix(hand_frame(), "kept_frac", expert="a").to_numpy()
    np.testing.assert_allclose(img.filled(np.nan), expected)
    assert img.mask.tolist() == np.isnan(expected).tolist()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["embed", "q", "norm"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["non-layer", "0", "1"]
    cbar = ax.images[0].colorbar
    assert cbar.ax.get_ylabel() == "kept fraction"
    assert "expert=a" in ax.get_title()
    texts = sorted(t.get_text() for t in ax.texts)
    assert texts == sorted(["0.50", "0.20", "0.40", "1.00"])


def test_static_heatmap_log_and_diverging_scales():
    df = hand_frame().assign(loss=[1e-6, 1e-4, 1e-3, 1e-2, 1e-5, 1e-1])
    ax = layer_role_heatmap(df, "loss")
    assert isinstance(ax.images[0].norm, LogNorm)
    assert ax.images[0].colorbar.ax.get_ylabel().endswith("(log scale)")
    df = hand_frame().assign(tv_cosine=[0.1, -0.3, 0.2, 0.05, -0.1, 0.0])
    ax = layer_role_heatmap(df, "tv_cosine")
    im = ax.images[0]
    assert im.get_cmap().name.startswith("RdBu_r")
    assert im.norm.vmin == pytest.approx(-im.norm.vmax)


def test_static_heatmap_draws_on_given_axes():
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    out = layer_role_heatmap(hand_frame(), "kept_frac", ax=ax, colorbar=False, title="T")
    assert out is ax and ax.get_title() == "T" and len(fig.axes) == 1


def test_small_multiples_share_one_colour_scale(frames):
    fig = layer_role_heatmaps(frames["mask_stats"], "kept_frac", criterion="fisher",
                              density=0.2)
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["expert = math", "expert = code",
                                                 "expert = instruct"]
    norms = {(ax.images[0].norm.vmin, ax.images[0].norm.vmax) for ax in panels}
    assert len(norms) == 1
    one = layer_role_matrix(frames["mask_stats"], "kept_frac", criterion="fisher",
                            density=0.2, expert="code")
    np.testing.assert_allclose(panels[1].images[0].get_array().filled(np.nan), one.to_numpy())


def test_plotly_heatmap_values_axes_and_hover():
    fig = layer_role_heatmap_plotly(hand_frame(), "kept_frac", annotate=True)
    tr = fig.data[0]
    np.testing.assert_allclose(np.array(tr.z, dtype=float), EXPECTED)
    assert list(tr.x) == ["embed", "q", "norm", "lm_head"]
    assert list(tr.y) == ["non-layer", "0", "1"]
    assert tr.colorbar.title.text == "kept fraction"
    name, layer, role, value, n = tr.customdata[1][1]
    assert Q0 in name and layer == "0" and role == "q" and value == "0.50" and n == 1
    assert "layer" in tr.hovertemplate and "role" in tr.hovertemplate
    assert fig.layout.yaxis.autorange == "reversed"


def test_plotly_heatmap_log_scale_uses_log10_values():
    df = hand_frame().assign(loss=[1e-6, 1e-4, 1e-3, 1e-2, 1e-5, 1e-1])
    tr = layer_role_heatmap_plotly(df, "loss").data[0]
    assert tr.z[0][0] == pytest.approx(-6)
    assert tr.colorbar.ticktext[0].startswith("1e")
    assert tr.customdata[0][0][3] == "1.0e-06"


def test_vmin_zero_keeps_a_linear_scale_and_log_with_vmin_zero_is_an_error():
    import pandas as pd

    from curvlens.errors import CurvlensError
    from curvlens.views import layer_role_heatmap

    df = pd.DataFrame({"name": ["a", "b"], "layer": [0, 1], "role": ["q", "k"], "numel": [4, 4],
                       "kept_frac": [0.001, 0.7]})
    ax = layer_role_heatmap(df, "kept_frac", vmin=0, vmax=1)  # spans decades, but vmin=0
    norm = ax.images[0].norm
    assert (norm.vmin, norm.vmax) == (0, 1) and type(norm).__name__ == "Normalize"
    import pytest

    with pytest.raises(CurvlensError, match="needs vmin > 0"):
        layer_role_heatmap(df, "kept_frac", vmin=0, log=True)


def test_figure_style_keeps_interactive_mode():
    import matplotlib as mpl

    from curvlens.views._common import figure_style

    before = mpl.is_interactive()
    mpl.interactive(True)
    try:
        with figure_style():
            pass
        assert mpl.is_interactive()
    finally:
        mpl.interactive(before)


def test_bounded_ranks_are_drawn_as_bounds_never_as_values():
    from curvlens.views.heatmaps import _grid

    df = pd.DataFrame({"name": ["l0.q", "l0.k", "l1.q"], "layer": pd.array([0, 0, 1], dtype="Int64"),
                       "role": ["q", "k", "q"], "numel": [100, 100, 100],
                       "mask_rank": [7.0, np.nan, 9.0], "mask_rank_at_least": [np.nan, 50.0, np.nan]})
    g = _grid(df, "mask_rank", weight="numel", roles=None, filters={}, what="t")
    assert g.values[0, 1] == 50.0 and g.bounded.tolist() == [[False, True], [False, False]]
    ax = layer_role_heatmap(df, "mask_rank", annotate=True)
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert len(hatched) == 1 and hatched[0].get_xy() == (0.5, -0.5)
    assert sorted(t.get_text() for t in ax.texts) == ["7.00", "9.00", "≥50"]
    fig = layer_role_heatmap_plotly(df, "mask_rank")
    text = np.asarray(fig.data[0].text)
    assert text[0, 1] == "≥50" and text[0, 0] == "" and "lower bound" in fig.data[0].customdata[0][1][3]
    # without the bound column nothing is invented
    g = _grid(df.drop(columns="mask_rank_at_least"), "mask_rank", weight="numel", roles=None, filters={}, what="t")
    assert np.isnan(g.values[0, 1]) and not g.bounded.any()
