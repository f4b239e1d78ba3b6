"""The computed takeaways of figures/README.md read the right numbers off their frames."""
import pandas as pd

from curvlens.views.takeaways import (
    graft_takeaway, mask_overlap_takeaway, mask_structure_takeaway, merge_takeaway, pairs_takeaway,
)


def test_graft_takeaway_uses_the_gain_over_the_base():
    rows = [dict(expert="m", criterion=c, density=d, capability="add", score=s)
            for c, pts in {"fisher": [(0.1, 0.7), (0.2, 0.95)], "magnitude": [(0.1, 0.5), (0.2, 0.6)]}.items()
            for d, s in pts]
    sweep = pd.DataFrame(rows)
    # base 0.5, expert 1.0: 90% of the gain is 0.95 -> FFG at 0.2, magnitude never
    text = graft_takeaway(sweep, {"m": "add"}, {"m": 0.5}, {"m": 1.0})
    assert "m fisher 0.20 / magnitude none" in text and "gain over the base" in text
    # without a base, 90% of the expert's score (0.9): the same densities here
    assert "m fisher 0.20" in graft_takeaway(sweep, {"m": "add"}, None, {"m": 1.0})


def test_pairs_and_mask_overlap_takeaways_state_chance():
    df = pd.DataFrame([dict(expert_a="a", expert_b="b", name="t", layer=0, role="q", numel=10,
                            jaccard_top10=0.106, spearman_log=0.3, criterion="fisher", density=0.3, jaccard=0.35)])
    text = pairs_takeaway(df, ["spearman_log", "jaccard_top10"], "Overlap")
    assert "(chance 0)" in text and "2.0× chance 0.053" in text
    assert "fisher 0.350 (2.0× chance)" in mask_overlap_takeaway(df, 0.3)


def test_mask_structure_takeaway_against_a_random_mask():
    ms = pd.DataFrame([dict(expert="a", criterion="fisher", density=0.5, name="w", layer=0, role="q", numel=8,
                            kept_frac=0.5, row_sparsity=0.5, col_sparsity=0.0)])
    text = mask_structure_takeaway(ms, {"w": (2, 4)}, "fisher", 0.5)
    # random: rows empty with (1 - 0.5)^4 = 6.25%, columns with (1 - 0.5)^2 = 25%
    assert "50% of the rows and 0% of the columns" in text and "6.2% and 25%" in text
    assert "not more row/column structure" in text


def test_merge_takeaway_picks_the_best_merge():
    t = pd.DataFrame({"model": ["base", "expert: m", "A", "B"], "capability": "add",
                      "accuracy": [0.2, 0.8, 0.6, 0.7]})
    assert "B (0.700)" in merge_takeaway(t, {"m": "add"}, relative=False)
    rel = merge_takeaway(t, {"m": "add"}, relative=True)   # 0.7 / 0.8 = 0.875, 0.6 / 0.8 = 0.75
    assert "B (0.87)" in rel and "0.75 (add under A)" in rel
