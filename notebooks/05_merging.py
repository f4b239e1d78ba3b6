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
# # Merging: which method and which parameters, for which trade-off?
#
# A merge is judged on two things at once: how good the merged model is on average,
# and how badly it fails its worst capability. This notebook sweeps the merge methods
# curvlens runs (linear, task arithmetic: Ilharco et al. 2023, arXiv:2212.04089;
# TIES: Yadav et al. 2023, arXiv:2306.01708; DARE: Yu et al. 2024, arXiv:2311.03099;
# Fisher: Matena & Raffel 2022, arXiv:2111.09832; OTA, OTA + FFG: Mahdavinia et al.
# 2025, arXiv:2509.11167) over a
# small grid of their main parameters on the demo zoo, scores every merge, draws the
# trade-off between the average and the worst capability with its Pareto front, runs
# the paper's rank-1 moment ablation (OTA with AdaFactor-style rank-1 second moments
# against full ones), and ends with an interactive explorer that merges and scores on
# demand.

# %% tags=["parameters"]
QUICK = True      # the quick zoo; False: the default zoo
DEVICE = "auto"   # "auto": CUDA when present, else CPU

# %%
# %matplotlib inline
import time

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import plotly.graph_objects as go
from IPython.display import Markdown, display

import curvlens as cl

FACTS = {}  # the computed facts the text relies on (read back by the tests)

zoo = cl.zoo.build("quick" if QUICK else "default")
experts = zoo.experts()
capabilities = dict(zoo.capabilities)
experts

# %% [markdown]
# ## The methods and their parameters
#
# `list_methods()` is the registry, one line per method; `method_params()` gives
# every parameter, its default and whether it takes one value per expert.
# (`docs/merge_methods.md` states each method's exact semantics.)

# %%
cl.list_methods()

# %%
params = cl.method_params()
params[params["method"].isin(["ties", "ota"])]

# %% [markdown]
# ## A small grid
#
# With base $\theta_0$ and task vectors $\tau_i$:
#
# | method | merged $\theta$ | swept |
# |---|---|---|
# | linear | $\frac1N\sum_i \theta_i$ | – |
# | task arithmetic | $\theta_0 + \lambda \sum_i \tau_i$ | $\lambda$ |
# | TIES | $\theta_0 + $ mean of the top-`density` entries of each $\tau_i$ that agree with the elected sign | density |
# | DARE-TIES | TIES on $\tau_i$ randomly thinned to `density` and rescaled by $1/\text{density}$ | density |
# | Fisher | $\sum_i v_i \theta_i / \sum_i v_i$ | – |
# | OTA | $\theta_0 + \sum_i W_i \tau_i / \sum_i W_i$, $W_i = v_i^{p} + \epsilon$ | power $p$ |
# | OTA + FFG | the same with $W_i = (v_i^{p} + \epsilon)\, m_i$, $m_i = [v_i\tau_i^2 \ge t_i]$ at a model-wide density | `ffg_density` |
# | OTA + FFG, linear combine | $\theta_0 + \frac1N \sum_i m_i \tau_i$ (the paper's "linear after FFG" ablation) | – |
#
# Every merge is kept in memory (the zoo is small) and scored on every capability.

# %%
OTA = {"epsilon": 1e-26}
FFG = {**OTA, "fallback_to_base": True}
GRID = [
    ("linear", "linear", {}),
    ("task arithmetic λ=0.3", "task_arithmetic", {"lambda": 0.3}),
    ("task arithmetic λ=0.5", "task_arithmetic", {"lambda": 0.5}),
    ("task arithmetic λ=1.0", "task_arithmetic", {"lambda": 1.0}),
    ("TIES d=0.3", "ties", {"density": 0.3}),
    ("TIES d=0.7", "ties", {"density": 0.7}),
    ("DARE-TIES d=0.5", "dare_ties", {"density": 0.5, "seed": 0}),
    ("Fisher", "fisher", {}),
    ("OTA p=0.5", "ota", {**OTA, "power": 0.5}),
    ("OTA p=1.0", "ota", {**OTA, "power": 1.0}),
    ("OTA p=0.5, normalise global", "ota", {**OTA, "power": 0.5, "normalise": "global"}),
    ("OTA+FFG d=0.1", "ota", {**FFG, "ffg_density": 0.1}),
    ("OTA+FFG d=0.2", "ota", {**FFG, "ffg_density": 0.2}),
    ("OTA+FFG d=0.3", "ota", {**FFG, "ffg_density": 0.3}),
    ("OTA+FFG d=0.5", "ota", {**FFG, "ffg_density": 0.5}),
    ("FFG d=0.3 + linear combine", "ota", {**FFG, "ffg_density": 0.3, "combine": "linear"}),
]

