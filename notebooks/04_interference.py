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
# # Interference: where experts pull against each other, and what a merge costs
#
# A merge hurts an expert where the other experts push the same parameters in a
# different direction *and* that expert's loss is sensitive to them. This notebook
# measures both on the demo zoo: how aligned the task vectors (Ilharco et al. 2023,
# arXiv:2212.04089) are (cosine), how often their signs conflict (the interference
# TIES resolves; Yadav et al. 2023, arXiv:2306.01708), and how much of that conflict
# sits on entries both experts care about (curvature-weighted). It then uses the experts' second moments to
# *predict*, before any evaluation, how much each merge method raises each expert's
# loss, and checks that prediction against the measured scores: does a lower
# predicted loss go with better scores, here?

# %% tags=["parameters"]
QUICK = True      # the quick zoo; False: the default zoo
DEVICE = "auto"   # "auto": CUDA when present, else CPU

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from IPython.display import Markdown, display

import curvlens as cl

FACTS = {}  # the computed facts the text relies on (read back by the tests)

zoo = cl.zoo.build("quick" if QUICK else "default")
experts = zoo.experts()
capabilities = dict(zoo.capabilities)
experts

# %% [markdown]
# ## Task-vector interference between experts
#
# For two experts $a, b$ with task vectors $\tau_a, \tau_b$ (one tensor at a time),
# `interference` reports
#
# * `tv_cosine` $= \langle\tau_a, \tau_b\rangle / (\lVert\tau_a\rVert\,\lVert\tau_b\rVert)$:
#   do the edits point the same way?
# * `sign_conflict`: the fraction of entries where both edits are non-zero with
#   opposite signs (what TIES resolves by electing a sign);
# * `curvature_weighted_conflict`: the share of the pair's jointly salient edit mass
#   that sits on conflicting entries,
#   $$\frac{\sum_{j \in \text{conflict}} w_j}{\sum_j w_j}, \qquad
#     w_j = \sqrt{v_{aj} v_{bj}}\,\lvert\tau_{aj}\rvert\,\lvert\tau_{bj}\rvert
#         = \sqrt{s_{aj}\, s_{bj}},$$
#   with $s = v\tau^2$ the FFG saliency. A conflict on an entry only one expert cares
#   about is cheap (give it to that expert); one where both care forces a trade-off.

# %%
inter = cl.interference(experts, device=DEVICE)
pairs_model = cl.aggregate(inter, by=())
pairs_model.round(3)

# %%
fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), constrained_layout=True)
for ax, m in zip(axes, ["tv_cosine", "sign_conflict", "curvature_weighted_conflict"]):
    cl.views.pair_matrix_heatmap(inter, m, ax=ax)

# %% [markdown]
# Two random, independent sign patterns conflict on half of the entries both edit.
# Comparing `sign_conflict` with `curvature_weighted_conflict` says whether the
# conflicts fall on the entries that matter (weighted > plain) or mostly on
# unimportant ones (weighted < plain):

# %%
ratio = pairs_model.assign(
    weighted_over_plain=pairs_model["curvature_weighted_conflict"] / pairs_model["sign_conflict"])
ratio[["expert_a", "expert_b", "sign_conflict", "curvature_weighted_conflict", "weighted_over_plain"]].round(3)

# %% [markdown]
# Where the conflicts sit, by layer × role (mean over expert pairs):

# %%
fig = cl.views.layer_role_heatmaps(inter, "curvature_weighted_conflict", by="expert_a", vmin=0, vmax=1,
                            log=False, title="curvature-weighted conflict, by first expert of each pair")

