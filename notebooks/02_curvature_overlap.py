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
# # Curvature overlap: do the experts see the same loss landscape?
#
# The paper (Mahdavinia et al. 2025, arXiv:2509.11167; all references in
# `docs/references.md`, terms in `docs/glossary.md`) observes that experts
# fine-tuned from one base converge to basins with
# strikingly similar curvature, and argues that this is why plain linear merging
# works as well as it does. This notebook reproduces that analysis on the demo zoo:
# it compares the experts' Adam second moments $v_i$ (a diagonal curvature / Fisher
# proxy) tensor by tensor, pools the comparison by layer and role, draws the
# expert-pair matrices, the paper's side-by-side grids of pooled $\log_{10} v$ and the
# $\log_{10} v$ histograms, and then checks, on the same zoo, how much the overlap
# actually makes curvature-weighted averaging and plain averaging agree.

# %% tags=["parameters"]
QUICK = True      # the quick zoo; False: the default zoo
DEVICE = "auto"   # "auto": CUDA when present, else CPU

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import Markdown, display

import curvlens as cl

FACTS = {}  # the computed facts the text relies on (read back by the tests)

zoo = cl.zoo.build("quick" if QUICK else "default")
experts = zoo.experts()
experts

# %% [markdown]
# ## The overlap metrics
#
# For one tensor and a pair of experts $a, b$ with second moments $v_a, v_b$ (vectors
# over the tensor's entries), `curvature_overlap` reports
#
# | column | definition | reads as |
# |---|---|---|
# | `cosine` | $\dfrac{\langle v_a, v_b\rangle}{\lVert v_a\rVert\,\lVert v_b\rVert}$ | agreement of the large entries (dominated by the few biggest) |
# | `pearson_log` | $\mathrm{corr}(\log_{10} v_a, \log_{10} v_b)$ | agreement over all orders of magnitude |
# | `spearman_log` | rank correlation of $v_a$ and $v_b$ | do both runs *order* the entries alike? (scale-free) |
# | `jaccard_top1`, `jaccard_top10` | $\lvert T_a \cap T_b\rvert / \lvert T_a \cup T_b\rvert$, $T$ = top 1% / 10% entries | do both runs find the same sharpest directions? |
#
# Two unrelated random patterns give correlations near 0 and a top-$q$ Jaccard near
# $q / (2 - q)$ (0.005 for the top 1%, 0.053 for the top 10%); identical ones give 1.

# %%
overlap = cl.curvature_overlap(experts, device=DEVICE)
overlap.head()

# %% [markdown]
# ## Model level, by role and by layer
#
# `aggregate` pools the per-tensor rows with size (numel) weights: by `()` for one
# number per pair, by `("role",)` or `("layer",)` for where the agreement sits.

# %%
by_model = cl.aggregate(overlap, by=())
by_model.round(3)

# %%
metrics = ["cosine", "pearson_log", "spearman_log", "jaccard_top1", "jaccard_top10"]
by_role = cl.aggregate(overlap, by=("role",))
by_role.groupby("role", sort=False)[metrics].mean().round(3)  # mean over pairs

# %%
by_layer = cl.aggregate(overlap, by=("layer",))
by_layer.groupby("layer", sort=False, dropna=False)[metrics].mean().round(3)

# %% [markdown]
# A random-pattern baseline for the Jaccard columns makes "high" precise: the
# top-$q$ sets of two independent random orderings have expected Jaccard
# $q/(2-q)$. The ratio below says how many times more the experts' sharpest entries
# coincide than chance.

# %%
chance = {"jaccard_top1": 0.01 / (2 - 0.01), "jaccard_top10": 0.1 / (2 - 0.1)}
lift = by_model[["expert_a", "expert_b"]].copy()
for col, c in chance.items():
    lift[f"{col} / chance"] = by_model[col] / c
lift.round(1)

# %% [markdown]
# ## Where the overlap is, by layer × role
#
# One panel per pair: rows are layers (embeddings, final norm and LM head in the
# `non-layer` row), columns are roles.

# %%
pairs = overlap.assign(pair=overlap["expert_a"] + " × " + overlap["expert_b"])
fig = cl.views.layer_role_heatmaps(pairs, "spearman_log", by="pair", vmin=-1, vmax=1,
                            title="Spearman correlation of v, per expert pair")

# %% [markdown]
# The absolute scale of the curvature also has a layer × role structure, shared by
# the experts: the median $\log_{10} v$ per tensor (`curvature_stats`).

# %%
stats = cl.curvature_stats(experts, device=DEVICE)
fig = cl.views.layer_role_heatmaps(stats, "median_log10", title="median log10 v per tensor")

