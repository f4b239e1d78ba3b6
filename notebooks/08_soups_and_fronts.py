# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Sweeps, greedy soups and Pareto fronts
#
# Three ways to search over merges, each made of many merge + evaluate jobs:
#
# - **`cl.sweep`** runs a grid of merges (methods x parameters x coefficients), each
#   streamed into a temporary dir, evaluated and deleted, serially or on a dask
#   cluster, and returns one tidy frame (failures are rows, never dropped).
# - **`cl.greedy_soup`** (Wortsman et al. 2022, arXiv:2203.05482) adds experts to a
#   uniform soup in order of
#   their own score, keeping each only if the soup's score does not drop.
# - **`cl.pareto_front`** finds the trade-off front of task arithmetic
#   $\theta(c) = \theta_0 + \sum_j c_j \tau_j$ over the coefficients $c$: by MAP
#   (Li et al. 2025, arXiv:2406.07529: evaluate sampled $c$, fit a quadratic per
#   capability), or from the
#   experts' curvature alone, with **zero evaluations**: expert $i$'s predicted loss
#   $L_i(c) = \frac12 \sum v_i (\theta(c) - \theta_i)^2 = \frac12 (c - e_i)^\top G_i (c - e_i)$
#   is exactly quadratic in $c$, with Gram matrices $G_i[j,l] = \sum v_i \tau_j \tau_l$
#   from one streaming pass.
#
# (`docs/soups_and_fronts.md` has the details and the numbers measured on the zoo;
# averaging experts that share one sparsity mask, Zimmer et al. 2024,
# arXiv:2306.16788, is `cl.sparse_soup`, in `docs/fisher_and_soups.md`.)

# %% tags=["parameters"]
QUICK = True      # the quick zoo and few evaluations; False: the default zoo, more of them
CLIENT = None     # None: jobs run here, one after another; "local": a 2-worker dask LocalCluster;
                  # or any dask.distributed.Client (e.g. from dask-jobqueue)

# %%
# %matplotlib inline
import time

from IPython.display import Markdown, display

import curvlens as cl

FACTS = {}  # the computed facts the text relies on (read back by the tests)
zoo = cl.zoo.build("quick" if QUICK else "default")
experts = zoo.experts()
capabilities = dict(zoo.capabilities)
evaluate = zoo.evaluator()   # picklable: evaluate(model_dir) -> {capability: accuracy}
STARTED_HERE = CLIENT == "local"
if STARTED_HERE:             # one cluster for the whole notebook, not one per call
    CLIENT = cl.local_client(n_workers=2)
capabilities

# %% [markdown]
# ## A sweep
#
# `sweep_grid` builds the product of a method's parameter axes; grids of several
# methods concatenate with `+`. The last job asks for a TIES density above 1: it
# fails, and its row says why.

# %%
grid = (cl.sweep_grid("task_arithmetic", **{"lambda": [0.5] if QUICK else [0.3, 0.5, 0.7, 1.0]})
        + [{"method": "ota", "epsilon": 1e-26}]
        + ([] if QUICK else cl.sweep_grid("ties", density=[0.3, 0.7]) + [{"method": "linear"}])
        + [{"method": "ties", "density": 2.0}])
t0 = time.perf_counter()
runs = cl.sweep(experts, grid, evaluate, client=CLIENT, progress=False)
print(f"{len(grid)} jobs in {time.perf_counter() - t0:.1f} s")
runs.head(6)

# %%
table = runs.pivot_table(index="label", columns="metric", values="value", sort=False)
table.assign(mean=table.mean(axis=1)).round(3)

# %%
runs.loc[runs["status"] == "error", ["label", "error"]]

# %% [markdown]
# ## Greedy soup
#
# The ingredients are the experts (three of them with `QUICK`, to keep it short);
# the soup is their plain average (the `linear` merge). With `objective="mean"` the
# held-out score is the mean accuracy over the capabilities (`"worst"`: the lowest).

# %%
ingredients = experts.subset(["math", "code", "knowledge"]) if QUICK else experts
soup = cl.greedy_soup(ingredients, evaluate, "mean", client=CLIENT, progress=False)
print(soup)
soup.curve.drop(columns=["status", "error"]).round(3)

# %%
fig = cl.views.soup_curve(soup.curve, title="Greedy soup on the zoo (mean accuracy)")

# %% [markdown]
# ## The curvature-predicted front: zero evaluations
#
# One streaming pass gives every expert's Gram matrix; the front of the predicted
# losses over a dense sample of $c \in [0, 1]^4$ follows without merging anything.

# %%
t0 = time.perf_counter()
predicted = cl.pareto_front(experts, progress=False)
print(f"{predicted} in {time.perf_counter() - t0:.1f} s, no evaluation")
cl.views.significant(predicted.front.sort_values("loss_math").head())

# %% [markdown]
# Does it agree with measured scores? Evaluate sampled $c$ (the experts alone first,
# then random ones) and a few points of the predicted front, and compare: the
# Spearman correlation between minus each expert's predicted loss and the measured
# accuracy on its capability, and the distance in $c$ between the predicted front
# and the evaluated points that are non-dominated as measured. The experts alone
# (the corners, $c = e_i$) are left out of the correlation: there expert $i$'s own
# predicted loss is 0 by construction and its measured score is the expert's, so
# they would agree by definition, not by prediction.

# %%
checked = cl.pareto_front(experts, evaluate, predictor="curvature", capabilities=capabilities,
                          grams=predicted.grams,  # the Gram pass above, reused
                          n_samples=8 if QUICK else 16, n_checks=2 if QUICK else 4,
                          client=CLIENT, progress=False)