results, seconds = {}, {}
for label, method, params in GRID:
    t0 = time.perf_counter()
    results[label] = cl.merge(experts, method, device=DEVICE, progress=False, **params)
    seconds[label] = time.perf_counter() - t0
table = zoo.score(results, device=DEVICE)  # base and experts first (stored with the zoo)
print(f"{len(GRID)} merges in {sum(seconds.values()):.1f} s of merging")

# %% [markdown]
# ## Score table
#
# Raw held-out accuracy per capability, and relative to each capability's own expert
# (1.0 = the expert's score; the `worst` column is the lowest of those ratios).

# %%
pivot = table.pivot_table(index="model", columns="capability", values="accuracy", sort=False)
pivot["mean"] = pivot.mean(axis=1)
pivot.round(3)

# %%
rel = cl.views.normalized_scores(table, capabilities)
rel_pivot = rel.pivot_table(index="model", columns="capability", values="relative", sort=False)
summary = pd.DataFrame({"average": rel_pivot.mean(axis=1), "worst": rel_pivot.min(axis=1)})
merges_only = summary.drop(index=[m for m in summary.index if m.startswith("expert:") or m == "base"])
rel_pivot.join(summary).loc[merges_only.index].sort_values("average", ascending=False).round(3)

# %%
ax = cl.views.merge_scores(table, capabilities, normalized=True,
                    models=["base", *merges_only.index], title="Accuracy relative to each expert")

# %% [markdown]
# ## Pareto view: average against worst capability
#
# A merge is on the Pareto front when no other merge is at least as good on both
# axes and better on one. Methods off the front are dominated for this trade-off,
# whatever one's preference between the average and the worst case.

# %%
def pareto_front(df, x="average", y="worst"):
    """Labels of the rows no other row dominates (>= on both, > on one)."""
    front = []
    for label, r in df.iterrows():
        dominated = ((df[x] >= r[x]) & (df[y] >= r[y]) & ((df[x] > r[x]) | (df[y] > r[y]))).any()
        if not dominated:
            front.append(label)
    return front


front = pareto_front(merges_only)
fr = merges_only.loc[front].sort_values("average")
NAMES = {"linear": "linear", "task_arithmetic": "task arithmetic", "ties": "TIES", "dare_ties": "DARE-TIES",
         "fisher": "Fisher", "ota": "OTA"}
family = {label: ("OTA+FFG, linear combine" if params.get("combine") == "linear" else "OTA+FFG")
          if "ffg_density" in params else NAMES[method] for label, method, params in GRID}
fig = go.Figure()
for k, fam in enumerate(dict.fromkeys(family.values())):
    pts = merges_only.loc[[lab for lab in merges_only.index if family[lab] == fam]]
    fig.add_trace(go.Scatter(x=pts["average"], y=pts["worst"], mode="markers", name=fam,
                             text=list(pts.index), marker={"size": 10, "color": cl.views.OKABE_ITO[k % len(cl.views.OKABE_ITO)]},
                             hovertemplate="%{text}<br>average %{x:.3f}<br>worst %{y:.3f}<extra></extra>"))
fig.add_trace(go.Scatter(x=fr["average"], y=fr["worst"], mode="lines+markers", name="Pareto front",
                         line={"dash": "dash", "color": "black"}, marker={"symbol": "circle-open", "size": 16},
                         text=list(fr.index), hovertemplate="%{text} (Pareto)<extra></extra>"))