# %% [markdown]
# ## Pair matrices
#
# Each metric as an expert × expert matrix, pooled over the whole model. Colour
# limits are the metric's natural range (−1..1 or 0..1), so small differences are
# not blown up.

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
for ax, m in zip(axes, ["spearman_log", "pearson_log", "jaccard_top10"]):
    cl.views.pair_matrix_heatmap(overlap, m, ax=ax)

# %% [markdown]
# The same for one role only (filters are keyword arguments), e.g. the attention
# query projections, which the paper singles out:

# %%
cl.views.pair_matrix(overlap, "spearman_log", role="q", diagonal=1.0).round(3)

# %% [markdown]
# ## The paper's pair grid: pooled $\log_{10} v$ side by side
#
# A moment matrix is block-averaged in $\log_{10}$ (`pooled_moments`) so that even a
# 128k × 4096 embedding becomes a drawable map. We show the most and the least
# similar pair of experts (by model-level Spearman), for the first and last layer
# and the four attention roles, each matrix pooled into at most 16 × 16 blocks. With `masks_density`, blocks where the expert's FFG
# mask keeps at least half of the entries are outlined.

# %%
ranked = by_model.sort_values("spearman_log", ascending=False)
most = tuple(ranked.iloc[0][["expert_a", "expert_b"]])
least = tuple(ranked.iloc[-1][["expert_a", "expert_b"]])
print("most similar pair:", most, f"rho = {ranked.iloc[0]['spearman_log']:.3f}")
print("least similar pair:", least, f"rho = {ranked.iloc[-1]['spearman_log']:.3f}")

desc = experts.describe()
last = int(desc["layer"].dropna().max())
grid_layers = sorted({0, last})
grid_roles = ["q", "k", "v", "o"]
grid_names = desc[desc["layer"].isin(grid_layers) & desc["role"].isin(grid_roles + ["gate", "up", "down"])]["name"]
pooled = cl.pooled_moments(experts, list(grid_names), max_blocks=16, masks_density=0.3, device=DEVICE)
pooled.head()

# %%
fig = cl.views.pair_grid(pooled, most, layers=grid_layers, roles=grid_roles,
                  title=f"log10 v, most similar pair: {most[0]} vs {most[1]}")

# %%
fig = cl.views.pair_grid(pooled, least, layers=grid_layers, roles=grid_roles,
                  title=f"log10 v, least similar pair: {least[0]} vs {least[1]}")

# %% [markdown]
# The MLP roles, interactively (hover for block, value and mask fraction):

# %%
cl.views.pair_grid_plotly(pooled, most, layers=grid_layers, roles=["gate", "up", "down"])

# %% [markdown]
# ## Distributions of $\log_{10} v$
#
# Histograms accumulated tensor by tensor (`log10_histogram`), one panel per role,
# one line per expert. Overlapping lines mean the experts' curvature has the same
# spread in each role, even where the entry-by-entry agreement is partial.

# %%
hist = cl.log10_histogram(experts, bins=np.linspace(-22, -2, 81), device=DEVICE)
fig = cl.views.log10_histogram_grid(hist, by="role")

# %% [markdown]
# ## Explore
#
# Pick a pair, a metric, a layer and a role; the heatmap, the pair matrix and the
# moment maps follow.

# %%
cl.views.curvature_explorer(overlap, pooled)