print(checked.summary)
agree_all = {r.metric: float(
    -checked.evaluated.loc[checked.evaluated["status"] == "ok", r.objective].rank().corr(
        checked.evaluated.loc[checked.evaluated["status"] == "ok", r.metric].rank()))
    for r in checked.agreement.itertuples()}
FACTS["curvature_check"] = {"agreement": checked.agreement[["metric", "n", "spearman"]].to_dict("records"),
                            "spearman_with_corners": agree_all, "n_evaluations": checked.summary["n_evaluations"],
                            "front_distance": checked.summary["front_distance"]}
cl.views.significant(checked.agreement.assign(**{"spearman with the corners": checked.agreement["metric"].map(agree_all)}))

# %%
fig = cl.views.front_plot(checked.dense, checked.evaluated, coefficients=["c_math", "c_knowledge"],
                          objectives=["loss_math", "loss_knowledge"], metrics=["addition", "facts"],
                          title="Curvature-predicted front, checked")

# %% [markdown]
# ## MAP: a surrogate fitted to evaluations
#
# Two experts (math and knowledge) and their two capabilities, so the front is a
# curve in the plane of $(c_\text{math}, c_\text{knowledge})$: sample $c$, merge and
# evaluate, fit a quadratic per capability, read the front off the surrogate, and
# evaluate points on it. A full quadratic in two coefficients has 6 weights, so it
# is fitted to twice as many evaluations (fitted to 6 it would pass through each
# of them and say nothing about the rest). Each accuracy is fitted on its logit
# scale, so the surrogate never predicts an accuracy outside $[0, 1]$. Its agreement
# is measured only on points it was not fitted to: 4 random held-out $c$ and the
# checks on its front. The curvature front of the same pair, with no evaluation,
# is set beside it.

# %%
pair = experts.subset(["math", "knowledge"])
pair_eval = zoo.evaluator(["addition", "facts"])
surrogate = cl.pareto_front(pair, pair_eval, n_samples=12 if QUICK else 24, n_holdout=4 if QUICK else 8,
                            n_checks=2 if QUICK else 4, client=CLIENT, progress=False)
curvature = cl.pareto_front(pair, progress=False)
coef = ["c_math", "c_knowledge"]
print(surrogate.summary)
gap_fronts = cl.front_distance(surrogate.front[coef], curvature.front[coef])
print("distance in c between the MAP and the curvature front:", round(gap_fronts, 3))
pred_cols = [f"pred_{m}" for m in ("addition", "facts")]
FACTS["map"] = {"n_fit": surrogate.summary["n_fit"], "n_weights": 6,
                "agreement": surrogate.agreement[["metric", "points", "n", "spearman", "mae"]].to_dict("records"),
                "pred_min": float(surrogate.dense[pred_cols].min().min()),
                "pred_max": float(surrogate.dense[pred_cols].max().max()),
                "front_gap_to_curvature": gap_fronts}
cl.views.significant(surrogate.agreement)

# %%
cl.views.significant(surrogate.evaluated.drop(columns=["error"]))

# %%
fig = cl.views.front_plot(surrogate.dense, surrogate.evaluated, title="MAP surrogate front (math, knowledge)")

# %%
if STARTED_HERE:  # close the cluster this notebook started (a Client of yours stays open)
    CLIENT.close()
    CLIENT.cluster.close()

# %% [markdown]
# ## What this shows

# %%
ok_runs = runs[runs["status"] == "ok"]
failed = runs.loc[runs["status"] == "error", "label"].unique().tolist()
curv = checked.agreement.set_index("metric")
mp = surrogate.agreement.set_index("metric")
soup_score = float(soup.curve["best"].dropna().iloc[-1])
FACTS["soup"] = {"ingredients": list(soup.ingredients), "score": soup_score,
                 "candidates": list(ingredients.names)}
FACTS["sweep"] = {"n_jobs": len(grid), "failed": failed}
display(Markdown(
    f"The sweep ran {len(grid)} jobs and kept every failure as a row ({', '.join(failed) or 'none failed'}). The "
    f"greedy soup kept {' + '.join(soup.ingredients)} of {', '.join(ingredients.names)} (mean accuracy "
    f"{soup_score:.3f})" + (", i.e. a single expert: the known failure mode of a greedy soup"
                            if len(soup.ingredients) == 1 else "") + ". "
    f"With no evaluation at all, the curvature-predicted losses rank the evaluated merges off the corners at "
    f"Spearman {curv['spearman'].min():+.2f} to {curv['spearman'].max():+.2f} over {int(curv['n'].min())} points per "
    f"capability (with the corners counted, {min(agree_all.values()):+.2f} to {max(agree_all.values()):+.2f}: "
    "the corners agree by construction). "
    f"MAP's surrogate, fitted to {surrogate.summary['n_fit']} evaluations (more than its 6 weights), ranks its "
    f"{int(mp['n'].min())} held-out points at Spearman "
    + ", ".join(f"{m} {r.spearman:+.2f}" for m, r in mp.iterrows())
    + " with mean absolute errors " + ", ".join(f"{m} {r.mae:.3f}" for m, r in mp.iterrows())
    + f", and predicts accuracies between {FACTS['map']['pred_min']:.2f} and {FACTS['map']['pred_max']:.2f}, inside "
    f"[0, 1]. The two fronts lie {gap_fronts:.2f} apart in $c$. With so few held-out points these correlations are "
    "rough: a front tells which merges to evaluate next, not which one is best."))
