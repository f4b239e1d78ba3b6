# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Curvature overlap: do the experts see the same loss landscape?
#
# The paper observes that experts fine-tuned from one base converge to basins with
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
# curvature-weighted average (Fisher merging)
# $$\theta^\star_j = \sum_i w_{ij}\,\theta_{ij}, \qquad w_{ij} = \frac{F_{ij}}{\sum_k F_{kj}},$$
# and it equals the plain average $\bar\theta_j = \frac1N \sum_i \theta_{ij}$ exactly
# when the weights are uniform, $w_{ij} = 1/N$, i.e. when the experts' curvatures
# agree at that entry. The gap between the two merges is
# $\theta^\star_j - \bar\theta_j = \sum_i (w_{ij} - \tfrac1N)\,\theta_{ij}$: it grows with
# the *disagreement* of the curvatures. So the more the experts' curvature overlaps,
# the closer plain averaging comes to the curvature-optimal merge, *provided the
# levels agree too*: the weights depend on the ratios $F_{ij}/F_{kj}$, which
# scale-free overlap metrics ignore (notebook `06_teaching`, section 1, gives two
# experts a perfect Spearman and cosine overlap and a large gain all the same).
#
# Two caveats follow from the formula. Only the *relative* weights matter, so an
# expert whose moments are uniformly larger (a longer run, a larger learning rate)
# pulls the raw Fisher merge towards it everywhere, however well the patterns
# agree; OTA's `normalise: global` divides each expert's weights by their mean per
# tensor to remove that. And the weights are dominated by the largest entries, which
# `cosine` measures, while `spearman_log` counts every entry's rank equally.
#
# We check this on the zoo rather than assume it. Per tensor, we measure how far
# the curvature-weighted merge lands from the plain average, relative to how far
# the experts are from their average,
# $$d = \frac{\lVert \theta^{\star} - \bar\theta \rVert}
#            {\sqrt{\tfrac1N \sum_i \lVert \theta_i - \bar\theta \rVert^2}},$$
# for raw Fisher weights ($w \propto v$, method `fisher`) and for per-tensor
# normalized ones (method `ota` without a base, `power=1`, `normalise="global"`), and
# rank-correlate $d$ with the tensor's overlap (mean over expert pairs).

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
dist.round(3)

# %% [markdown]
# How different are the levels here? The mean of $v$ over the whole model, per
# expert (entries weighted equally):

# %%
mean_v = cl.moment_levels(experts, device="cpu").set_index("expert")["mean_v"].rename("mean v")
level_ratio = float(mean_v.max() / mean_v.min())
FACTS.update(mean_v={e: float(x) for e, x in mean_v.items()}, mean_v_max_over_min=level_ratio)
raw, nrm = (weighted[k].checkpoint for k in weighted)
moved = sum(float((raw[n].float() - plain.checkpoint[n].float()).pow(2).sum()) for n in raw.keys()) ** 0.5
between = sum(float((raw[n].float() - nrm[n].float()).pow(2).sum()) for n in raw.keys()) ** 0.5
FACTS["normalise_moves_merge_rel"] = between / moved
display(Markdown(
    f"The experts' mean $v$ differ by a factor {level_ratio:.1f} ({mean_v.idxmin()} lowest, {mean_v.idxmax()} "
    f"highest). OTA's default `normalise: none` compares these raw levels, so an expert with a larger $v$ "
    f"pulls every entry towards itself. Here, normalising per tensor moves the Fisher merge by "
    f"{between / moved:.1%} of the distance the raw curvature weights moved it away from the plain average."))
mean_v.to_frame().assign(**{"/ min": mean_v / mean_v.min()}).round(6)

# %%
def rank_corr(x, y):
    """Spearman rank correlation (Pearson correlation of the ranks)."""
    return x.rank().corr(y.rank())


corr = pd.DataFrame({label: [rank_corr(dist[label], dist[m]) for m in metrics]
                     for label in weighted}, index=metrics)
corr.index.name = "overlap metric"
corr.round(2)  # rank correlation of the gap d with the overlap, over tensors

# %%
label = "fisher (v / mean v per tensor)"
best = "spearman_log"  # the headline overlap metric (notebook 01; the pair grids above are chosen by it)
r = corr.loc[best, label]
ax = dist.plot.scatter(best, label, figsize=(5, 3.5))
ax.set_xlabel(f"{best} of v (mean over expert pairs)")
ax.set_ylabel("gap d to the plain average")
ax.set_title(f"per tensor, normalized Fisher weights: rank correlation {r:+.2f}", fontsize=10)
for role, x, y in zip(dist["role"], dist[best], dist[label]):
    ax.annotate(role, (x, y), fontsize=7)

# %%
# The verdict is read from Spearman, the headline metric, and says when the other
# metrics point elsewhere (picking the most negative of five correlations would
# find a link by selection alone).
verdicts = {}
for label in weighted:
    r = corr.loc["spearman_log", label]
    verdict = ("more overlap, smaller gap to plain averaging" if r < -0.3 else
               "more overlap, *larger* gap to plain averaging" if r > 0.3 else
               "no clear link between overlap and the gap on this zoo")
    others = {m: corr.loc[m, label] for m in metrics if m != "spearman_log"}
    disagree = [f"{m} {x:+.2f}" for m, x in others.items() if np.sign(x) != np.sign(r) and abs(x) > 0.3]
    verdicts[label] = {"spearman": float(r), "verdict": verdict, "disagree": disagree}
    print(f"{label}: rank correlation of the gap with Spearman overlap {r:+.2f} -> {verdict}"
          + (f"; other metrics point the other way: {', '.join(disagree)}" if disagree else ""))
FACTS["gap_vs_overlap"] = verdicts
print(f"model-level mean overlap over all pairs: Spearman {by_model['spearman_log'].mean():.3f}, "
      f"cosine {by_model['cosine'].mean():.3f}")

# %% [markdown]
# How to read this: where the experts' curvature agrees (in the sense that matters,
# the normalized weights), linear merging already is close to the curvature-optimal
# merge, so methods that reweight by curvature can only change the merge where the
# curvature disagrees. Where the overlap is partial, as measured above, curvature
# weights (Fisher, OTA) move the merge, and FFG masks (notebook `03_ffg_masks`)
# decide which expert owns each entry. Whether that pays off in scores is measured
# in `04_interference` and `05_merging`.

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
    f"the gap to plain averaging: Spearman rank correlation {link['spearman']:+.2f}, i.e. {link['verdict']}; and the "
    f"experts' levels of $v$ differ by a factor {level_ratio:.1f}, which no overlap metric sees."))
