"""Every notebook runs top to bottom on the quick zoo, and its .ipynb matches its .py source.

The jupytext percent-format ``notebooks/NN_name.py`` is the one source of truth
(reviewable as text); the paired ``.ipynb`` is generated from it without outputs
(``jupytext --sync notebooks/*.py``). Execution uses ``curvlens.notebooks.execute_notebook``
(what ``curvlens notebooks`` runs) on the .py source, with the parameter cell's ``QUICK``
forced to True.

Facts: every number or comparison a notebook's text states is computed by a cell,
asserted there, and stored in the notebook's dict ``FACTS``; the executor appends a
cell that prints ``FACTS`` as one JSON line and reads it back, and ``FACT_CHECKS``
below checks, per notebook, the facts its text relies on.
"""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))


def test_there_are_notebooks():
    assert len(SOURCES) >= 7, [s.name for s in SOURCES]


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_ipynb_is_in_sync_and_clean(src):
    jupytext = pytest.importorskip("jupytext")
    ipynb = src.with_suffix(".ipynb")
    assert ipynb.exists(), f"run: jupytext --sync {src.relative_to(ROOT)}"
    from_py = jupytext.read(src)
    committed = jupytext.read(ipynb)
    assert [c.source for c in committed.cells] == [c.source for c in from_py.cells], \
        f"{ipynb.name} differs from its source; run: jupytext --sync {src.relative_to(ROOT)}"
    for cell in committed.cells:
        assert not cell.get("outputs"), f"{ipynb.name} is committed with outputs"


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.stem)
def test_notebook_executes(src, quick_zoo, tmp_path):
    pytest.importorskip("jupytext")
    from curvlens.notebooks import execute_notebook

    nb = __import__("jupytext").read(src)
    assert [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])], \
        f"{src.name} has no cell tagged 'parameters'"
    # the session's quick zoo cache, so notebooks reuse it instead of rebuilding. execute_notebook
    # runs without nbclient's front-end mimic of ipywidgets.Output (see curvlens/notebooks.py: with
    # it, nbclient 0.11 sends comm messages on the shell socket while it awaits the execute reply
    # on that same socket, and cells that display into an Output widget took the full timeout).
    nb, facts = execute_notebook(src, quick=True, cwd=tmp_path, timeout=600,
                                 extra_env={"CURVLENS_CACHE": quick_zoo.root.parent, "TQDM_DISABLE": "1"})
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    check = FACT_CHECKS.get(src.stem)
    if check is not None:
        check(facts)


# Each notebook's text states facts that its cells compute (and assert) into the dict
# FACTS; these checks say, per notebook, which facts the text relies on, so that a
# change of the zoo or of the code that makes a sentence false fails here.

def check_06_teaching(f):
    # (1) the level of v is not sigma^2/B alone: at sigma = 0.1 it is a memory of the early phase
    assert f["level_sigma01_min"] > 5 and abs(f["level_sigma10_median"] - 1) < 0.2
    assert f["level_mean_v_spread"] > 10 and f["level_slope_min"] > 0.9 and f["level_slope_max"] < 1.3
    # ... and the level matters to a merge (normalise none vs global)
    assert f["level_merge_c32_none"] > 1.5 * f["level_merge_c1"]
    assert abs(f["level_merge_c32_global"] / f["level_merge_c1"] - 1) < 0.05
    # (2) early v: every coordinate above its floor; the flattest's E[g^2] is noise (2 Delta L), not mean gradient
    assert f["step100_over_floor_min"] > 1 and f["step1_noise_share_flattest"] > 0.5
    assert f["v_over_eg2_step1"] < 0.01 and f["v_over_eg2_step100"] > 1 and f["v_over_eg2_final"] > 1
    # (3) magnitude close to FFG at alpha = -1 but not equal; worse than random near alpha = 0.5
    assert f["graft_m1_ffg"] < f["graft_m1_mag"] < 1.5 * f["graft_m1_ffg"]
    assert 0 < f["graft_worst_alpha"] < 1 and 0.5 in f["graft_mag_worse_than_random_alphas"]
    # (4) |tau| and h anti-correlated exactly for alpha > 0; at alpha = 0 the gap grows with the spread of h
    assert all((r < 0) == (float(a) > 0) for a, r in f["graft_spearman_by_alpha"].items() if float(a) != 0)
    gaps = list(f["spread_gap_by_decades"].values())
    assert gaps[0] == 0 and all(b > a for a, b in zip(gaps, gaps[1:]))
    # (5) a perfect overlap (scaled copy) still leaves a gain for curvature weighting
    assert f["scaled_copy_excess_rel_c5"] > 0.1
    # (6) FFG masks raise L1 + L2 of the p = 1 merge at every density and lower the p = 0 one
    assert f["bridge_masks_hurt_p1"] and all(x > f["bridge_p1_nomask"] for x in f["bridge_p1_masked"].values())
    assert f["bridge_masks_help_p0"] and f["bridge_merge_over_revert"] > 1
    # caveats: p = 1/2 hedges noisy curvature; diagonal weights lose the gain as H rotates; EF vs Hessian
    best = list(f["best_p_by_noise"].values())
    assert best[0] == 1.0 and all(b <= a for a, b in zip(best, best[1:])) and best[-1] < 0.5
    share = list(f["diag_share_of_gain"].values())
    assert abs(share[0] - 1) < 1e-9 and share[-1] < 0.5
    assert f["ef_opt_spread"] < 1.1 and f["ef_mis_last_over_median"] > 1.5
    assert f["adam_vs_torch_rel"] < 1e-8 and f["eg2_formula_vs_mc_median_rel"] < 0.1