# %% [markdown]
# ## Predicting what a merge costs each expert
#
# Near expert $i$'s optimum its loss is approximately quadratic with the diagonal
# Fisher $F_i \approx v_i$, so replacing $\theta_i$ by the merged $\theta^{\text{merge}}$
# raises it by about
# $$\Delta L_i \approx \tfrac12 \sum_j v_{ij}\,\big(\theta^{\text{merge}}_j - \theta_{ij}\big)^2 .$$
# `predicted_loss` gives this per tensor, `compare_merges` sums it over the model for
# several merges in one streaming pass. The raw moments are used, so the absolute
# scale depends on the training run (batch size, bias correction); the numbers
# compare merges of the same experts. The merges (kept in memory, the zoo is small;
# DARE: Yu et al. 2024, arXiv:2311.03099; Fisher merging: Matena & Raffel 2022,
# arXiv:2111.09832):

# %%
MERGES = {
    "linear": ("linear", {}),
    "task arithmetic (λ=0.5)": ("task_arithmetic", {"lambda": 0.5}),
    "TIES (0.5)": ("ties", {"density": 0.5}),
    "DARE-TIES (0.5)": ("dare_ties", {"density": 0.5, "seed": 0}),
    "Fisher": ("fisher", {}),
    "OTA": ("ota", {"epsilon": 1e-26}),
    "OTA+FFG (0.3)": ("ota", {"epsilon": 1e-26, "ffg_density": 0.3, "fallback_to_base": True}),
    "OTA+FFG (0.1)": ("ota", {"epsilon": 1e-26, "ffg_density": 0.1, "fallback_to_base": True}),
}
merged = {label: cl.merge(experts, method, device=DEVICE, progress=False, **params)
          for label, (method, params) in MERGES.items()}
predicted = cl.compare_merges(experts, merged, device=DEVICE)
cl.views.significant(predicted.pivot_table(index="method", columns="expert", values="predicted_loss_increase",
                                           sort=False))

# %% [markdown]
# Where one merge's predicted cost comes from, per expert, by layer × role (log
# colour scale: the cost is concentrated in few tensors):

# %%
per_tensor = cl.predicted_loss(experts, merged["OTA+FFG (0.3)"], device=DEVICE)
fig = cl.views.layer_role_heatmaps(per_tensor, "predicted_loss_increase",
                            title="predicted loss increase under OTA+FFG (0.3), per expert")

# %% [markdown]
# ## Measured scores
#
# Every merge scored on every capability; each expert's own score is the reference.

# %%
scores = zoo.score(merged, device=DEVICE)  # base and experts first, with per-item results
table = scores[scores["method"] != "base"]  # the experts are the reference here
pivot = table.pivot_table(index="model", columns="capability", values="accuracy", sort=False)
pivot["mean"] = pivot.mean(axis=1)
pivot.round(3)

# %% [markdown]
# ## Does the predicted loss rank the merges?
#
# For each merge and expert: the predicted loss increase of that expert, and the
# measured drop on the expert's own capability, $\text{acc}_{\text{expert}} -
# \text{acc}_{\text{merge}}$. If the quadratic model captures what matters, larger
# predicted increases should go with larger drops: a positive rank correlation.

# %%
rel = cl.views.normalized_scores(table, capabilities)
own = rel[rel["model"].isin(merged)][["model", "expert", "capability", "expert_accuracy", "accuracy"]]
own = own.assign(drop=own["expert_accuracy"] - own["accuracy"]).rename(columns={"model": "method"})
points = own.merge(predicted, on=["method", "expert"])


def rank_corr(x, y):
    """Spearman rank correlation (Pearson correlation of the ranks)."""
    return float(pd.Series(x).rank().corr(pd.Series(y).rank()))


rho_all = rank_corr(points["predicted_loss_increase"], points["drop"])
per_expert = {e: rank_corr(g["predicted_loss_increase"], g["drop"])
              for e, g in points.groupby("expert", sort=False)}
cl.views.significant(points)

# %%
fig, ax = plt.subplots(figsize=(6.5, 4.2), constrained_layout=True)
for k, (e, g) in enumerate(points.groupby("expert", sort=False)):
    ax.scatter(g["predicted_loss_increase"], g["drop"], color=cl.views.OKABE_ITO[k % len(cl.views.OKABE_ITO)],
               label=f"{e} (ρ={per_expert[e]:+.2f})")
    for m, x, y in zip(g["method"], g["predicted_loss_increase"], g["drop"]):
        ax.annotate(m, (x, y), fontsize=6, alpha=0.7)