fig.update_layout(xaxis_title="average score relative to the experts",
                  yaxis_title="worst capability, relative to its expert",
                  title="Average vs worst capability (hover for the merge)", width=760, height=480)
fig

# %%
print("Pareto front (computed):", ", ".join(fr.index))
best_avg = merges_only["average"].idxmax()
best_worst = merges_only["worst"].idxmax()
print(f"best average: {best_avg} ({merges_only.loc[best_avg, 'average']:.3f}); "
      f"best worst case: {best_worst} ({merges_only.loc[best_worst, 'worst']:.3f})")

# %% [markdown]
# ## From the toy to the zoo: do the masks help this merge, does the level of $v$ matter?
#
# Notebook `06` (section 4) shows on a diagonal quadratic toy that FFG masks *raise*
# the loss of an exact curvature-weighted merge and lower that of a plain average,
# because the saliency prices reverting an entry to the base while a merge moves a
# masked entry to the *other* expert's value. A real merge has what the toy lacks
# (non-quadratic losses, off-diagonal curvature, a noisy $v$), so the effect of the
# masks has to be measured. The grid above contains the pairs that isolate it: OTA
# with and without masks, the plain average of task vectors with and without them,
# and OTA with `normalise: none` (the default) against `global`. Differences smaller
# than the evaluation noise (the standard error of a mean over the capabilities'
# accuracies, from the sizes of the evaluation sets) are reported as such.

# %%
n_eval = table.groupby("capability")["n"].first()
acc_mean = pivot["mean"]
noise = float(np.sqrt(np.sum(0.25 / n_eval.astype(float))) / len(n_eval))  # SE of a mean accuracy at a = 0.5


def compare(a, b):
    d = float(acc_mean[b] - acc_mean[a])
    word = "within noise" if abs(d) < 2 * noise else "better" if d > 0 else "worse"
    return {"from": a, "to": b, "mean accuracy from": float(acc_mean[a]), "mean accuracy to": float(acc_mean[b]),
            "difference": d, "reading": word}


ffg_labels = [lab for lab, _, prm in GRID if "ffg_density" in prm and prm.get("combine") != "linear"]
pairs_cmp = ([compare("OTA p=0.5", lab) for lab in ffg_labels]
             + [compare("linear", "FFG d=0.3 + linear combine"),
                compare("OTA p=0.5", "OTA p=0.5, normalise global")])
cmp = pd.DataFrame(pairs_cmp)
FACTS["noise_se_mean_accuracy"] = noise
FACTS["comparisons"] = {f"{r['from']} -> {r['to']}": r["reading"] for r in pairs_cmp}

mean_v = cl.moment_levels(experts, device="cpu", progress=False).set_index("expert")["mean_v"]
FACTS["mean_v_max_over_min"] = float(mean_v.max() / mean_v.min())
masks_read = cmp.iloc[:len(ffg_labels)]["reading"].value_counts().to_dict()
lin = pairs_cmp[len(ffg_labels)]
nrm = pairs_cmp[-1]
display(Markdown(
    f"Noise scale: the standard error of a mean accuracy over the {len(n_eval)} capabilities is about {noise:.3f} "
    f"(evaluation sets of {int(n_eval.min())} to {int(n_eval.max())} examples). **Masks on OTA** "
    f"($p = 0.5$): over {len(ffg_labels)} densities the masked merge is "
    + ", ".join(f"{k} {v}×" for k, v in masks_read.items())
    + " (" + ", ".join(f"{r['to'].split()[-1]}: {r['difference']:+.3f}" for r in pairs_cmp[:len(ffg_labels)])
    + f"). **Masks on the plain average** (linear, $\\theta_0 + \\frac1N \\sum_i \\tau_i$, against "
    f"$\\theta_0 + \\frac1N \\sum_i m_i \\tau_i$ at density 0.3): {lin['reading']} ({lin['difference']:+.3f}). **The level of $v$**: the experts' mean $v$ differ by a factor "
    f"{FACTS['mean_v_max_over_min']:.1f}, and `normalise: global` instead of `none` is {nrm['reading']} "
    f"({nrm['difference']:+.3f})."))
cmp.round(3)

