import numpy as np
import pytest
from matplotlib.collections import PatchCollection
from matplotlib.contour import ContourSet

from curvlens.errors import CurvlensError
from curvlens.views import pair_grid, pair_grid_plotly

Q1 = "model.layers.1.self_attn.q_proj.weight"


def blocks(pooled, expert, name, column="log10_v"):
    sub = pooled[(pooled.expert == expert) & (pooled.name == name)]
    out = np.full((sub.row_block.max() + 1, sub.col_block.max() + 1), np.nan)
    out[sub.row_block, sub.col_block] = sub[column]
    return out


def test_panels_show_each_experts_blocks_on_one_scale(frames):
    pooled = frames["pooled_moments"]
    fig = pair_grid(pooled, ["math", "code"], layers=[0, 1], roles=["q", "down"])
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 2 * 2 * 2
    # order: layer, role, expert -> panel 4 is layer 1, q, math; panel 5 is layer 1, q, code
    np.testing.assert_allclose(panels[4].images[0].get_array(), blocks(pooled, "math", Q1))
    np.testing.assert_allclose(panels[5].images[0].get_array(), blocks(pooled, "code", Q1))
    assert len({ax.images[0].get_clim() for ax in panels}) == 1
    assert [ax.get_title() for ax in panels[:4]] == ["q · math", "q · code", "down · math",
                                                     "down · code"]
    assert panels[0].get_ylabel() == "layer 0" and panels[4].get_ylabel() == "layer 1"
    cbar = [ax for ax in fig.axes if ax.get_ylabel().startswith("log10 v")]
    assert cbar, "a colour bar labelled log10 v"
    assert "math vs code" in fig._suptitle.get_text()


def test_mask_overlay_contour_hatch_or_none(frames):
    pooled = frames["pooled_moments"]
    fig = pair_grid(pooled, layers=[0], roles=["q"], mask="contour")
    ax = [a for a in fig.axes if a.images][0]
    contours = [c for c in ax.collections if isinstance(c, ContourSet)]
    assert contours and list(contours[0].levels) == [0.5]
    fig = pair_grid(pooled, layers=[0], roles=["q"], mask="hatch")
    ax = [a for a in fig.axes if a.images][0]
    (coll,) = [c for c in ax.collections if isinstance(c, PatchCollection)]
    kept = (blocks(pooled, "math", "model.layers.0.self_attn.q_proj.weight", "mask_frac")
            >= 0.5).sum()
    assert len(coll.get_paths()) == kept and coll.get_hatch() == "///"
    fig = pair_grid(pooled, layers=[0], roles=["q"], mask=None)
    assert not [a for a in fig.axes if a.images][0].collections


def test_defaults_and_missing_panels(frames):
    pooled = frames["pooled_moments"]
    fig = pair_grid(pooled)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["q · math", "q · code", "k · math", "k · code", "v · math", "v · code",
                      "o · math", "o · code"]
    fig = pair_grid(pooled, layers=[None, 0], roles=["embed"])
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    assert texts.count("n/a") == 2   # layer 0 has no embedding


def test_errors(frames):
    pooled = frames["pooled_moments"]
    with pytest.raises(CurvlensError, match="exactly two"):
        pair_grid(pooled, ["math", "code", "instruct"])
    with pytest.raises(CurvlensError, match="experts='nobody'"):
        pair_grid(pooled, ["math", "nobody"])
    with pytest.raises(CurvlensError, match="mask="):
        pair_grid(pooled, mask="outline")
    with pytest.raises(CurvlensError, match="no tensor"):
        pair_grid(pooled, roles=["qkv"])


def test_plotly_grid_traces_share_a_colour_axis_and_hover(frames):
    pooled = frames["pooled_moments"]
    fig = pair_grid_plotly(pooled, ["math", "code"], layers=[1], roles=["q"])
    heat = [t for t in fig.data if t.type == "heatmap"]
    cont = [t for t in fig.data if t.type == "contour"]
    assert len(heat) == 2 and len(cont) == 2
    assert {t.coloraxis for t in heat} == {"coloraxis"}
    np.testing.assert_allclose(np.array(heat[1].z, dtype=float), blocks(pooled, "code", Q1))
    name, layer, role, expert, _ = heat[1].customdata[0][0]
    assert (name, layer, role, expert) == (Q1, "1", "q", "code")
    assert "log10 v" in heat[0].hovertemplate
    assert cont[0].contours.start == 0.5
    assert fig.layout.coloraxis.colorbar.title.text == "log10 v"
    assert [a.text for a in fig.layout.annotations][:2] == ["q · math", "q · code"]