ax.set_xscale("log")
ax.set_xlabel("predicted loss increase ½ Σ v (θ_merge − θ_expert)²")
ax.set_ylabel("measured drop on own capability")
ax.set_title(f"per merge × expert, rank correlation ρ = {rho_all:+.2f}")
_ = ax.legend(fontsize=8, title="expert (ρ within expert)", title_fontsize=8)

# %% [markdown]
# Across experts the predicted scales differ (each expert's $v$ has its own scale),
# so the rank correlation *within* each expert, over merge methods, is the fairer
# test: it asks whether the prediction orders the merges correctly for that expert.

# %%
within = pd.Series(per_expert, name="rank correlation over merges").to_frame()
within.index.name = "expert"
mean_within = float(np.nanmean(list(per_expert.values())))
print(within.round(3).to_string())
print(f"\npooled over all points: rho = {rho_all:+.3f}; mean within-expert rho = {mean_within:+.3f}")
if np.isnan(mean_within):
    print("verdict: undefined here (an expert's measured drops do not vary across merges).")
elif mean_within > 0.3:
    print("verdict: on this zoo, a lower predicted loss increase goes with a smaller measured drop.")
elif mean_within < -0.3:
    print("verdict: on this zoo, the prediction orders the merges the WRONG way round.")
else:
    print("verdict: on this zoo, the predicted loss increase does not rank the merges reliably.")

# %% [markdown]
# The same at the model level: each merge's mean predicted increase against its
# mean score relative to the experts (1.0 = every expert's own score kept):

# %%
method_level = (points.assign(relative=points["accuracy"] / points["expert_accuracy"].where(
                    points["expert_accuracy"] > 0))
                .groupby("method", sort=False)[["predicted_loss_increase", "relative", "drop"]].mean())
rho_methods = rank_corr(method_level["predicted_loss_increase"], method_level["relative"])
print(f"rank correlation over merges (predicted increase vs relative score): {rho_methods:+.2f} "
      "(negative = lower predicted loss, better score)")
method_level.sort_values("predicted_loss_increase").round({"relative": 3, "drop": 3})

# %% [markdown]
# ## Where the prediction fails: merges that drop entries
#
# The diagonal quadratic prices every entry's error on its own. A unit of the
# network does not: its pre-activation sums a row, $\sum_j W_{rj} x_j$. A merge that
# drops entries of the edits at random and rescales the rest (DARE, DELLA) leaves
# errors that are unbiased and of independent sign; in that sum they largely cancel,
# yet the quadratic counts each one in full as lost. `split_merges` separates, row by
# row, the part of the predicted loss along each expert's own edit (*coherent*: it
# adds up in the unit's sum) from the rest (*residual*); the two add up to the
# diagonal prediction. Below, the rank agreement of each with the measured gain kept
# (the share of the experts' summed gain over the base a merge keeps), over every
# merge, over every merge but one family, and over one family alone, with its
# p-value and a 95% interval (merges and evaluation items resampled). Three more
# merges join the grid so that every sparsifying family is in it.

# %%
EXTRA = {"DARE-linear (0.5)": ("dare_linear", {"density": 0.5, "seed": 0}),
         "DELLA (0.5)": ("della", {"density": 0.5, "seed": 0}),
         "breadcrumbs (0.5)": ("breadcrumbs", {"density": 0.5})}
extra = {label: cl.merge(experts, m, device=DEVICE, progress=False, **p) for label, (m, p) in EXTRA.items()}
all_scores = pd.concat([scores, zoo.score(extra, reference=False, device=DEVICE)], ignore_index=True)
FAMILY = {"linear": "dense", "task arithmetic (λ=0.5)": "dense", "Fisher": "dense", "OTA": "dense",
          "TIES (0.5)": "trim", "breadcrumbs (0.5)": "trim", "DARE-TIES (0.5)": "drop-rescale",
          "DARE-linear (0.5)": "drop-rescale", "DELLA (0.5)": "drop-rescale",
          "OTA+FFG (0.3)": "curvature mask", "OTA+FFG (0.1)": "curvature mask"}
