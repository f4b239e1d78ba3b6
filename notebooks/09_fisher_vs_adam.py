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
# # Adam's v against a real Fisher
#
# OTA merging and FFG (Mahdavinia et al. 2025, arXiv:2509.11167) use each expert's
# Adam second moment $v$ (`exp_avg_sq`; Kingma & Ba 2015, arXiv:1412.6980) as its
# diagonal curvature. Fisher merging (Matena & Raffel 2022, arXiv:2111.09832) uses a
# diagonal Fisher estimated from data instead. They are not the same quantity:
#
# * the diagonal **empirical Fisher** of expert $i$ at its final weights $\theta_i$ is
#   the mean over $N$ examples of the squared per-example gradient,
#   $F_i = \frac1N \sum_n (\partial \ell_n / \partial \theta)^2$ (`cl.estimate_fisher`);
# * **Adam's $v$** is an exponential moving average, over the *whole run*, of squared
#   *mini-batch* gradients, $v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2$: it remembers
#   the early, large gradients for about $1/(1 - \beta_2)$ steps (1,000 at
#   $\beta_2 = 0.999$), and a mini-batch gradient squared is the squared mean gradient
#   plus $1/B$ of the per-example variance.
#
# Neither is the Hessian in general (Kunstner et al. 2019, arXiv:1905.12558;
# notebook `06`, section 5). This notebook measures, on the demo zoo, how far Adam's
# $v$ is from a Fisher estimated on each expert's own training data, compared with
# how far two Fishers of the same expert on independent samples are from each other
# (the estimation noise), and whether the difference changes the FFG masks and the
# merges. Terms: `docs/glossary.md`; papers: `docs/references.md`;
# the API: `docs/fisher_and_soups.md`.
#
# **Learning goals.** Estimate a data Fisher in the layout curvlens reads; compare two
# curvatures with the overlap metrics of notebook `02` against a noise floor; tell
# whether a difference of curvature reaches the masks and the merged scores.

# %% tags=["parameters"]
QUICK = True      # the quick zoo and 128 examples per Fisher; False: the default zoo and 512
DEVICE = "auto"   # "auto": CUDA when present, else CPU

# %%
# %matplotlib inline
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from IPython.display import Markdown, display

import curvlens as cl

FACTS = {}  # the computed facts the text relies on (read back by the tests)
zoo = cl.zoo.build("quick" if QUICK else "default")
experts = zoo.experts()
capabilities = dict(zoo.capabilities)
N_EXAMPLES = 128 if QUICK else 512
work = Path(tempfile.mkdtemp(prefix="curvlens-09-"))   # the Fishers this notebook writes
experts

# %% [markdown]
# ## 1. Two Fishers per expert
#
# `cl.zoo.training_batches` draws an expert's training items the way its fine-tuning
# drew them (the evaluation prompts held out; the loss on the answer tokens only),
# and `cl.estimate_fisher` takes the per-example gradients with `torch.func` and
# writes the Fisher as `export/exp_avg_sq.safetensors`, where every analysis and
# merge of curvlens reads a curvature. Each expert gets two Fishers on independent
# samples (seeds 0 and 1) of the same size.

# %%
fishers, seconds = {0: {}, 1: {}}, {}
for name, d in zoo.expert_dirs.items():
    for seed in (0, 1):
        t0 = time.perf_counter()
        fishers[seed][name] = cl.estimate_fisher(d, cl.zoo.training_batches(zoo, name, N_EXAMPLES, seed=seed),
                                                 work / f"seed{seed}" / name, device=DEVICE, progress=False)
        seconds[(name, seed)] = time.perf_counter() - t0
print(f"{len(seconds)} Fishers of {N_EXAMPLES} examples in {sum(seconds.values()):.0f} s "
      f"({np.mean(list(seconds.values())) / N_EXAMPLES * 1e3:.0f} ms an example)")
print(fishers[0]["math"].metadata)

# %% [markdown]
# ## 2. How alike are Adam's v and the Fisher, against the noise floor?
#
# `cl.fisher_vs_adam` runs the overlap metrics of notebook `02` between each
# expert's Adam $v$ and its Fisher (`curvature == "adam~fisher"`), and the Jaccard
# of the FFG masks the two curvatures give at one model-wide density. The same
# function with the seed-0 Fisher in the place of Adam's $v$ measures the noise
# floor: how alike two Fishers of the same expert are.

# %%
DENSITY = 0.3
merges = {"OTA+FFG": ("ota", {"ffg_density": DENSITY, "epsilon": 1e-26, "fallback_to_base": True}),
          "Fisher averaging": ("fisher", {})}
df = cl.fisher_vs_adam(experts, fishers[0], density=DENSITY,
                       evaluate=lambda m: zoo.evaluate(m, device=DEVICE), merges=merges,
                       device=DEVICE, progress=False)
as_adam = cl.Experts.from_dirs(zoo.base_dir, list(zoo.expert_dirs.values()), names=list(zoo.expert_dirs),
                               moments=[work / "seed0" / n for n in zoo.expert_dirs])
floor = cl.fisher_vs_adam(as_adam, fishers[1], density=DENSITY, device=DEVICE, progress=False)


def same_expert(frame):
    """Per expert: the overlap metrics and the FFG mask Jaccard of its two curvatures."""
    rows = frame[frame["curvature"] == "adam~fisher"]
    return rows.pivot_table(index="expert_a", columns="metric", values="value", sort=False)