# %% [markdown]
# ## What the overlap means for linear merging
#
# Take each expert's loss near its optimum as a diagonal quadratic,
# $L_i(\theta) \approx L_i(\theta_i) + \tfrac12 \sum_j F_{ij} (\theta_j - \theta_{ij})^2$,
# with $F_i \approx v_i$. The merge that minimizes $\sum_i L_i$ is the
# curvature-weighted average (Fisher merging; Matena & Raffel 2022, arXiv:2111.09832)
# $$\theta^\star_j = \sum_i w_{ij}\,\theta_{ij}, \qquad w_{ij} = \frac{F_{ij}}{\sum_k F_{kj}},$$
# and it equals the plain average $\bar\theta_j = \frac1N \sum_i \theta_{ij}$ exactly
# when the weights are uniform, $w_{ij} = 1/N$. The gap between the two merges is
# $\theta^\star_j - \bar\theta_j = \sum_i (w_{ij} - \tfrac1N)\,\theta_{ij}$: it is set by how
# far the weights are from $1/N$, i.e. by the *ratios* $F_{ij}/F_{kj}$ entry by entry.
# Plain averaging is therefore close to the curvature-optimal merge where the
# experts' curvatures agree *in ratio*, which is not what every overlap metric
# measures:
#
# * `spearman_log` compares the *orders* of the entries, whatever the ratios: two
#   experts with the same order and a factor 10 between them have Spearman 1 and
#   weights 10/11 and 1/11 everywhere (notebook `06_teaching`, section 1, gives two
#   experts a perfect Spearman and cosine overlap and a large gain all the same);
# * `cosine` is dominated by the largest entries of $v$, which also dominate the
#   weights where they differ;
# * no scale-free metric sees a difference of *level*: an expert whose moments are
#   uniformly larger (a longer run, a larger learning rate) pulls the raw Fisher
#   merge towards it everywhere, however well the patterns agree. OTA's
#   `normalise: global` divides each expert's weights by their mean per tensor to
#   remove that.
#
# So the formula predicts that the gap shrinks as the *weights* agree, and ties it
# to an overlap metric only as far as that metric follows the weights. We measure
# it on the zoo. Per tensor, how far the curvature-weighted merge lands from the
# plain average, relative to how far the experts are from their average,
# $$d = \frac{\lVert \theta^{\star} - \bar\theta \rVert}
#            {\sqrt{\tfrac1N \sum_i \lVert \theta_i - \bar\theta \rVert^2}},$$
# for raw Fisher weights ($w \propto v$, method `fisher`) and for per-tensor
# normalized ones (method `ota` without a base, `power=1`, `normalise="global"`), and
# the rank correlation of $d$ with the tensor's overlap (mean over expert pairs).

# %%
no_base = cl.Experts(None, experts.experts)  # base-free: plain averages of the theta_i
plain = cl.merge(no_base, "linear", device=DEVICE)
weighted = {
    "fisher (raw v)": cl.merge(no_base, "fisher", device=DEVICE),
    "fisher (v / mean v per tensor)": cl.merge(no_base, "ota", power=1.0, normalise="global",
                                                     epsilon=0.0, device=DEVICE),
}
rows = []
for g in experts.iter_tensors(experts.tensor_names(floating_only=True), device="cpu",
                              moments=False, base=False, desc="distance"):
    avg = plain.checkpoint[g.name].float()
    spread = torch.stack([(x - avg).pow(2).sum() for x in g.experts]).mean().sqrt()
    row = {"name": g.name, "layer": g.layer, "role": g.role, "numel": avg.numel()}
    for label, res in weighted.items():
        row[label] = float((res.checkpoint[g.name].float() - avg).norm() / spread)
    rows.append(row)
dist = pd.DataFrame(rows)
dist["layer"] = dist["layer"].astype("Int64")
per_tensor = overlap.groupby("name", sort=False)[metrics].mean()
dist = dist.join(per_tensor, on="name")
cl.views.significant(dist)

# %% [markdown]
# How different are the levels here? The mean of $v$ over the whole model, per
# expert (entries weighted equally):

# %%
mean_v = cl.moment_levels(experts, device="cpu").set_index("expert")["mean_v"].rename("mean v")
level_ratio = float(mean_v.max() / mean_v.min())
FACTS.update(mean_v={e: float(x) for e, x in mean_v.items()}, mean_v_max_over_min=level_ratio,
             mean_v_argmin=mean_v.idxmin(), mean_v_argmax=mean_v.idxmax())
raw, nrm = (weighted[k].checkpoint for k in weighted)
moved = sum(float((raw[n].float() - plain.checkpoint[n].float()).pow(2).sum()) for n in raw.keys()) ** 0.5
between = sum(float((raw[n].float() - nrm[n].float()).pow(2).sum()) for n in raw.keys()) ** 0.5
FACTS["normalise_moves_merge_rel"] = between / moved
FACTS.update(normalise_moved=between, raw_moved=moved)
display(Markdown(
    f"The experts' mean $v$ differ by a factor {level_ratio:.2f} ({mean_v.idxmin()} lowest, {mean_v.idxmax()} "
    f"highest). OTA's default `normalise: none` compares these raw levels, so an expert with a larger $v$ "
    f"pulls every entry towards itself. Here, normalising per tensor moves the Fisher merge by "
    f"{between / moved:.1%} of the distance the raw curvature weights moved it away from the plain average."))
cl.views.significant(mean_v.to_frame().assign(**{"/ min": mean_v / mean_v.min()}))

# %% [markdown]
# **Is there a link, and is it more than chance?** Over the few dozen tensors of a
# small model a rank correlation can be large by chance, so each one comes with a
# permutation p-value and a 95% bootstrap interval over the tensors
# (`cl.spearman_test`). With five overlap metrics tried, a link counts only if it
# survives the Bonferroni correction (p × 5 < 0.05): picking the strongest of five
# correlations would find a link by selection alone.

