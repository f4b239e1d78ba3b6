"""Every notebook runs top to bottom under ``jupyter nbconvert --execute`` on the quick zoo,
its .ipynb matches its .py source, and the sentences its computed cells write agree
with the numbers they are written from.

The jupytext percent-format ``notebooks/NN_name.py`` is the one source of truth
(reviewable as text); the paired ``.ipynb`` is generated from it without outputs
(``jupytext --sync notebooks/*.py``). Each notebook is executed once, by
``curvlens.notebooks.execute_notebook(engine="nbconvert")``: the ``jupyter nbconvert
--to notebook --execute`` command itself, on the .py source with the parameter cell's
``QUICK`` forced to True.

Facts: the sentences that state a result are written by the cell that computes it,
from numbers it stores in the notebook's dict ``FACTS`` together with the choices the
sentence makes (which merge is best, whether a difference is beyond noise, which word
describes a correlation); the executor appends a cell that prints ``FACTS`` as one JSON
line and reads it back. ``FACT_CHECKS`` below recomputes, per notebook, each choice
from the stored numbers (a verdict from its p-value, a best merge from the scores, a
"within noise" from the difference and the noise scale), so a sentence that no longer
follows from its numbers fails here. Sentences with no number (derivations, how to
read a figure) are not checked here.
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
    from curvlens.notebooks import QUIET_ENV, execute_notebook

    nb = __import__("jupytext").read(src)
    assert [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])], \
        f"{src.name} has no cell tagged 'parameters'"
    # One run per notebook, by `jupyter nbconvert --to notebook --execute` itself (the command a
    # user types; it keeps nbclient's Output-widget mimic, under which a cell that captures output
    # into an Output widget used to wait for the full cell timeout: the timeout here is far below
    # the 600 s such a cell took). The session's quick zoo cache is reused, not rebuilt.
    nb, facts = execute_notebook(src, quick=True, cwd=tmp_path, timeout=300, engine="nbconvert",
                                 extra_env={"CURVLENS_CACHE": quick_zoo.root.parent, **QUIET_ENV})
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    FACT_CHECKS[src.stem](facts)


# Each notebook's sentences are written from FACTS; these checks recompute each
# choice a sentence makes from the stored numbers.

VERDICTS = {"holds", "partly", "does not hold"}


def _overlap_verdict_ok(verdict, spearman_min):
    """Claim (c)'s rule, when the verdict is one of the three (an interval may leave it undecided)."""
    if verdict not in VERDICTS:
        return True
    return verdict == ("holds" if spearman_min >= 0.7 else "partly" if spearman_min >= 0.4 else "does not hold")


def check_01_quickstart(f):
    s = f["summary"]
    kept = {c: (v["OTA+FFG"] - v["base"]) / (v["expert score"] - v["base"]) for c, v in s["scores"].items()
            if v["expert score"] > v["base"]}
    assert kept.keys() == s["gain_kept"].keys()
    assert all(abs(kept[c] - s["gain_kept"][c]) < 1e-9 for c in kept)
    assert s["least_kept"] == min(kept, key=kept.get) and s["most_kept"] == max(kept, key=kept.get)
    assert abs(s["merge_mean"] - sum(v["OTA+FFG"] for v in s["scores"].values()) / len(s["scores"])) < 1e-9
    assert abs(s["base_mean"] - sum(v["base"] for v in s["scores"].values()) / len(s["scores"])) < 1e-9
    word = "strongly" if s["spearman_min"] >= 0.7 else "partly" if s["spearman_min"] >= 0.4 else "weakly"
    assert s["overlap_word"] == word and s["spearman_min"] <= s["spearman_max"]
    assert _overlap_verdict_ok(f["claims"]["c"], s["spearman_min"])


