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
# # Fast Fisher Grafting: which entries of an expert's edit matter?
#
# An expert's task vector $\tau = \theta - \theta_0$ changes every parameter, but most of
# those changes can be reset to the base without hurting the expert. Fast Fisher
# Grafting (FFG; Mahdavinia et al. 2025, arXiv:2509.11167) decides which ones to keep
# with the diagonal-Fisher saliency $v\,\tau^2$ built from Adam's second moment $v$,
# the second-order saliency of Optimal Brain Damage (LeCun et al., NIPS 1989) applied
# to an edit. This notebook asks, on the demo zoo:
# does FFG keep the experts' scores at lower density than magnitude pruning
# ($|\tau|$)? Where in the network do the kept entries sit (layer × role)? How
# structured are the masks (rank, all-on / all-off rows and columns)? And do different
# experts keep the same entries?

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
capabilities = dict(zoo.capabilities)
experts

# %% [markdown]
# ## Saliency, masks and the grafted expert
#
# For expert $i$ with task vector $\tau_i$ and second moment $v_i$, reverting entry $j$
# to the base raises the expert's loss by about
# $$\Delta L_{ij} \approx \tfrac12\, F_{ij}\, \tau_{ij}^2 \approx \tfrac12\, v_{ij}\, \tau_{ij}^2,$$
# the second-order term of a Taylor expansion around the expert's optimum, with the
# diagonal Fisher $F$ estimated by $v$. FFG keeps the entries with the largest
# saliency $s_{ij} = v_{ij}\tau_{ij}^2$:
# $$m_{ij} = [\, s_{ij} \ge t_i \,], \qquad \theta^{\text{graft}}_i = \theta_0 + m_i \odot \tau_i,$$
# with **one** threshold $t_i$ per expert for the whole model, chosen so that a given
# fraction (the *density*) of the expert's entries is kept. The density of each layer
# and role is therefore not imposed; it emerges. The magnitude baseline uses
# $|\tau_{ij}|$ instead of $s_{ij}$, with the same model-wide threshold rule.
#
# `graft_sweep` builds $\theta^{\text{graft}}_i$ for each expert, criterion and
# density, streaming, and scores it on every capability; density 1.0 is the expert
# itself.

# %%
densities = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 1.0) if QUICK else (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)
sweep = cl.graft_sweep(experts, densities,
                      evaluate=lambda sd: cl.zoo.evaluate(sd, zoo=zoo, device=DEVICE),
                      device=DEVICE)
sweep.head()

# %% [markdown]
# Each expert's score on its own capability against density: FFG solid, magnitude
# dashed.

# %%
ax = cl.views.density_curves(sweep, capabilities, title="Grafted expert, score on its own capability")

# %%
cl.views.density_curves_plotly(sweep, capabilities)

# %% [markdown]
# ## Does FFG beat magnitude pruning here?
#
# `ffg_vs_magnitude_summary` lines up both criteria at each density, on each
# expert's own capability. The verdict below is computed from that table, so it
# stays true when the zoo changes.

# %%
summary = cl.ffg_vs_magnitude_summary(sweep, capabilities)
summary.round(3)

# %%
partial = summary[summary["density"] < 1.0].copy()
partial["diff"] = partial["fisher"] - partial["magnitude"]
wins = int((partial["diff"] > 0).sum())
ties = int((partial["diff"] == 0).sum())
losses = int((partial["diff"] < 0).sum())
by_density = partial.groupby("density")[["fisher", "magnitude", "diff"]].mean()
print(f"over {len(partial)} (expert, density < 1) cases: FFG higher in {wins}, equal in {ties}, "
      f"magnitude higher in {losses}; mean score difference {partial['diff'].mean():+.3f}")


def lowest_density_keeping(crit, frac=0.9):
    """Per expert: the lowest density whose own-capability score is >= frac x the expert's."""
    out = {}
    for e, g in summary.groupby("expert", sort=False):
        full = float(g.loc[g["density"] == 1.0, crit].iloc[0])
        ok = g[g[crit] >= frac * full]
        out[e] = float(ok["density"].min())
    return out


keep = pd.DataFrame({"fisher": lowest_density_keeping("fisher"),
                     "magnitude": lowest_density_keeping("magnitude")})
