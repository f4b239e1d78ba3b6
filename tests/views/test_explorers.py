"""Explorers driven headless: set a control's value, check what is shown."""
import ipywidgets as widgets
import numpy as np
import pandas as pd
import pytest

from curvlens.errors import CurvlensError
from curvlens.views import curvature_explorer, mask_explorer, merge_explorer, pair_matrix
from curvlens.views.heatmaps import layer_role_matrix


def test_curvature_explorer_follows_pair_metric_layer_and_role(frames):
    ov = frames["curvature_overlap"]
    ex = curvature_explorer(ov, frames["pooled_moments"])
    assert isinstance(ex, widgets.VBox)
    assert set(ex.controls) == {"pair", "metric", "layer", "role"}
    expected = layer_role_matrix(ov, "pearson_log", expert_a="math", expert_b="code")
    np.testing.assert_allclose(np.array(ex.figure.data[0].z, dtype=float), expected.to_numpy())

    ex.controls["pair"].value = ("code", "instruct")
    expected = layer_role_matrix(ov, "pearson_log", expert_a="code", expert_b="instruct")
    np.testing.assert_allclose(np.array(ex.figure.data[0].z, dtype=float), expected.to_numpy())
    assert "code × instruct" in ex.figure.layout.title.text

    ex.controls["metric"].value = "jaccard_top10"
    assert ex.figure.data[0].colorbar.title.text == "Jaccard of top-10% v"

    ex.controls["layer"].value = "1"
    ex.controls["role"].value = "k"
    sub = ov[(ov.layer == 1) & (ov.role == "k")]
    np.testing.assert_allclose(np.array(ex.figures["matrix"].data[0].z, dtype=float),
                               pair_matrix(sub, "jaccard_top10").to_numpy())
    assert "layer=1, role=k" in ex.note.value
    grid = ex.figures["grid"]
    heat = [t for t in grid.data if t.type == "heatmap"]
    assert len(heat) == 2
    assert heat[0].customdata[0][0][:3].tolist() == ["model.layers.1.self_attn.k_proj.weight",
                                                     "1", "k"]
    assert heat[1].customdata[0][0][3] == "instruct"


def test_curvature_explorer_without_pooled_and_non_layer(frames):
    ex = curvature_explorer(frames["curvature_overlap"])
    assert "grid" not in ex.figures
    ex.controls["layer"].value = "non-layer"
    ex.controls["role"].value = "embed"
    assert "layer=non-layer" in ex.note.value
    ex.controls["layer"].value = "0"            # no embedding in layer 0
    assert "no tensor" in ex.note.value


def test_mask_explorer_density_slider_changes_the_heatmap(frames):
    ms = frames["mask_stats"]
    ex = mask_explorer(ms)
    assert ex.controls["criterion"].value == "fisher"
    assert list(ex.controls["density"].options) == [("0.05", 0.05), ("0.1", 0.1),
                                                    ("0.2", 0.2), ("0.3", 0.3),
                                                    ("0.5", 0.5), ("1", 1.0)]
    assert ex.controls["density"].value == 0.3
    before = np.array(ex.figure.data[0].z, dtype=float)

    ex.controls["density"].value = 0.05
    after = np.array(ex.figure.data[0].z, dtype=float)
    expected = layer_role_matrix(ms, "kept_frac", expert="math", criterion="fisher",
                                 density=0.05)
    np.testing.assert_allclose(after, expected.to_numpy())
    assert not np.allclose(before, after, equal_nan=True)
    assert "density 0.05" in ex.figure.layout.title.text
    assert "density 0.05" in ex.summary.value

    ex.controls["expert"].value = "all"
    ex.controls["criterion"].value = "magnitude"
    ex.controls["metric"].value = "row_sparsity"
    expected = layer_role_matrix(ms, "row_sparsity", criterion="magnitude", density=0.05)
    np.testing.assert_allclose(np.array(ex.figure.data[0].z, dtype=float), expected.to_numpy())
    assert ex.figure.data[0].colorbar.title.text == "fraction of empty rows"


class FakeMerge:
    """Returns a merge table whose accuracy encodes the parameters."""

    def __init__(self):
        self.calls = []

    def __call__(self, method, params):
        self.calls.append((method, dict(params)))
        acc = 0.1 + 0.5 * params.get("density", params.get("power", 0.2))
        return pd.DataFrame({"model": [f"{method}"] * 2, "method": [method] * 2,
                             "capability": ["addition", "brackets"],
                             "accuracy": [acc, acc / 2], "n": [10, 10]})


def reference():
    return pd.DataFrame({"model": ["expert: math", "expert: math", "expert: code",
                                   "expert: code"], "method": ["expert"] * 4,
                         "capability": ["addition", "brackets"] * 2,
                         "accuracy": [0.8, 0.1, 0.2, 0.6], "n": 10})


def test_merge_explorer_runs_on_method_and_slider_changes():
    fake = FakeMerge()
    ex = merge_explorer(fake, ["linear", "ties", "ota"], reference=reference(),
                        capability_map={"math": "addition", "code": "brackets"})
    assert fake.calls == [("linear", {})]
    assert ex.progress.bar_style == "success" and "done" in ex.status.value
    assert set(ex.controls) == {"method", "ties.density", "ties.lambda", "ota.power",
                                "ota.ffg_density", "normalized"}

    ex.controls["method"].value = "ties"
    assert fake.calls[-1] == ("ties", {"density": 0.5, "lambda": 1.0})
    ex.controls["ties.density"].value = 0.3
    assert fake.calls[-1] == ("ties", {"density": 0.3, "lambda": 1.0})
    assert list(ex.table.model.unique()) == ["expert: math", "expert: code", "ties"]
    assert "ties" in ex.table_widget.value and "0.250" in ex.table_widget.value
    dots = ex.figure.data[0]
    assert ex.figure.layout.yaxis.ticktext[-1] == "ties" and dots.x[-1] == pytest.approx(0.25)

    n = len(fake.calls)
    ex.controls["ota.power"].value = 0.9          # not the current method: no run
    assert len(fake.calls) == n
    ex.controls["ties.density"].value = 0.5       # seen before: served from the cache
    assert len(fake.calls) == n and "cached" in ex.status.value

    ex.controls["normalized"].value = True
    assert ex.figure.data[0].x[-1] == pytest.approx(0.35 / 0.8)
    assert "matching expert" in ex.figure.layout.xaxis.title.text


def test_merge_explorer_shows_failures_and_custom_sliders():
    def broken(method, params):
        raise RuntimeError("out of memory")

    ex = merge_explorer(broken, {"ota": {"power": (0.1, 1.0, 0.1, 0.5)}})
    assert ex.progress.bar_style == "danger"
    assert "RuntimeError: out of memory" in ex.status.value and ex.figure is None
    assert isinstance(ex.error, RuntimeError)
    ex = merge_explorer(FakeMerge(), {"ota": {"power": (0.1, 1.0, 0.1, 0.5)}}, run_now=False)
    assert ex.table is None and ex.figure is None
    ex.update()
    assert ex.table is not None


def test_merge_explorer_input_errors():
    with pytest.raises(CurvlensError, match="callable"):
        merge_explorer("not a function")
    with pytest.raises(CurvlensError, match="min <= default <= max"):
        merge_explorer(FakeMerge(), {"ties": {"density": (0.1, 1.0, 0.1, 2.0)}})