split = cl.split_merges(experts, {**merged, **extra}, device=DEVICE, progress=False)
agree = cl.agreement_by_family(split, all_scores, capabilities, FAMILY)
agree = agree[agree["predictor"].isin(["relative_loss", "relative_coherent_loss"])]
agree.round(3)

# %%
ag = agree.set_index(["merges", "predictor"])


def said(merges, predictor):
    """One agreement as text, decided by its interval (merges and items resampled; the p-value
    counts only the merges)."""
    r = ag.loc[(merges, predictor)]
    word = ("ranks them (its interval is above 0)" if r["low"] > 0
            else "ranks them the wrong way round (its interval is below 0)" if r["high"] < 0
            else "is undecided (its interval includes 0)")
    return f"{word} (ρ = {r['spearman']:+.2f}, 95% interval {r['low']:+.2f} to {r['high']:+.2f}, p = {r['p_value']:.2g})"


FACTS["prediction_by_family"] = {f"{m} | {p}": {k: float(ag.loc[(m, p), k]) for k in ("spearman", "low", "high")}
                                 for m, p in ag.index}
n_all = int(ag.loc[("all", "relative_loss"), "n_merges"])
ranks = {m: bool(ag.loc[(m, "relative_loss"), "low"] > 0) for m in ("all", "all but drop-rescale")}
FACTS["prediction_ranks"] = ("all" if ranks["all"] else "all but drop-rescale" if ranks["all but drop-rescale"]
                             else "none")
if ranks["all"]:
    use = "Here it ranks the whole grid: it can discard clearly worse merges before they are evaluated."
elif ranks["all but drop-rescale"]:
    use = ("The drop-and-rescale merges are what it cannot rank here: it can discard merges of the other "
           "families before evaluating them, but a merge that drops entries at random has to be evaluated.")
else:
    use = "Here it cannot rank the merges even without the drop-and-rescale ones: evaluate them."
display(Markdown(
    f"Over all {n_all} merges the diagonal prediction {said('all', 'relative_loss')}; without the "
    f"drop-and-rescale merges it {said('all but drop-rescale', 'relative_loss')}. Its coherent part "
    f"{said('all', 'relative_coherent_loss')} over all merges. {use}"))

# %% [markdown]
# ## How far a merge overrides each expert
#
# `interference` with `merged=` adds the merged model's own edit $\theta^{\text{merge}}
# - \theta_0$ as a participant: its `tv_cosine` with each expert says how much of
# that expert's direction survives, its curvature-weighted conflict how much of the
# expert's salient edit the merge reverses.

# %%
over = pd.concat([cl.aggregate(cl.interference(experts, merged=merged[label], merged_label="merged",
                                             pairs=[(e, "merged") for e in experts.names],
                                             device=DEVICE, progress=False), by=())
                  .assign(method=label)
                  for label in ["linear", "TIES (0.5)", "OTA", "OTA+FFG (0.3)"]], ignore_index=True)
over.pivot_table(index="method", columns="expert_a", values="tv_cosine", sort=False).round(3)

# %%
over.pivot_table(index="method", columns="expert_a", values="curvature_weighted_conflict",
                 sort=False).round(3)

# %% [markdown]
# Reading the two analyses together: interference between experts says *where* a
# merge must trade one expert against another; the predicted loss increase and the
# override tables say *which* trade each method made. Could the prediction choose
# the merge without evaluating every candidate (what matters when one evaluation
# takes hours on a real model)? Only where it orders the merges as their measured
# scores do, which is computed here, with a permutation p-value over the merges:

# %%
pred_by_method = predicted.groupby("method", sort=False)["predicted_loss_increase"].mean()
measured_mean = pivot.loc[list(pred_by_method.index), "mean"]
pick = cl.spearman_test(-pred_by_method, measured_mean, seed=0)   # + : lower predicted loss, better score
order_pred = list(pred_by_method.sort_values().index)
order_meas = list(measured_mean.sort_values(ascending=False).index)
best_meas, best_pred = order_meas[0], order_pred[0]
rank_of_best = order_pred.index(best_meas) + 1
can_pick = pick["p"] < 0.05 and pick["rho"] > 0 and rank_of_best == 1
FACTS["pick"] = {"rho": pick["rho"], "p": pick["p"], "n": pick["n"], "best_measured": best_meas,
                 "best_predicted": best_pred, "predicted_rank_of_best": rank_of_best, "can_pick": can_pick,
                 "predicted_order": order_pred, "measured_order": order_meas}
display(Markdown(
    f"Over these {pick['n']} merges, minus the mean predicted loss increase and the measured mean accuracy have "
    f"rank correlation {pick['rho']:+.2f} (p = {pick['p']:.2f}). The merge predicted cheapest is {best_pred} "
    f"(measured rank {order_meas.index(best_pred) + 1} of {len(order_meas)}); the one measured best, {best_meas}, "
    f"is predicted {rank_of_best}{'st' if rank_of_best == 1 else 'nd' if rank_of_best == 2 else 'rd' if rank_of_best == 3 else 'th'} "
    f"of {len(order_pred)}. "
    + ("Here the prediction would have picked the best merge without evaluating the others."
       if can_pick else
       "So here the prediction cannot pick a method or its parameters in place of evaluating them: "
       + ("it does not rank these merges better than chance would. " if pick["p"] >= 0.05 or pick["rho"] <= 0
          else "it ranks them better than chance but misses the best one. ")
       + "At most it can shortlist, and the shortlist has to be evaluated (`docs/predicted_loss.md` says where "
         "the diagonal quadratic fails: sparsifying merges move entries it prices as lost).")))
cl.views.significant(pd.DataFrame({"predicted loss (mean over experts)": pred_by_method,
                                   "measured mean accuracy": measured_mean}).sort_values(
                                       "predicted loss (mean over experts)"))

# %% [markdown]
# ## What the masks cost a merge here, predicted and measured
#
# Notebook `06` (section 4) shows that on a diagonal quadratic toy FFG masks *raise*
# the merge's loss when the weights are the exact curvature: an entry one expert
# masks takes the other expert's value, which costs the first
# $\tfrac12 v_{ij}(\tau_{kj} - \tau_{ij})^2$, not the saliency's $\tfrac12 v_{ij}\tau_{ij}^2$.
# The predicted loss increase above is exactly that quadratic, diagonal model of the
# zoo's experts; the scores are what the real (non-quadratic, non-diagonal) networks
# do. Where the two disagree about the masks, the toy's model does not describe
# this merge.

# %%
pred_total = predicted.groupby("method", sort=False)["predicted_loss_increase"].sum()
score_mean = pivot["mean"]
rows = []
for masked in ["OTA+FFG (0.3)", "OTA+FFG (0.1)"]:
    rows.append({"from": "OTA", "to": masked,
                 "predicted loss, ratio": float(pred_total[masked] / pred_total["OTA"]),
                 "mean accuracy, difference": float(score_mean[masked] - score_mean["OTA"])})
mask_effect = pd.DataFrame(rows)
FACTS["mask_effect"] = mask_effect.to_dict("records")
pred_says = ["raise" if r > 1 else "lower" for r in mask_effect["predicted loss, ratio"]]
score_says = ["lower" if d < 0 else "raise" if d > 0 else "leave" for d in mask_effect["mean accuracy, difference"]]
display(Markdown(
    "The quadratic model predicts that the masks "
    + " and ".join(f"{w} the summed loss increase at {r['to'].split('(')[1].rstrip(')')} density "
                   f"(×{r['predicted loss, ratio']:.2f})" for w, r in zip(pred_says, rows))
    + "; the measured mean accuracy changes by "
    + " and ".join(f"{r['mean accuracy, difference']:+.3f}" for r in rows)
    + " (a positive change is better)."))