keep.index.name = "expert"
print("\nlowest density keeping >= 90% of the expert's own score:")
print(keep.to_string())
if wins > losses:
    verdict = "FFG beats magnitude pruning on this zoo"
elif wins < losses:
    verdict = "magnitude pruning beats FFG on this zoo"
else:
    verdict = "FFG and magnitude pruning are tied on this zoo"
print(f"\nverdict: {verdict}.")
FACTS.update(ffg_wins=wins, ffg_ties=ties, ffg_losses=losses, verdict=verdict)
by_density.round(3)

# %% [markdown]
# These scores come from small evaluation sets; a difference between two grafts is
# only worth reading if it is larger than the sampling error of an accuracy,
# $\sqrt{a(1-a)/n}$ (notebook `06`, section 5):

# %%
n_eval = zoo.reference_scores(device=DEVICE).groupby("capability")["n"].first()  # stored, not re-scored
se_eval = np.sqrt(0.25 / n_eval.astype(float))
FACTS["eval_n_min"] = int(n_eval.min())
display(Markdown(f"Evaluation set sizes: {', '.join(f'{c} n = {n}' for c, n in n_eval.items())}; at accuracy 0.5 "
                 f"the standard error is {se_eval.min():.3f} to {se_eval.max():.3f}, so differences below about "
                 f"{2 * se_eval.max():.2f} between two grafts are within noise."))

# %% [markdown]
# ## Why the two criteria differ here
#
# Notebook `06` (section 3) shows that magnitude pruning prefers the wrong entries
# only when $|\tau|$ and the curvature are anti-correlated, and that with no
# correlation FFG's advantage grows with how widely the curvature is spread. Both
# are measurable on the zoo: per expert, the rank correlation of $|\tau|$ with $v$
# and the spread of $\log_{10} v$ (on a fixed random sample of up to 4,096 entries per
# tensor, the same entries for every expert).

# %%
gen = torch.Generator().manual_seed(0)
samples = {e: {"tau": [], "v": []} for e in experts.names}
for g in experts.iter_tensors(experts.tensor_names(floating_only=True), device="cpu", desc="sample"):
    n = g.base.numel()
    idx = torch.randperm(n, generator=gen)[:4096]
    for e, tau, v in zip(g.expert_names, g.task_vectors, g.moments):
        samples[e]["tau"].append(tau.reshape(-1)[idx].abs().double())
        samples[e]["v"].append(v.reshape(-1)[idx].double())
rows = []
for e, d in samples.items():
    tau, v = torch.cat(d["tau"]).numpy(), torch.cat(d["v"]).numpy()
    pos = v[v > 0]
    rows.append({"expert": e, "Spearman(|τ|, v)": pd.Series(tau).rank().corr(pd.Series(v).rank()),
                 "decades of v (5-95%)": float(np.log10(np.quantile(pos, 0.95) / np.quantile(pos, 0.05)))})
tau_v = pd.DataFrame(rows).set_index("expert")
rho_lo, rho_hi = tau_v["Spearman(|τ|, v)"].min(), tau_v["Spearman(|τ|, v)"].max()
FACTS.update(spearman_tau_v={e: float(r) for e, r in tau_v["Spearman(|τ|, v)"].items()},
             v_decades={e: float(r) for e, r in tau_v["decades of v (5-95%)"].items()})
strength = "weak" if max(abs(rho_lo), abs(rho_hi)) < 0.3 else "moderate" if max(abs(rho_lo), abs(rho_hi)) < 0.6 else "strong"
sign = "negative" if rho_hi < 0 else "positive" if rho_lo > 0 else "mixed-sign"
FACTS.update(tau_v_strength=strength, tau_v_sign=sign)
display(Markdown(
    f"Spearman$(|\\tau|, v)$ per expert ranges from {rho_lo:+.2f} to {rho_hi:+.2f}: a {strength}, {sign} "
    f"correlation" + (" (in the toy of `06`, $\\alpha$ near 0), so magnitude pruning here is mostly *blind* to the "
                      "curvature rather than anti-aligned with it; " if strength == "weak" else "; ")
    + f"$v$ spans {tau_v['decades of v (5-95%)'].min():.1f} to {tau_v['decades of v (5-95%)'].max():.1f} decades "
    "(5th to 95th percentile), which is where FFG's advantage, if any, comes from."))