VERDICTS = {"holds", "partly", "does not hold", "undecided", "not measured"}


def check_03_ffg_masks(f):
    # the verdict follows the counts it is computed from
    w, l_ = f["ffg_wins"], f["ffg_losses"]
    assert f["verdict"].startswith("FFG beats" if w > l_ else "magnitude pruning beats" if w < l_ else "FFG and")
    # (7) the random-mask reference for empty rows is computed, for both criteria and every density
    assert any(k.startswith("random_empty_rows_fisher_") for k in f)
    assert all(0 <= v <= 1 for k, v in f.items() if k.startswith(("empty_rows_", "random_empty_rows_")))
    # (4) the zoo's |tau|-v correlation and the spread of v, per expert
    assert f["spearman_tau_v"] and all(-1 <= r <= 1 for r in f["spearman_tau_v"].values())
    assert all(d > 0 for d in f["v_decades"].values())
    assert set(f["claims"]) == {"a", "b"} and set(f["claims"].values()) <= VERDICTS
    assert f["eval_n_min"] > 0


def check_02_curvature_overlap(f):
    # (8) the verdict is read from Spearman, the headline metric, whatever the other metrics say
    for label, v in f["gap_vs_overlap"].items():
        r = v["spearman"]
        assert v["verdict"].startswith("more overlap, smaller" if r < -0.3 else "more overlap, *larger*" if r > 0.3
                                       else "no clear link"), (label, v)
    assert f["mean_v_max_over_min"] >= 1 and len(f["mean_v"]) >= 2 and f["normalise_moves_merge_rel"] >= 0
    assert set(f["claims"]) == {"c"} and set(f["claims"].values()) <= VERDICTS


def check_05_merging(f):
    assert f["noise_se_mean_accuracy"] > 0 and f["mean_v_max_over_min"] >= 1
    readings = set(f["comparisons"].values())
    assert readings <= {"within noise", "better", "worse"}
    assert "linear -> FFG d=0.3 + linear combine" in f["comparisons"]
    assert "OTA p=0.5 -> OTA p=0.5, normalise global" in f["comparisons"]
    assert set(f["claims"]) == {"d"} and set(f["claims"].values()) <= VERDICTS


def check_04_interference(f):
    assert len(f["mask_effect"]) == 2 and all(r["predicted loss, ratio"] > 0 for r in f["mask_effect"])
    # the sentence on where the prediction can pick merges follows from the intervals it quotes
    agree = f["prediction_by_family"]
    decided = {m: agree[f"{m} | relative_loss"]["low"] > 0 for m in ("all", "all but drop-rescale")}
    assert f["prediction_ranks"] == ("all" if decided["all"] else "all but drop-rescale"
                                     if decided["all but drop-rescale"] else "none")
    assert set(f["claims"]) == {"d"} and set(f["claims"].values()) <= VERDICTS


def check_01_quickstart(f):
    assert set(f["claims"]) == {"c"} and set(f["claims"].values()) <= VERDICTS


def test_03_drops_the_false_random_mask_claim():
    text = (ROOT / "notebooks" / "03_ffg_masks.py").read_text()
    assert "almost no empty rows" not in text


FACT_CHECKS = {"06_teaching": check_06_teaching, "03_ffg_masks": check_03_ffg_masks,
               "02_curvature_overlap": check_02_curvature_overlap, "05_merging": check_05_merging,
               "04_interference": check_04_interference, "01_quickstart": check_01_quickstart}
