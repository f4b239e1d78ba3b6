"""What a figure's numbers are measured against: the chance level of unrelated experts.

A correlation of 0.2 or a Jaccard index of 0.07 means nothing without the value two
unrelated experts would give; every figure that shows an overlap marks it.
"""
from __future__ import annotations

__all__ = ["CHANCE_LEVELS", "jaccard_chance"]

#: What two unrelated experts would give (independent random patterns): the
#: reference line a figure of the metric shows. Correlations and cosines of signed
#: quantities: 0; a top-q Jaccard of independent orderings: q / (2 - q); the sign
#: conflict of independent signs: 1/2 (also weighted, the weights being unrelated to
#: the signs). A mask Jaccard depends on the density: :func:`jaccard_chance`.
CHANCE_LEVELS = {
    "pearson_log": 0.0, "spearman_log": 0.0, "tv_cosine": 0.0,
    "jaccard_top1": 0.01 / (2 - 0.01), "jaccard_top10": 0.1 / (2 - 0.1),
    "sign_conflict": 0.5, "curvature_weighted_conflict": 0.5,
}


def jaccard_chance(density: float) -> float:
    """Expected Jaccard index of two independent random masks of one density, d / (2 - d).

    Examples
    --------
    >>> round(jaccard_chance(0.1), 4)
    0.0526
    """
    return float(density) / (2.0 - float(density))