tau_v.round(3)

# %% [markdown]
# ## Where the masks keep entries: layer × role
#
# `mask_stats` describes every mask tensor by tensor: the kept fraction, the fraction
# of all-zero rows and columns, the mask's rank and effective rank, and the share of
# the expert's total saliency the mask keeps. Thresholds are model-wide, the same
# ones the merge engine uses.

# %%
mask_densities = (0.1, 0.3)
ms = cl.mask_stats(experts, densities=mask_densities, device=DEVICE)
ms.head()

# %%
fig = cl.views.layer_role_heatmaps(ms, "kept_frac", criterion="fisher", density=0.1, vmin=0, vmax=1, log=False,
                            title="FFG kept fraction by layer × role (model-wide density 0.1)")

# %%
fig = cl.views.layer_role_heatmaps(ms, "kept_frac", criterion="magnitude", density=0.1, vmin=0, vmax=1, log=False,
                            title="magnitude kept fraction by layer × role (model-wide density 0.1)")

# %% [markdown]
# The same numbers by role, with the spread across roles as a single number: a
# uniform mask would keep the model-wide density everywhere, so the standard
# deviation of the per-role kept fraction says how *localized* each criterion is.

# %%
role_kept = (cl.aggregate(ms, by=("role",))
             .pivot_table(index=["criterion", "density", "expert"], columns="role", values="kept_frac",
                          sort=False))
role_kept.round(2)

# %%
spread = role_kept.std(axis=1).groupby(level=["criterion", "density"]).mean().unstack("criterion")
print("mean over experts of the std of the per-role kept fraction (higher = more localized):")
spread.round(3)

# %% [markdown]
# ## Structure: rank and all-on / all-off rows and columns
#
# For a 2-D mask $M \in \{0, 1\}^{m \times n}$: `row_sparsity` and `col_sparsity` are
# the fractions of rows / columns that are entirely zero, `mask_rank` is the rank of
# $M$ (a mask made of whole rows and columns has rank 1 or 2, however large), and
# `mask_effective_rank` is $\exp$ of the entropy of its normalized singular values.
# The tables pool the matrices by role, weighted by size; `full rank` is the mean
# $\min(m, n)$ for reference. How many empty rows and columns a *random* mask of the
# same density would have is not "almost none" in general: at low density a short
# row is empty by chance quite often. The reference is computed further below.

# %%
mats = ms[ms["rank_method"] != "none"].copy()
desc = experts.describe().set_index("name")
mats["full_rank"] = [min(desc.loc[n, "shape"]) for n in mats["name"]]
structure = (mats.groupby(["criterion", "density", "role"], sort=False)
             [["kept_frac", "row_sparsity", "col_sparsity", "mask_rank", "mask_effective_rank", "full_rank"]]
             .mean())
structure.loc[("fisher", 0.1)].round(2)

# %%
structure.loc[("magnitude", 0.1)].round(2)

# %% [markdown]
# The reference a random mask gives: with each entry of an $m \times n$ matrix kept
# independently with probability $p$ (its kept fraction), a row is all-zero with
# probability $(1-p)^n$ and a column with probability $(1-p)^m$. Below, the observed
# fractions of empty rows and columns over all matrices (size-weighted) next to
# that expectation, per criterion and density.

# %%
mats["rows"] = [desc.loc[n, "shape"][0] for n in mats["name"]]
mats["cols"] = [desc.loc[n, "shape"][1] for n in mats["name"]]
mats["random_row_sparsity"] = (1 - mats["kept_frac"]) ** mats["cols"]
mats["random_col_sparsity"] = (1 - mats["kept_frac"]) ** mats["rows"]
cols = ["row_sparsity", "random_row_sparsity", "col_sparsity", "random_col_sparsity"]
empty = (cl.aggregate(mats[["expert", "criterion", "density", "name", "layer", "role", "numel", *cols]], by=())
         .groupby(["criterion", "density"])[cols].mean())
lines = []
for (crit, dn), r in empty.iterrows():
    FACTS[f"empty_rows_{crit}_{dn:g}"] = float(r["row_sparsity"])
    FACTS[f"random_empty_rows_{crit}_{dn:g}"] = float(r["random_row_sparsity"])
    lines.append(f"{crit} at density {dn:g}: empty rows {r['row_sparsity']:.3f} (random mask of the same per-tensor "
                 f"density: {r['random_row_sparsity']:.3f}), empty columns {r['col_sparsity']:.3f} "
                 f"(random: {r['random_col_sparsity']:.3f})")