# %%
tests = {label: {m: cl.spearman_test(dist[label], dist[m], seed=0) for m in metrics} for label in weighted}
n_tensors = len(dist)
centred = np.arange(n_tensors) - (n_tensors - 1) / 2   # ranks of one side; the null shuffles the other
null = np.random.default_rng(0).permuted(np.tile(centred, (20000, 1)), axis=1)
null_rho = null @ centred / (centred @ centred)
min_rho = float(np.quantile(np.abs(null_rho), 0.95))   # the smallest |rho| with p < 0.05 over this many tensors
table_rows = []
for label, per_metric in tests.items():
    for m, t in per_metric.items():
        table_rows.append({"weights": label, "overlap metric": m, "rho": t["rho"], "p": t["p"],
                           "p x 5": min(1.0, 5 * t["p"]), "95% CI low": t["low"], "95% CI high": t["high"]})
corr = pd.DataFrame(table_rows)
FACTS["overlap_gap_tests"] = {label: {m: {"rho": t["rho"], "p": t["p"], "low": t["low"], "high": t["high"]}
                                      for m, t in per_metric.items()} for label, per_metric in tests.items()}
FACTS.update(n_tensors=n_tensors, min_significant_rho=min_rho)
print(f"over {n_tensors} tensors, |rho| >= {min_rho:.2f} is needed for p < 0.05")
cl.views.significant(corr, 2)

# %%
label = "fisher (v / mean v per tensor)"
best = "spearman_log"  # the headline overlap metric (notebook 01; the pair grids above are chosen by it)
t = tests[label][best]
ax = dist.plot.scatter(best, label, figsize=(5, 3.5))
ax.set_xlabel(f"{best} of v (mean over expert pairs)")
ax.set_ylabel("gap d to the plain average")
ax.set_title(f"per tensor, normalized Fisher weights: ρ = {t['rho']:+.2f} (p = {t['p']:.2f})", fontsize=10)
for role, x, y in zip(dist["role"], dist[best], dist[label]):
    ax.annotate(role, (x, y), fontsize=7)

# %%
# The verdict is read from Spearman, the headline metric, and needs p < 0.05; the
# other metrics are reported when they survive the Bonferroni correction.
verdicts = {}
for label in weighted:
    t = tests[label]["spearman_log"]
    sig = t["p"] < 0.05
    verdict = ("more overlap, smaller gap to plain averaging" if sig and t["rho"] < 0 else
               "more overlap, *larger* gap to plain averaging" if sig and t["rho"] > 0 else
               "no significant link between rank overlap and the gap on this zoo")
    others = [f"{m} {x['rho']:+.2f} (p × 5 = {min(1.0, 5 * x['p']):.2g})" for m, x in tests[label].items()
              if m != "spearman_log" and 5 * x["p"] < 0.05]
    verdicts[label] = {"spearman": t["rho"], "p": t["p"], "low": t["low"], "high": t["high"], "verdict": verdict,
                       "significant_others": [m for m, x in tests[label].items()
                                              if m != "spearman_log" and 5 * x["p"] < 0.05]}
    print(f"{label}: Spearman overlap vs gap rho = {t['rho']:+.2f}, p = {t['p']:.3f}, 95% CI "
          f"[{t['low']:+.2f}, {t['high']:+.2f}] -> {verdict}"
          + (f"; significant after correction: {', '.join(others)}" if others else ""))
FACTS["gap_vs_overlap"] = verdicts
print(f"model-level mean overlap over all pairs: Spearman {by_model['spearman_log'].mean():.3f}, "
      f"cosine {by_model['cosine'].mean():.3f}")

# %%
# What the test says about the formula, computed from the tests above.
v_n = verdicts["fisher (v / mean v per tensor)"]
v_r = verdicts["fisher (raw v)"]
sig_n = {m: tests["fisher (v / mean v per tensor)"][m] for m in v_n["significant_others"]}
parts = [f"With the normalised weights, rank overlap and the gap: ρ = {v_n['spearman']:+.2f} (p = {v_n['p']:.2f}, "
         f"95% CI [{v_n['low']:+.2f}, {v_n['high']:+.2f}]); with the raw weights ρ = {v_r['spearman']:+.2f} "
         f"(p = {v_r['p']:.2f}). Over {n_tensors} tensors only |ρ| ≥ {min_rho:.2f} reaches p < 0.05, so "
         + ("neither is a link the data can tell from chance. "
            if v_n["p"] >= 0.05 and v_r["p"] >= 0.05 else "the significant one above is a link, the other is not. ")]
