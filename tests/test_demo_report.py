"""The demo report's regime and zoo sections read well: one table per scope
with only its own metrics, and the zoo in words and tables (no repr, no path)."""
import re
import types

import pandas as pd
import pytest

from curvlens import Experts
from curvlens.demo_report import models_table, regime_html, zoo_section
from curvlens.studies.regime import REGIME_SCOPES, regime_by_scope, regime_table
from tests.conftest import make_tiny_zoo


def _regime():
    norms = pd.DataFrame({"expert": ["a", "a", "b", "b"], "name": ["x", "y"] * 2,
                          "layer": pd.array([0, 1] * 2, dtype="Int64"), "role": ["q", "up"] * 2, "numel": 4,
                          "delta_sq": [0.01, 0.02, 0.04, 0.01], "base_sq": 1.0})
    inter = pd.DataFrame({"expert_a": ["a"], "expert_b": ["b"], "name": ["x"], "layer": pd.array([0], dtype="Int64"),
                          "role": ["q"], "numel": [4], "tv_cosine": [0.25]})
    overlap = inter.drop(columns="tv_cosine").assign(spearman_log=[0.8], cosine=[0.9])
    scores = pd.DataFrame({"model": ["base", "base", "expert: a", "expert: b", "m", "m"],
                           "capability": ["x", "y", "x", "y", "x", "y"],
                           "accuracy": [0.25, 0.25, 1.0, 0.5, 0.5, 0.5], "n": 8})
    return regime_table(norms, interference=inter, overlap=overlap, scores=scores, capabilities={"a": "x", "b": "y"})


def test_one_table_per_scope_with_only_its_metrics():
    tables = regime_by_scope(_regime())
    assert list(tables) == list(REGIME_SCOPES)  # expert, role, pair, capability, merge
    assert {k: list(t.columns) for k, t in tables.items()} == {
        "expert": ["relative_edit"], "role": ["relative_edit"], "pair": ["tv_cosine", "spearman_log", "cosine"],
        "capability": ["expert_gain", "gain_share", "eval_items"],
        "merge": ["gain_kept", "worst_gain_kept", "gain_kept x", "gain_kept y", "mean_retention", "worst_retention"]}
    # the gain kept is measured from the base: m keeps (0.5 - 0.25) / (1.0 - 0.25) of x's gain, all of y's
    assert tables["merge"].loc["m", "gain_kept x"] == pytest.approx(1 / 3)
    assert tables["merge"].loc["m", "gain_kept y"] == pytest.approx(1.0)
    assert not any(t.isna().any().any() for t in tables.values())
    assert list(tables["expert"].index) == ["a", "b"] and tables["role"].index.name == "role"
    assert list(regime_by_scope(_regime().query("scope == 'expert'"))) == ["expert"]  # absent scopes left out


def test_regime_html_has_no_nan_cells_and_a_caption_per_table():
    page = regime_html(_regime())
    assert page.count("<table") == 5 and "NaN" not in page and "nan" not in page
    for caption in REGIME_SCOPES.values():
        assert caption.replace("'", "&#x27;") in page


def test_the_zoo_section_says_what_the_zoo_is_without_a_repr_or_a_path(tmp_path):
    base, dirs, *_ = make_tiny_zoo(tmp_path / "cache-dir-xyz", n_experts=2)
    experts = Experts.from_dirs(base, dirs)
    zoo = types.SimpleNamespace(capabilities={"expert0": "addition", "expert1": "facts"})
    page = zoo_section(zoo, experts, "quick")
    assert "Experts(" not in page and "cache-dir-xyz" not in page and str(tmp_path) not in page
    n = int(experts.describe().numel.sum())
    assert re.search(rf"2 capability experts .* {len(experts.describe())} tensors, {n:,} parameters", page)
    table = models_table(experts, zoo.capabilities)
    assert list(table.index) == ["expert0", "expert1"] and list(table.capability) == ["addition", "facts"]
    assert set(table.curvature) == {"Adam exp_avg_sq (export/exp_avg_sq.safetensors)"}
    assert table.loc["expert0", "bias-corrected"] == "no"


def test_without_moments_the_table_says_none(tmp_path):
    base, dirs, *_ = make_tiny_zoo(tmp_path, n_experts=1)
    table = models_table(Experts.from_dirs(base, dirs, moments=False))
    assert list(table.columns) == ["curvature"] and table.curvature.tolist() == ["none"]


@pytest.mark.parametrize("missing", ["scope", "value"])
def test_regime_by_scope_names_a_frame_that_is_not_a_regime_table(missing):
    from curvlens import CurvlensError

    with pytest.raises(CurvlensError, match=missing):
        regime_by_scope(_regime().drop(columns=missing))