display(Markdown("Observed against a random mask's expectation:\n\n" + "\n".join(f"- {x}" for x in lines)))
empty.round(3)

# %%
model_level = cl.aggregate(ms, by=())
model_level.groupby(["criterion", "density"])[
    ["kept_frac", "row_sparsity", "col_sparsity", "mask_effective_rank", "saliency_kept"]].mean().round(3)

# %% [markdown]
# `saliency_kept` is the share of the expert's total Fisher saliency that the mask
# keeps, i.e. the fraction of the predicted loss increase of reverting everything
# that the mask avoids. By construction FFG maximizes it for a given number of
# entries.
#
# To see the structure directly, here is one attention matrix's mask for every
# expert (white = kept), FFG against magnitude at the same density:

# %%
name = ms.loc[(ms["role"] == "q") & (ms["layer"] == 0), "name"].iloc[0]
fig, axes = plt.subplots(2, len(experts), figsize=(2.4 * len(experts), 5), squeeze=False,
                         constrained_layout=True)
for r, crit in enumerate(["fisher", "magnitude"]):
    masks = cl.ffg_masks(experts, density=0.1, criterion=crit, names=[name], device=DEVICE, progress=False)
    for c, (e, m) in enumerate(masks[name].items()):
        ax = axes[r, c]
        ax.imshow(m.cpu().numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{e} · {crit}\nkept {m.float().mean():.2f}", fontsize=9)
_ = fig.suptitle(f"{name}: masks at model-wide density 0.1")

# %% [markdown]
# ## Do different experts keep the same entries?
#
# `mask_overlap` gives the Jaccard index $|M_a \cap M_b| / |M_a \cup M_b|$ of two
# experts' masks per tensor. For two independent random masks of density $d$ the
# expected Jaccard is $d^2 / (2d - d^2) = d / (2 - d)$, the reference line below.

# %%
overlap_density = 0.1
mo = pd.concat([cl.mask_overlap(experts, overlap_density, criterion=c, device=DEVICE)
                for c in ("fisher", "magnitude")], ignore_index=True)
chance = overlap_density / (2 - overlap_density)
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
for ax, crit in zip(axes, ["fisher", "magnitude"]):
    cl.views.pair_matrix_heatmap(mo, "jaccard", criterion=crit, ax=ax,
                          title=f"Jaccard of masks, {crit}, density {overlap_density}")
pooled = cl.aggregate(mo, by=()).groupby("criterion")["jaccard"].mean()
print(f"chance level d/(2-d) = {chance:.3f}")
print("mean Jaccard over pairs, whole model:")
print((pooled / chance).rename("x chance").to_frame().join(pooled).round(3).to_string())

# %% [markdown]
# Where two experts' masks overlap more than chance, both experts' curvature and
# edits concentrate on the same entries (the paper finds this in the embeddings and
# early attention), and that is exactly where a merge has to arbitrate: OTA gives an
# entry kept by a single expert that expert's full edit, and averages with curvature
# weights where several keep it. By role, against the chance level of each tensor's
# own kept fractions $p_a, p_b$ (independent masks: $p_a p_b / (p_a + p_b - p_a p_b)$),
# since a role that keeps more entries overlaps more by chance alone:

# %%
kept = ms[ms["density"] == overlap_density].set_index(["criterion", "expert", "name"])["kept_frac"]
pa = kept.reindex(list(zip(mo["criterion"], mo["expert_a"], mo["name"]))).to_numpy()
pb = kept.reindex(list(zip(mo["criterion"], mo["expert_b"], mo["name"]))).to_numpy()
mo["chance"] = np.where(pa + pb > 0, pa * pb / np.maximum(pa + pb - pa * pb, 1e-12), 1.0)
by_role = cl.aggregate(mo, by=("role",)).groupby(["criterion", "role"], sort=False)[["jaccard", "chance"]].mean()
(by_role["jaccard"] / by_role["chance"]).unstack("criterion").round(2)  # x chance, per role

# %% [markdown]
# ## Which of the paper's claims this zoo reproduces
#
# Claims (a) and (b) of the paper, decided by the rules of `curvlens.findings` from
# this notebook's sweep and mask statistics. (a) measures the gain over the base (a
# grafted expert falls back to the base, so the base's and the experts' own scores,
# item by item, come with it), and every comparison carries a 95% interval:
# evaluation items resampled for (a), tensors for (b).

# %%
reference = zoo.reference_scores(device=DEVICE)  # the base's and experts' rows, with per-item results
shapes = {n: tuple(desc.loc[n, "shape"]) for n in desc.index}
claims = pd.DataFrame([cl.finding_grafting(sweep, capabilities, reference), cl.finding_masks(ms, shapes, density=0.3)])
FACTS["claims"] = dict(zip(claims["claim"], claims["verdict"]))
display(Markdown(" ".join(f"**({r.claim}) {r.statement}: {r.verdict}.** {r.evidence}." for r in claims.itertuples())
                 + f" (Rules: {' / '.join(claims['rule'])}.) Evaluation sets of {FACTS['eval_n_min']} examples "
                 "or more per capability; a verdict is stated only where its intervals decide it."))

# %% [markdown]
# ## Explore
#
# Expert, criterion, density and metric; the heatmap and the model-wide kept
# fraction follow.

# %%
cl.views.mask_explorer(ms)

# %% [markdown]
# ## What this shows

# %%
noise2 = (2 * se_eval).rename("2 SE")
case = partial.assign(noise=partial["capability"].map(noise2))
beyond = int((case["diff"] > case["noise"]).sum())
diff_by_d = by_density["diff"]
lift = (pooled / chance).to_dict()
role_lift = (by_role["jaccard"] / by_role["chance"]).unstack("criterion")["fisher"]
struct = {crit: {d: (FACTS[f"empty_rows_{crit}_{d:g}"], FACTS[f"random_empty_rows_{crit}_{d:g}"])
                 for d in mask_densities} for crit in ("fisher", "magnitude")}
FACTS["summary"] = {"n_cases": int(len(partial)), "beyond_noise": beyond, "diff_by_density": diff_by_d.to_dict(),
                    "best_density": float(diff_by_d.idxmax()), "jaccard_lift": lift,
                    "top_role": role_lift.idxmax(), "top_role_lift": float(role_lift.max())}
more_rows = all(o > r for crit in struct for o, r in struct[crit].values())


def pct(x):
    """A percentage that shows a small non-zero fraction as such (0.026%, not 0.0%)."""
    return f"{100 * x:.0f}%" if x >= 0.1 else f"{100 * x:.2g}%"


ffg_most = all(struct["fisher"][d][0] - struct["fisher"][d][1] > struct["magnitude"][d][0] - struct["magnitude"][d][1]
               for d in mask_densities)
FACTS["summary"].update(more_rows_than_random=more_rows, ffg_most_rows=ffg_most)
display(Markdown(
    f"**Grafting.** Over {len(partial)} (expert, density < 1) cases FFG scored higher than magnitude pruning "
    f"in {wins}, the same in {ties} and lower in {losses}; in {beyond} of them its margin is larger than twice "
    f"the standard error of that capability's evaluation set. Its largest mean advantage over the experts is "
    f"{diff_by_d.max():+.3f} at density {diff_by_d.idxmax():g}. Claim (a) reads *{FACTS['claims']['a']}*. "
    f"**Structure.** " + "; ".join(
        f"{crit} masks at density {d:g} leave {pct(o)} of the rows empty (a random mask of the same per-tensor "
        f"density: {pct(r)})" for crit in struct for d, (o, r) in struct[crit].items())
    + ((": both criteria carve out whole rows more often than chance" + (", FFG by more. " if ffg_most else ". "))
       if more_rows else ". ")
    + f"Claim (b) reads *{FACTS['claims']['b']}*. **Overlap.** At density {overlap_density:g} two experts' FFG "
    f"masks share {lift['fisher']:.1f}× as many entries as independent random masks (magnitude "
    f"{lift['magnitude']:.1f}×), most in role {role_lift.idxmax()} ({role_lift.max():.1f}× the chance of "
    "its own kept fractions)"
    + (": there the experts compete for the same entries and the merge must arbitrate."
       if role_lift.max() > 1.5 else "; nowhere much more than chance.")))