neg = [m for m, x in sig_n.items() if x["rho"] < 0]
if "cosine" in neg:
    parts.append(f"The metric that does track the gap is the one that follows the weights: cosine "
                 f"(ρ = {sig_n['cosine']['rho']:+.2f}, p × 5 = {min(1.0, 5 * sig_n['cosine']['p']):.2g}), dominated by "
                 "the largest entries of $v$, which dominate the weights $w_{ij}$. That is what the formula predicts: "
                 "the gap follows the agreement of the weights, not of the ranks, so a rank overlap that does not "
                 "predict the gap is no contradiction of it.")
elif neg:
    parts.append("Among the other metrics " + ", ".join(f"{m} (ρ = {sig_n[m]['rho']:+.2f})" for m in neg)
                 + " track the gap significantly; cosine, the one closest to the weights, does not, so the formula's "
                 "link through the weights is only partly visible in overlap metrics here.")
else:
    parts.append("No overlap metric tracks the gap significantly after the correction: on this zoo the distance "
                 "between Fisher merging and plain averaging is not predicted by any overlap metric, which the "
                 "formula allows (the gap depends on ratios and levels, which scale-free metrics do not see).")
FACTS["formula_reading"] = {"cosine_tracks_gap": "cosine" in neg, "significant_negative": neg}
display(Markdown(" ".join(parts)))

# %% [markdown]
# How to read this: linear merging is already close to the curvature-optimal
# merge wherever the experts' curvature weights agree, so methods that reweight by
# curvature can only change the merge where the weights disagree. Whether that pays
# off in scores is measured in `04_interference` and `05_merging`; FFG masks
# (notebook `03_ffg_masks`) decide which expert owns each entry.

# %% [markdown]
# ## Which of the paper's claims this zoo reproduces
#
# This notebook checks claim (c), decided by the rule of `curvlens.findings` from the
# overlap table above:

# %%
claim = cl.finding_overlap(overlap)
FACTS["claims"] = {claim["claim"]: claim["verdict"]}
link = verdicts["fisher (v / mean v per tensor)"]
display(Markdown(
    f"**({claim['claim']}) {claim['statement']}: {claim['verdict']}.** {claim['evidence']}. (Rule: {claim['rule']}.) "
    f"The paper's reading, that overlap is why linear merging works, is tested above as a link between overlap and "
    f"the gap to plain averaging: Spearman rank correlation {link['spearman']:+.2f} (p = {link['p']:.2f}), i.e. "
    f"{link['verdict']}; and the experts' levels of $v$ differ by a factor {level_ratio:.2f}, which no overlap "
    "metric sees."))

# %% [markdown]
# ## What this shows

# %%
pairs_rho = by_model.set_index(by_model["expert_a"] + "/" + by_model["expert_b"])["spearman_log"]
j10 = float(by_model["jaccard_top10"].mean() / chance["jaccard_top10"])
agree_word = "well" if pairs_rho.min() >= 0.7 else "partly" if pairs_rho.min() >= 0.4 else "weakly"
FACTS.update(pair_spearman_min=float(pairs_rho.min()), pair_spearman_max=float(pairs_rho.max()),
             jaccard_top10_lift=j10, agree_word=agree_word)
display(Markdown(
    f"On this zoo the experts' second moments agree {agree_word}: "
    f"model-level Spearman {pairs_rho.min():.2f} ({pairs_rho.idxmin()}) to {pairs_rho.max():.2f} "
    f"({pairs_rho.idxmax()}) against 0 for unrelated patterns, and their top-10% entries coincide "
    f"{j10:.1f}× as often as chance, so claim (c) reads *{FACTS['claims']['c']}*. "
    f"Whether overlap explains how close plain averaging comes to Fisher merging: "
    + ("rank overlap does not predict the gap (p = " if link["p"] >= 0.05 else "rank overlap predicts the gap (p = ")
    + f"{link['p']:.2f} over {n_tensors} tensors)"
    + ("; the largest entries' agreement (cosine) does, as the formula says it should. " if FACTS["formula_reading"]["cosine_tracks_gap"]
       else ". ")
    + f"The levels of $v$ differ by a factor {level_ratio:.2f} between experts, and normalising them away moves "
    f"the Fisher merge by {FACTS['normalise_moves_merge_rel']:.0%} of its distance from plain averaging: a "
    "curvature-weighted merge depends on the level as well as the pattern."))
