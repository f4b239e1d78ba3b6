"""fisher_vs_adam_plot draws fisher_vs_adam's frame."""
import matplotlib.figure
import pandas as pd
import pytest

from curvlens.errors import CurvlensError
from curvlens.studies.fisher_vs_adam import FISHER_VS_ADAM_COLUMNS
from curvlens.views import fisher_vs_adam_plot, fisher_vs_adam_plotly


def _frame(merges=True):
    rows = []
    for e, v in (("math", 0.8), ("code", 0.7)):
        rows += [("curvature_overlap", "adam~fisher", e, None, None, m, v) for m in ("cosine", "spearman_log")]
        rows.append(("mask_jaccard", "adam~fisher", e, None, None, "jaccard@0.3", v - 0.1))
    rows += [("curvature_overlap", c, "math", "code", None, "spearman_log", x)
             for c, x in (("adam", 0.1), ("fisher", 0.2))]
    if merges:
        rows += [("merge_score", c, cap, None, "OTA+FFG", "accuracy", s)
                 for c in ("adam", "fisher") for cap, s in (("addition", 0.2), ("brackets", 0.7))]
    return pd.DataFrame(rows, columns=FISHER_VS_ADAM_COLUMNS)


def test_three_panels_or_fewer():
    fig = fisher_vs_adam_plot(_frame())
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes) == 3
    assert [a.get_title() for a in fig.axes][2] == "Merge scores by curvature"
    assert len(fisher_vs_adam_plot(_frame(merges=False)).axes) == 2
    fig = fisher_vs_adam_plotly(_frame())
    names = {t.name for t in fig.data if t.name}
    assert {"OTA+FFG with adam", "OTA+FFG with fisher", "FFG mask Jaccard (0.3)"} <= names


def test_bad_frames():
    with pytest.raises(CurvlensError, match="needs columns"):
        fisher_vs_adam_plot(pd.DataFrame({"x": [1]}))
    with pytest.raises(CurvlensError, match="no rows"):
        fisher_vs_adam_plot(_frame().assign(analysis="other", curvature="none"))