def check_02_curvature_overlap(f):
    tests = f["overlap_gap_tests"]
    for label, v in f["gap_vs_overlap"].items():
        t = tests[label]["spearman_log"]
        assert v["spearman"] == t["rho"] and v["p"] == t["p"]
        sig = v["p"] < 0.05
        assert v["verdict"].startswith("more overlap, smaller" if sig and v["spearman"] < 0 else
                                       "more overlap, *larger*" if sig and v["spearman"] > 0 else
                                       "no significant link"), (label, v)
        others = [m for m, x in tests[label].items() if m != "spearman_log" and 5 * x["p"] < 0.05]
        assert sorted(v["significant_others"]) == sorted(others)
        assert v["low"] <= v["spearman"] <= v["high"]
    # "over n tensors only |rho| >= r reaches p < 0.05": the p-values agree with that bound
    r = f["min_significant_rho"]
    for per_metric in tests.values():
        for x in per_metric.values():
            if abs(x["rho"]) >= r + 0.02:
                assert x["p"] < 0.06, x
            elif abs(x["rho"]) <= r - 0.02:
                assert x["p"] > 0.04, x
    cos = tests["fisher (v / mean v per tensor)"]["cosine"]
    assert f["formula_reading"]["cosine_tracks_gap"] == (5 * cos["p"] < 0.05 and cos["rho"] < 0)
    mv = f["mean_v"]
    assert abs(f["mean_v_max_over_min"] - max(mv.values()) / min(mv.values())) < 1e-9
    assert f["mean_v_argmin"] == min(mv, key=mv.get) and f["mean_v_argmax"] == max(mv, key=mv.get)
    assert abs(f["normalise_moves_merge_rel"] - f["normalise_moved"] / f["raw_moved"]) < 1e-9
    assert f["agree_word"] == ("well" if f["pair_spearman_min"] >= 0.7 else "partly"
                               if f["pair_spearman_min"] >= 0.4 else "weakly")
    assert _overlap_verdict_ok(f["claims"]["c"], f["pair_spearman_min"])


def check_03_ffg_masks(f):
    # the verdict follows the counts it is computed from
    w, l_ = f["ffg_wins"], f["ffg_losses"]
    assert f["verdict"].startswith("FFG beats" if w > l_ else "magnitude pruning beats" if w < l_ else "FFG and")
    s = f["summary"]
    assert s["n_cases"] == w + f["ffg_ties"] + l_ and s["beyond_noise"] <= w
    diffs = s["diff_by_density"]
    assert float(s["best_density"]) == float(max(diffs, key=diffs.get))
    pairs = {(c, d): (f[f"empty_rows_{c}_{d}"], f[f"random_empty_rows_{c}_{d}"]) for c in ("fisher", "magnitude")
             for d in ("0.1", "0.3")}
    assert s["more_rows_than_random"] == all(o > r for o, r in pairs.values())
    assert s["ffg_most_rows"] == all(pairs[("fisher", d)][0] - pairs[("fisher", d)][1]
                                     > pairs[("magnitude", d)][0] - pairs[("magnitude", d)][1] for d in ("0.1", "0.3"))
    rho = list(f["spearman_tau_v"].values())
    top = max(abs(min(rho)), abs(max(rho)))
    assert f["tau_v_strength"] == ("weak" if top < 0.3 else "moderate" if top < 0.6 else "strong")
    assert f["tau_v_sign"] == ("negative" if max(rho) < 0 else "positive" if min(rho) > 0 else "mixed-sign")


