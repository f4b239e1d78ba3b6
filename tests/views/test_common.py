import matplotlib as mpl
import numpy as np
import pandas as pd
import pytest

from curvlens.errors import CurvlensError
from curvlens.views._common import (
    NON_LAYER, apply_filters, auto_log, figure_style, layer_value, role_order, weighted_mean,
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


def test_weighted_mean_ignores_nan_and_zero_weights():
    assert weighted_mean(np.array([1.0, 3.0, np.nan]), np.array([1, 3, 5])) == pytest.approx(2.5)
    assert np.isnan(weighted_mean(np.array([np.nan]), np.array([1.0])))


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