cols = ["cosine", "spearman_log", "jaccard_top10", f"jaccard@{DENSITY:g}"]
adam_vs_f = same_expert(df)[cols]
f_vs_f = same_expert(floor)[cols]
compare = pd.concat({"Adam v ~ Fisher": adam_vs_f, "Fisher ~ Fisher (another sample)": f_vs_f}, axis=1)
compare.index.name = "expert"
FACTS["adam_vs_fisher"] = adam_vs_f.to_dict("index")
FACTS["fisher_vs_fisher"] = f_vs_f.to_dict("index")
cl.views.significant(compare, 2)

# %%
fig = cl.views.fisher_vs_adam_plot(df)

# %% [markdown]
# The gap to the noise floor, per expert and metric (positive: Adam's $v$ agrees with
# the Fisher *less* than a second Fisher does):

# %%
gap = f_vs_f - adam_vs_f
below = {e: [m for m in cols if gap.loc[e, m] > 0.05] for e in gap.index}
FACTS["gap_to_floor"] = gap.to_dict("index")
FACTS["experts_below_floor"] = sorted(e for e, ms in below.items() if len(ms) == len(cols))
display(Markdown(
    "Adam's $v$ agrees with the expert's Fisher less than a second Fisher does, by more than 0.05 on every metric, "
    f"for {', '.join(FACTS['experts_below_floor']) or 'no expert'}"
    + (f"; for {', '.join(e for e in gap.index if e not in FACTS['experts_below_floor'])} on some metrics or none"
       if len(FACTS["experts_below_floor"]) < len(gap) else "")
    + f". The largest gap is {gap.max().max():.2f} ({gap.max(axis=1).idxmax()}, "
    f"{gap.max().idxmax()}). A gap larger than the noise floor is a difference of *what* is measured (a run-long "
    "average of mini-batch gradients against the end point's per-example ones), not of how well it is estimated."))
cl.views.significant(gap, 2)

# %% [markdown]
# ## 3. Does it reach the merges?
#
# The same two merges, once with Adam's $v$ and once with the Fisher as each
# expert's curvature, scored on every capability. A difference between the two is
# only worth reading if it exceeds the noise of the evaluation sets: twice the
# standard error of the difference of two independent accuracies at 0.5,
# $2\sqrt{2 \cdot 0.25 / n}$ (notebook `06`, exercise 2).

# %%
scores = df[df["analysis"] == "merge_score"].pivot_table(index=["method", "curvature"], columns="expert_a",
                                                          values="value", sort=False)
scores.columns.name = "capability"
n_eval = zoo.reference_scores(device=DEVICE).groupby("capability")["n"].first().astype(float)
noise2 = 2 * np.sqrt(2 * 0.25 / n_eval)
diffs = []
for method in merges:
    d = scores.loc[(method, "fisher")] - scores.loc[(method, "adam")]
    for cap, x in d.items():
        diffs.append({"merge": method, "capability": cap, "fisher - adam": float(x), "noise (2 SE)": float(noise2[cap]),
                      "reading": "within noise" if abs(x) <= noise2[cap] else "Fisher better" if x > 0
                      else "Adam v better"})
diffs = pd.DataFrame(diffs)
FACTS["merge_diffs"] = diffs.to_dict("records")
FACTS["merge_scores"] = {f"{m}|{c}": scores.loc[(m, c)].to_dict() for m, c in scores.index}
display(cl.views.significant(scores.assign(mean=scores.mean(axis=1))))
cl.views.significant(diffs)

# %% [markdown]
# ## What this shows

# %%
spear = adam_vs_f["spearman_log"]
mask_j = adam_vs_f[f"jaccard@{DENSITY:g}"]
beyond = diffs[diffs["reading"] != "within noise"]
FACTS["summary"] = {"spearman_min": float(spear.min()), "spearman_max": float(spear.max()),
                    "mask_jaccard_min": float(mask_j.min()), "mask_jaccard_max": float(mask_j.max()),
                    "floor_spearman_min": float(f_vs_f["spearman_log"].min()),
                    "n_beyond_noise": int(len(beyond)), "n_compared": int(len(diffs))}
display(Markdown(
    f"On the {'quick' if QUICK else 'default'} zoo, each expert's Adam $v$ ranks its entries like a Fisher taken on "
    f"{N_EXAMPLES} of its own training items at Spearman {spear.min():.2f} ({spear.idxmin()}) to {spear.max():.2f} "
    f"({spear.idxmax()}), where two Fishers of the same expert agree at {f_vs_f['spearman_log'].min():.2f} or more; "
    f"the FFG masks at density {DENSITY:g} share {mask_j.min():.0%} to {mask_j.max():.0%} of their entries "
    f"(Jaccard). "
    + (f"So $v$ is a related but different curvature, most different for {gap['spearman_log'].idxmax()}, whose "
       f"Spearman falls {gap['spearman_log'].max():.2f} below its noise floor. " if gap["spearman_log"].max() > 0.05 else
       "So $v$ ranks the entries about as a second Fisher does (within 0.05 of the noise floor for every expert). ")
    + f"In the merges, {len(beyond)} of {len(diffs)} capability scores move by "
    f"more than the evaluation noise when the Fisher replaces $v$"
    + (": " + "; ".join(f"{r['merge']} on {r['capability']} {r['fisher - adam']:+.2f} ({r['reading']})"
                        for r in beyond.to_dict("records")) if len(beyond) else "")
    + ". Which curvature is *right* is not what this measures: neither is the Hessian (notebook `06`, section 5); "
    "what it shows is how much a curvature-weighted merge depends on the choice."))

# %%
shutil.rmtree(work)  # the Fishers written above (the zoo's cache is left alone)