def check_04_interference(f):
    # the sentence on where the prediction can pick merges follows from the intervals it quotes
    agree = f["prediction_by_family"]
    decided = {m: agree[f"{m} | relative_loss"]["low"] > 0 for m in ("all", "all but drop-rescale")}
    assert f["prediction_ranks"] == ("all" if decided["all"] else "all but drop-rescale"
                                     if decided["all but drop-rescale"] else "none")
    p = f["pick"]
    assert p["best_predicted"] == p["predicted_order"][0] and p["best_measured"] == p["measured_order"][0]
    assert p["predicted_rank_of_best"] == p["predicted_order"].index(p["best_measured"]) + 1
    assert p["can_pick"] == (p["p"] < 0.05 and p["rho"] > 0 and p["predicted_rank_of_best"] == 1)
    assert sorted(p["predicted_order"]) == sorted(p["measured_order"]) and p["n"] == len(p["measured_order"])
    s = f["summary"]
    top = max(abs(s["tv_cosine_min"]), abs(s["tv_cosine_max"]))
    assert s["tv_word"] == ("nearly orthogonal" if top < 0.1 else "aligned" if s["tv_cosine_min"] > 0.1 else "mixed")
    beyond = [abs(d) > 2 * s["noise_mean"] for d in s["mask_changes"]]
    assert s["mask_reading"] == ("beyond noise" if all(beyond) else "within noise" if not any(beyond)
                                 else "one beyond noise, one within")
    assert [r["mean accuracy, difference"] for r in f["mask_effect"]] == s["mask_changes"]


def check_05_merging(f):
    noise = f["noise_se_mean_accuracy"]
    for key, reading in f["comparisons"].items():
        d = f["comparison_diffs"][key]
        assert reading == ("within noise" if abs(d) < 2 * noise else "better" if d > 0 else "worse"), (key, d)
    s = f["summary"]
    assert abs(s["lead"] - (s["top_mean"] - s["second_mean"])) < 1e-12 and s["lead"] >= 0
    assert s["lead_beyond_noise"] == (s["lead"] > 2 * noise)
    assert all(s["rank1_beyond_noise"][k] == (abs(v) > 2 * noise) for k, v in s["rank1_mean_change"].items())
    # the merges with the best average and the best worst case are on the Pareto front by definition
    assert s["best_average"] in s["front"] and s["best_worst"] in s["front"]


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
    # exercises: (1b) f(c) = 2 f(2); (2a) the smallest n with 2 SE <= 0.05; (2b) the 12-item gap; (3) p = 1/2's cost
    c = f["ex1_c_double"]
    assert abs((c - 1) ** 2 / (1 + c) - 2 / 3) < 1e-9 and c > 2
    var = 0.8 * 0.2 + 0.85 * 0.15
    n = f["ex2_n_needed"]
    assert 2 * (var / n) ** 0.5 <= 0.05 < 2 * (var / (n - 1)) ** 0.5
    assert abs(f["ex2_facts_gap"] - 2 * (0.5 / 12) ** 0.5) < 1e-12
    assert f["ex3_best_p_at_s3"] == f["best_p_by_noise"]["3.0"] > 0
    assert f["ex3_safe_default"] == (max(f["ex3_regret"].values()) < 1.5)


def check_07_your_checkpoints(f):
    assert max(f["layout_max_diff"].values()) == 0.0            # "read back identically"
    assert abs(f["bias_factor"] / f["bias_formula"] - 1) < 1e-5  # the measured factor is the formula's
    assert f["fork_vs_density_max_diff"] == 0.0 and f["cli_returncode"] == 0
    assert f["sort_after"] > f["sort_before"]                    # "went from ... to ..." is a gain
    c = f["collapse"]
    assert abs(c["level_ratio"] - c["levels"]["sorter"] / c["levels"]["math"]) < 1e-9
    assert abs(c["edit_ratio"] - c["relative_edit"]["sorter"] / c["relative_edit"]["math"]) < 1e-9
    assert c["edit_dominates"] == (max(c["alternatives"].values()) < 0.5 * f["pair_scores"]["math alone addition"])
    assert c["sorter_lr"] > c["zoo_lr"]                          # "trained at ... , the zoo's experts at ..."
    # five Llama-3.1-8B experts: 8,029,995,008 parameters each, fp32 moments
    assert abs(f["llama_moments_gb"] - 5 * 8_029_995_008 * 4 / 1e9) < 1e-6
    # a Trainer-trained MoE: the fused expert moments are split into the saved tensors
    assert f["moe_fused_split"]
    # experts trained differently: levels differ many times over, raw and bias-corrected,
    # and the edits differ by more than 10x ...
    assert f["level_ratio_raw"] > 3 and f["level_ratio_corrected"] > 3 and f["edit_ratio"] > 10
    r = f["remedies"]
    # ... the warning fires unless normalise: global divides the levels out ...
    assert r["raw moments"]["level warning"] and r["bias_correction"]["level warning"]
    assert not r["normalise: global"]["level warning"] and not r["both"]["level warning"]
    # ... and the computed sentence says whether a remedy gave the math expert's addition back
    assert f["remedy_recovers"] == any(row["addition"] >= 0.5 * f["math_alone"] for row in r.values())