# %% [markdown]
# ## Which of the paper's claims this zoo reproduces
#
# Claim (d), decided by the rule of `curvlens.findings` from the score table above
# (OTA+FFG at density 0.3 against the plain average, TIES at density 0.3 and
# DARE-TIES):

# %%
claim = cl.finding_merges(table, capabilities, {"ota_ffg": "OTA+FFG d=0.3", "linear": "linear",
                                                "ties": "TIES d=0.3", "dare": "DARE-TIES d=0.5"})
FACTS["claims"] = {claim["claim"]: claim["verdict"]}
display(Markdown(f"**({claim['claim']}) {claim['statement']}: {claim['verdict']}.** {claim['evidence']}. "
                 f"(Rule: {claim['rule']}.) The intervals resample the evaluation items, paired across merges: "
                 "a difference between merges decides the claim only where its whole interval lies on one side."))

# %% [markdown]
# ## Ablation: rank-1 second moments
#
# Storing $v$ costs as much as the model in fp32. The paper's memory-light variant
# keeps only its row and column sums (as Adafactor does; Shazeer & Stern 2018,
# arXiv:1804.04235): for an $m \times n$ matrix
# $$\hat V_{rc} = \frac{\big(\sum_{c'} V_{rc'}\big)\big(\sum_{r'} V_{r'c}\big)}{\sum_{r', c'} V_{r'c'}},$$
# $m + n$ numbers instead of $mn$. `moment_compression` says what that costs per
# tensor: the relative error of $\hat V$ and of the OTA weight $\hat V^{p}$ it induces,
# and the storage.

# %%
comp = cl.moment_compression(experts, rank=1, device=DEVICE)
comp_role = cl.aggregate(comp, by=("role",)).groupby("role", sort=False)[
    ["rel_error_v", "rel_error_weights", "bytes_full", "bytes_compressed"]].mean()
comp_role.round(3)

# %%
total = cl.aggregate(comp, by=()).groupby("expert")[["bytes_full", "bytes_compressed"]].sum()
print(f"moment storage with rank-1 matrices: {total['bytes_compressed'].sum() / total['bytes_full'].sum():.1%} "
      "of full (1-D tensors stay dense)")

# %% [markdown]
# Now the merges themselves, with and without rank-1 moments, for OTA alone and for
# OTA + FFG (where the FFG saliency then also uses $\hat V$, as in the authors'
# code):

# %%
ablation = [("OTA p=0.5", {**OTA, "power": 0.5}), ("OTA+FFG d=0.3", {**FFG, "ffg_density": 0.3})]
for label, params in ablation:
    r1 = f"{label}, rank-1 v"
    results[r1] = cl.merge(experts, "ota", device=DEVICE, progress=False, rank1_approx=True, **params)
    table = pd.concat([table, zoo.score({r1: results[r1]}, reference=False, device=DEVICE)], ignore_index=True)
rel = cl.views.normalized_scores(table, capabilities)
rel_pivot = rel.pivot_table(index="model", columns="capability", values="relative", sort=False)
rows_ab = [m for label, _ in ablation for m in (label, f"{label}, rank-1 v")]
ab = rel_pivot.loc[rows_ab]
ab = ab.assign(average=ab.mean(axis=1), worst=ab.min(axis=1))
ab.round(3)

# %%
for label, _ in ablation:
    full, r1 = ab.loc[label, "average"], ab.loc[f"{label}, rank-1 v", "average"]
    a, b = results[label].checkpoint, results[f"{label}, rank-1 v"].checkpoint
    num = sum(float((a[n].float() - b[n].float()).norm() ** 2) for n in a.keys()) ** 0.5
    den = sum(float((a[n].float() - experts.base[n].float()).norm() ** 2) for n in a.keys()) ** 0.5
    print(f"{label}: average relative score {full:.3f} with full v, {r1:.3f} with rank-1 v "
          f"({r1 - full:+.3f}); the merged weights move by {num / den:.1%} of the merge's edit")

# %% [markdown]
# ## Explore: merge and score on demand
#
# `merge_explorer` takes any callable `(method, params) -> merge table`; here it is a
# real merge of the zoo plus its evaluation (about a second each on the quick zoo).
# Pick a method, move its sliders, and the merge runs, is scored and is compared
# with the experts; results are cached per parameter set.

