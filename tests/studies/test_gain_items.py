"""The gain-over-the-base yardstick and the paired bootstrap over evaluation items."""
import numpy as np
import pandas as pd
import pytest

from curvlens.errors import CurvlensError
from curvlens.studies.gain import gain_kept, merge_gain, pooled_gain, worst_gain
from curvlens.studies.item_bootstrap import ItemBootstrap, item_matrix, pool_resamples


def test_gain_kept_is_measured_from_the_base():
    # notebook 03's case: 0.900 with base 0.68 and expert 0.96 keeps 79% of the gain, not 94%
    assert float(gain_kept(0.90, 0.68, 0.96)) == pytest.approx(0.22 / 0.28)
    assert float(gain_kept(0.68, 0.68, 0.96)) == 0.0 and float(gain_kept(0.96, 0.68, 0.96)) == 1.0
    assert float(gain_kept(0.5, 0.68, 0.96)) < 0  # worse than the base
    assert np.isnan(gain_kept(0.9, 0.9, 0.9)) and np.isnan(gain_kept(0.9, 0.95, 0.9))  # no gain to keep
    arr = gain_kept(np.array([0.7, 0.8]), np.array([0.6, 0.6]), np.array([1.0, 0.6]))
    assert arr[0] == pytest.approx(0.25) and np.isnan(arr[1])


def test_pooled_and_worst_gain():
    m, b, e = [0.9, 0.5], [0.7, 0.0], [1.0, 1.0]
    assert float(pooled_gain(m, b, e)) == pytest.approx((0.2 + 0.5) / (0.3 + 1.0))
    assert worst_gain(m, b, e) == pytest.approx(0.5)
    arrays = [np.array([0.9, 1.0]), np.array([0.5, 0.0])]
    assert worst_gain(arrays, [np.array([0.7, 0.7]), np.array([0.0, 0.0])],
                      [np.array([1.0, 1.0])] * 2).tolist() == pytest.approx([0.5, 0.0])


def _table(acc: dict, n=None, items=None) -> pd.DataFrame:
    rows = []
    for model, per_cap in acc.items():
        for cap, a in per_cap.items():
            r = {"model": model, "capability": cap, "accuracy": a}
            if n:
                r["n"] = n
            if items:
                r["correct"] = items[model][cap]
            rows.append(r)
    return pd.DataFrame(rows)


def test_merge_gain_frame_and_the_rule_it_replaces():
    # the base answers x at 0.6: retention credits every merge with it, gain does not
    acc = {"base": {"x": 0.6, "y": 0.0}, "expert: a": {"x": 1.0, "y": 0.0}, "expert: b": {"x": 0.6, "y": 1.0},
           "m": {"x": 0.6, "y": 0.9}}
    g = merge_gain(_table(acc), {"a": "x", "b": "y"}).set_index(["model", "capability"])
    assert g.loc[("m", "x"), "gain_kept"] == 0.0 and g.loc[("m", "x"), "retention"] == pytest.approx(0.6)
    assert g.loc[("m", "pooled"), "gain_kept"] == pytest.approx(0.9 / 1.4)
    assert g.loc[("m", "worst"), "gain_kept"] == 0.0 and g.loc[("m", "worst"), "retention"] == pytest.approx(0.6)
    assert g.loc[("m", "pooled"), "accuracy"] == pytest.approx(0.75)
    with pytest.raises(CurvlensError, match="'base' row"):
        merge_gain(_table({k: v for k, v in acc.items() if k != "base"}), {"a": "x", "b": "y"})
    # an expert not above its base: no gain, left out of pooled and worst
    acc["expert: a"]["x"] = 0.5
    g = merge_gain(_table(acc), {"a": "x", "b": "y"}).set_index(["model", "capability"])
    assert np.isnan(g.loc[("m", "x"), "gain_kept"]) and g.loc[("m", "pooled"), "gain_kept"] == pytest.approx(0.9)


def test_item_bootstrap_is_paired_and_falls_back_honestly():
    items = {"a": {"x": "TTFF"}, "b": {"x": "TTTF"}}
    t = _table({"a": {"x": 0.5}, "b": {"x": 0.75}}, n=4, items=items)
    boot = ItemBootstrap(300, seed=1)
    s = boot.scores(t, ("model",))
    a, b = s["a", "x"], s["b", "x"]
    assert a.shape == (301,) and (a[0], b[0]) == (0.5, 0.75)
    assert (b >= a).all() and (b - a).max() > 0  # b is right wherever a is, on every resample
    # a second table of the same capability resamples the same items (paired across tables)
    s2 = boot.scores(_table({"c": {"x": 0.5}}, n=4, items={"c": {"x": "TTFF"}}), ("model",))
    assert np.array_equal(s2["c", "x"], a)
    # without items: binomial from n (unpaired); without n either: one fixed value
    nb = boot.scores(_table({"a": {"x": 0.5}}, n=4), ("model",))["a", "x"]
    assert nb[0] == 0.5 and set(np.round(nb * 4)) <= {0, 1, 2, 3, 4} and nb.std() > 0
    fixed = boot.scores(_table({"a": {"x": 0.5}}), ("model",))["a", "x"]
    assert (fixed == 0.5).all()
    assert boot.exact(t) and not boot.exact(_table({"a": {"x": 0.5}}, n=4))
    assert pool_resamples([a, b]).shape == (600,)


def test_item_matrix_refuses_what_is_not_per_item_results():
    assert item_matrix("TFT").tolist() == [True, False, True]
    for bad in ("", "TX", 101, None):
        with pytest.raises(CurvlensError, match="per-item results"):
            item_matrix(bad)
