import matplotlib as mpl
import numpy as np
import pandas as pd
import pytest

from curvlens.errors import CurvlensError
from curvlens.views._common import (
    NON_LAYER, apply_filters, auto_log, figure_style, layer_value, role_order,
)


def test_figure_style_is_a_context_not_global_state():
    before = mpl.rcParams["font.size"]
    with figure_style():
        assert mpl.rcParams["font.size"] == 9.0
        assert mpl.rcParams["pdf.fonttype"] == 42
    assert mpl.rcParams["font.size"] == before


@pytest.mark.parametrize("x, expected", [(3, 3), (3.0, 3), (np.int64(2), 2), (None, None),
                                         (np.nan, None), (pd.NA, None)])
def test_layer_value_accepts_ints_and_every_missing(x, expected):
    assert layer_value(x) == expected


def test_layer_value_rejects_non_integers():
    with pytest.raises(CurvlensError, match="layer must be an integer"):
        layer_value(2.5)


def test_role_order_is_fixed_and_keeps_unknown_roles():
    assert role_order(["down", "embed", "zzz", "q", "norm"]) == ["embed", "q", "down", "norm",
                                                                 "zzz"]
    assert role_order(["q", "k"], roles=["k", "q", "v"]) == ["k", "q", "v"]


def test_pool_ignores_nan_and_zero_weights_and_sums_additive_metrics():
    from curvlens.passes.analysis_common import pool

    assert pool("kept_frac", np.array([1.0, 3.0, np.nan]), np.array([1, 3, 5])) == pytest.approx(2.5)
    assert np.isnan(pool("kept_frac", np.array([np.nan]), np.array([1.0])))
    assert pool("predicted_loss_increase", np.array([1.0, 3.0, np.nan]), np.array([1, 3, 5])) == 4.0


def test_heatmap_cells_pool_as_aggregate_does():
    """One pooling rule: a layer x role cell equals aggregate's number for it,
    a mean for ratios and a sum for additive metrics (two norms in a layer)."""
    import pandas as pd

    from curvlens.passes.analysis_common import aggregate
    from curvlens.views.heatmaps import layer_role_matrix

    df = pd.DataFrame({"expert": "e", "name": ["a.norm1", "a.norm2", "a.q"], "layer": pd.array([0, 0, 0], "Int64"),
                       "role": ["norm", "norm", "q"], "numel": [8, 24, 64],
                       "kept_frac": [1.0, 0.0, 0.25], "predicted_loss_increase": [0.5, 1.5, 2.0]})
    for metric in ("kept_frac", "predicted_loss_increase"):
        cell = layer_role_matrix(df, metric).loc["0", "norm"]
        other = "predicted_loss_increase" if metric == "kept_frac" else "kept_frac"
        agg = aggregate(df.drop(columns=other), by=("layer", "role"))
        assert cell == pytest.approx(float(agg[agg.role == "norm"][metric].iloc[0])), metric
    assert layer_role_matrix(df, "predicted_loss_increase").loc["0", "norm"] == 2.0


def test_apply_filters_tolerates_float_roundoff_and_lists():
    df = pd.DataFrame({"density": [0.1 + 2e-17, 0.2, 0.3], "expert": ["a", "b", "c"]})
    assert len(apply_filters(df, {"density": 0.1}, "t")) == 1
    assert len(apply_filters(df, {"expert": ["a", "c"]}, "t")) == 2
    assert len(apply_filters(df, {"expert": None}, "t")) == 3


def test_apply_filters_errors_name_column_and_available_values():
    df = pd.DataFrame({"expert": ["a", "b"]})
    with pytest.raises(CurvlensError, match="available: a, b"):
        apply_filters(df, {"expert": "zz"}, "t")
    with pytest.raises(CurvlensError, match="no column 'density'"):
        apply_filters(df, {"density": 0.1}, "t")


def test_auto_log_only_for_positive_values_spanning_decades():
    assert auto_log(np.array([1e-6, 1e-2]), None)
    assert not auto_log(np.array([0.1, 0.9]), None)
    assert not auto_log(np.array([-1.0, 1e3]), None)
    assert auto_log(np.array([0.1, 0.9]), True)


def test_non_layer_label():
    assert NON_LAYER == "non-layer"