# %%
reference = table[table["method"].isin(["base", "expert"])]


def run_merge(method, params):
    params = dict(params)
    if method == "ota":
        params["epsilon"] = 1e-26
        if params.get("ffg_density", 1.0) >= 1.0:
            params.pop("ffg_density", None)  # density 1 keeps everything: plain OTA
        else:
            params["fallback_to_base"] = True
    if method in ("dare_linear", "dare_ties"):
        params["seed"] = 0
    res = cl.merge(experts, method, device=DEVICE, progress=False, **params)
    label = method + "(" + ", ".join(f"{k}={v:g}" for k, v in params.items() if k not in ("epsilon", "seed")
                                     and not isinstance(v, bool)) + ")"
    df = cl.zoo.evaluate(res.checkpoint, zoo=zoo, device=DEVICE)
    return df.assign(model=label, method=method)[["model", "method", "capability", "accuracy", "n"]]


explorer = cl.views.merge_explorer(run_merge, reference=reference, capability_map=capabilities)
explorer

# %% [markdown]
# The explorer can also be driven from code, e.g. OTA + FFG at density 0.2
# (setting a control runs the merge):

# %%
explorer.controls["method"].value = "ota"
explorer.controls["ota.ffg_density"].value = 0.2
print(explorer.status.value)
explorer.table.pivot_table(index="model", columns="capability", values="accuracy", sort=False).round(3)

# %% [markdown]
# ## What this shows

# %%
means = table.pivot_table(index="model", columns="capability", values="accuracy", sort=False).mean(axis=1)
merge_means = means.loc[[m for m in merges_only.index if m in means.index]].sort_values(ascending=False)
lead = float(merge_means.iloc[0] - merge_means.iloc[1])
rank1 = {label: float(means[f"{label}, rank-1 v"] - means[label]) for label, _ in ablation}
readings = FACTS["comparisons"]
FACTS["summary"] = {"best_average": best_avg, "best_worst": best_worst, "front": list(fr.index),
                    "top_mean": float(merge_means.iloc[0]), "second": merge_means.index[1],
                    "second_mean": float(merge_means.iloc[1]), "lead": lead, "lead_beyond_noise": lead > 2 * noise,
                    "rank1_mean_change": rank1,
                    "rank1_beyond_noise": {k: abs(v) > 2 * noise for k, v in rank1.items()}}
within = [k for k, v in readings.items() if v == "within noise"]
FACTS["comparison_diffs"] = {f"{r['from']} -> {r['to']}": r["difference"] for r in pairs_cmp}
display(Markdown(
    f"On this zoo **{best_avg}** has the best average score relative to the experts "
    f"({merges_only.loc[best_avg, 'average']:.3f}) and **{best_worst}** the best worst capability "
    f"({merges_only.loc[best_worst, 'worst']:.3f}); the Pareto front of average against worst case is "
    f"{', '.join(fr.index)}. By mean accuracy the best merge leads the next ({merge_means.index[1]}) by "
    f"{lead:.3f}, " + ("more than" if lead > 2 * noise else "less than")
    + f" twice the noise scale ({2 * noise:.3f}): "
    + ("a ranking the evaluation sets can resolve. " if lead > 2 * noise
       else "the evaluation sets cannot tell the top two apart. ")
    + f"Of the {len(readings)} paired comparisons that isolate the masks and the level of $v$, "
    f"{len(within)} are within noise"
    + (f" ({', '.join(k for k in readings if k not in within)} are not)" if len(within) < len(readings) else "")
    + ". The rank-1 moments change the mean accuracy by "
    + ", ".join(f"{v:+.3f} ({k})" for k, v in rank1.items())
    + (", within noise: on this zoo they keep OTA's result at "
       f"{total['bytes_compressed'].sum() / total['bytes_full'].sum():.1%} of the moment storage. "
       if not any(FACTS["summary"]["rank1_beyond_noise"].values()) else ", beyond noise for at least one of them. ")
    + f"Claim (d) reads *{FACTS['claims']['d']}*."))