def check_08_soups_and_fronts(f):
    m = f["map"]
    assert m["n_fit"] > m["n_weights"]                           # "more than its 6 weights"
    assert all(r["points"] == "held out" for r in m["agreement"])
    assert 0.0 <= m["pred_min"] <= m["pred_max"] <= 1.0         # "predicts accuracies ... inside [0, 1]"
    c = f["curvature_check"]
    assert all(r["n"] == c["n_evaluations"] - 4 for r in c["agreement"])   # the 4 corners left out
    soup = f["soup"]
    assert set(soup["ingredients"]) <= set(soup["candidates"]) and soup["ingredients"]
    assert any("density=2" in label for label in f["sweep"]["failed"])     # the job that must fail did


def check_09_fisher_vs_adam(f):
    a, fl = f["adam_vs_fisher"], f["fisher_vs_fisher"]
    for e in a:
        for m, v in a[e].items():
            assert abs(f["gap_to_floor"][e][m] - (fl[e][m] - v)) < 1e-12
    below = sorted(e for e, g in f["gap_to_floor"].items() if all(x > 0.05 for x in g.values()))
    assert f["experts_below_floor"] == below
    for r in f["merge_diffs"]:
        d, noise = r["fisher - adam"], r["noise (2 SE)"]
        assert r["reading"] == ("within noise" if abs(d) <= noise else "Fisher better" if d > 0 else "Adam v better")
    s = f["summary"]
    assert s["n_beyond_noise"] == sum(r["reading"] != "within noise" for r in f["merge_diffs"])
    assert s["floor_spearman_min"] == min(v["spearman_log"] for v in fl.values())
    assert s["spearman_min"] == min(v["spearman_log"] for v in a.values())


def test_03_drops_the_false_random_mask_claim():
    text = (ROOT / "notebooks" / "03_ffg_masks.py").read_text()
    assert "almost no empty rows" not in text


def test_every_notebook_ends_with_a_computed_conclusion():
    """The last markdown heading of 01-09 is "What this shows", and a code cell follows it."""
    jupytext = pytest.importorskip("jupytext")
    for src in SOURCES:
        nb = jupytext.read(src)
        heads = [i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and "## What this shows" in c.source]
        assert heads, f"{src.name} has no 'What this shows' section"
        assert any(c.cell_type == "code" and "display(Markdown(" in c.source for c in nb.cells[heads[-1]:]), src.name


FACT_CHECKS = {"01_quickstart": check_01_quickstart, "02_curvature_overlap": check_02_curvature_overlap,
               "03_ffg_masks": check_03_ffg_masks, "04_interference": check_04_interference,
               "05_merging": check_05_merging, "06_teaching": check_06_teaching,
               "07_your_checkpoints": check_07_your_checkpoints, "08_soups_and_fronts": check_08_soups_and_fronts,
               "09_fisher_vs_adam": check_09_fisher_vs_adam}


def test_every_notebook_has_fact_checks():
    assert sorted(FACT_CHECKS) == sorted(s.stem for s in SOURCES)