mask_effect.round(3)

# %% [markdown]
# ## Which of the paper's claims this zoo reproduces
#
# Claim (d), decided by the rule of `curvlens.findings` from this notebook's merges
# (OTA+FFG at density 0.3 against linear, TIES and DARE-TIES, both at density 0.5);
# notebook `05` decides it on a larger grid.

# %%
claim = cl.finding_merges(scores, capabilities,  # the scores above, with the base (the gain is measured from it)
                          {"ota_ffg": "OTA+FFG (0.3)", "linear": "linear", "ties": "TIES (0.5)",
                           "dare": "DARE-TIES (0.5)"})
FACTS["claims"] = {claim["claim"]: claim["verdict"]}
display(Markdown(f"**({claim['claim']}) {claim['statement']}: {claim['verdict']}.** {claim['evidence']}. "
                 f"(Rule: {claim['rule']}.)"))

# %% [markdown]
# ## What this shows

# %%
n_eval = table.groupby("capability")["n"].first().astype(float)
noise_mean = float(np.sqrt(np.sum(0.25 / n_eval)) / len(n_eval))   # SE of a mean accuracy at a = 0.5
tv = pairs_model["tv_cosine"]
sc = pairs_model["sign_conflict"]
wr = ratio["weighted_over_plain"]
FACTS["summary"] = {"tv_cosine_min": float(tv.min()), "tv_cosine_max": float(tv.max()),
                    "sign_conflict_min": float(sc.min()), "sign_conflict_max": float(sc.max()),
                    "weighted_over_plain_min": float(wr.min()), "weighted_over_plain_max": float(wr.max()),
                    "noise_mean": noise_mean,
                    "mask_changes": [r["mean accuracy, difference"] for r in FACTS["mask_effect"]]}
masks_beyond = [abs(d) > 2 * noise_mean for d in FACTS["summary"]["mask_changes"]]
tv_word = "nearly orthogonal" if max(abs(tv.min()), abs(tv.max())) < 0.1 else "aligned" if tv.min() > 0.1 else "mixed"
mask_reading = "beyond noise" if all(masks_beyond) else "within noise" if not any(masks_beyond) else "one beyond noise, one within"
FACTS["summary"].update(tv_word=tv_word, mask_reading=mask_reading)
display(Markdown(
    f"The experts' task vectors are {tv_word} "
    f"(cosine {tv.min():+.3f} to {tv.max():+.3f}) and conflict in sign on {sc.min():.0%} to {sc.max():.0%} of the "
    f"entries both edit, against 50% for independent signs; weighted by curvature the conflict is "
    f"{wr.min():.2f} to {wr.max():.2f} times the plain one, so the conflicts fall "
    + ("about as often on the entries the experts care about as elsewhere. " if wr.min() > 0.9 and wr.max() < 1.1
       else "more on the entries that matter. " if wr.min() >= 1.1 else "less on the entries that matter. " if wr.max() <= 0.9
       else "on important entries for some pairs and unimportant ones for others. ")
    + f"The predicted loss increase ranks the {pick['n']} merges against their measured mean accuracy at "
    f"ρ = {pick['rho']:+.2f} (p = {pick['p']:.2f}): "
    + ("usable to shortlist. " if pick["p"] < 0.05 and pick["rho"] > 0 else "not a substitute for evaluating them. ")
    + f"Adding FFG masks to OTA changes the mean accuracy by "
    + " and ".join(f"{d:+.3f}" for d in FACTS["summary"]["mask_changes"])
    + f" (density 0.3 and 0.1), against a noise scale of {2 * noise_mean:.3f} (twice the standard error of a mean "
    f"accuracy here): {mask_reading}"
    + f". Claim (d) on these merges reads *{FACTS['claims']['d']}*."))
