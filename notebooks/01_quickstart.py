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
# # curvlens quickstart: from experts to a curvature-informed merge
#
# Several experts fine-tuned from one base model can be merged into one model, but
# which merge, and why does it work or fail? curvlens answers with the experts'
# training curvature: the Adam second moments `exp_avg_sq` saved with each expert.
# This notebook runs the whole loop once on the embedded demo zoo (a tiny Llama base
# and four capability experts trained with AdamW on your machine): open the experts,
# measure how similar their curvature is, merge them with OTA + Fast Fisher Grafting
# (the method of Mahdavinia et al. 2025, arXiv:2509.11167), and score the merge
# against the base and the experts. References are collected in
# `docs/references.md`, the terms used in `docs/glossary.md`.
# On the quick zoo it takes well under two minutes.

# %% tags=["parameters"]
QUICK = True      # the quick zoo (about a minute to build); False: the default zoo
DEVICE = "auto"   # "auto": CUDA when present, else CPU

# %%
import time

import pandas as pd

import curvlens as cl

t_start = time.perf_counter()

# %% [markdown]
# ## 1. The expert zoo
#
# `curvlens.zoo.build` trains the zoo once and caches it (in `$CURVLENS_CACHE`, else
# `~/.cache/curvlens`); later calls load it. Each expert is an ordinary Hugging Face
# model dir laid out as the paper's released experts, with its second moments in
# `<expert>/export/exp_avg_sq.safetensors`.

# %%
zoo = cl.zoo.build("quick" if QUICK else "default")
experts = zoo.experts()
print(experts)
print("capabilities:", dict(zoo.capabilities))
print("base model:", zoo.base_dir)

# %% [markdown]
# `describe()` lists every tensor with its layer, role, shape and dtype without
# reading any data, which is what you want before touching an 8B checkpoint.

# %%
desc = experts.describe()
desc.head(12)

# %%
desc.groupby("role", sort=False)["numel"].sum().to_frame("parameters")

# %% [markdown]
# ## 2. One analysis: how similar is the experts' curvature?
#
# For two experts $a, b$ and one tensor, curvlens compares the second moments
# $v_a, v_b$ entry by entry. The headline number is the Spearman rank correlation
# $\rho(v_a, v_b)$ (how similarly the two runs *order* the entries by curvature,
# whatever their scale); it also reports the Pearson correlation of
# $\log_{10} v$, the cosine of $v$ and the Jaccard overlap of the top 1% / 10%
# entries. `aggregate(..., by=())` pools the per-tensor rows into one
# model-level number per pair, weighting each tensor by its size.

# %%
overlap = cl.curvature_overlap(experts, device=DEVICE)
model_overlap = cl.aggregate(overlap, by=())
model_overlap.round(3)

# %% [markdown]
# The same numbers as an interactive expert × expert matrix (hover for the pair,
# the value and how many parameters went into it):

# %%
cl.views.pair_matrix_plotly(overlap, "spearman_log", title="Spearman correlation of v between experts (whole model)")

# %% [markdown]
# ## 3. One merge: OTA with Fast Fisher Grafting
#
# With base $\theta_0$, experts $\theta_i$, task vectors $\tau_i = \theta_i - \theta_0$
# and second moments $v_i$:
#
# * **FFG** keeps, for each expert, the entries with the largest saliency
#   $s_i = v_i \tau_i^2$ (the diagonal-Fisher estimate of how much the expert's loss
#   rises if that entry is reset to the base): $m_i = [s_i \ge t_i]$, with one
#   threshold $t_i$ for the whole model. `ffg_density=0.3` picks $t_i$ so that 30% of
#   the expert's entries are kept.
# * **OTA** then averages the kept edits with curvature weights
#   $W_i = (v_i^{p} + \epsilon)\, m_i$ ($p = 0.5$):
#   $$\theta = \theta_0 + \frac{\sum_i W_i \tau_i}{\sum_i W_i},$$
#   and entries no expert kept fall back to the base.
#
# Without `out=`, the merged model stays in memory (fine for small models); with
# `out=` it is streamed to an HF model dir.

# %%
result = cl.merge(experts, "ota", ffg_density=0.3, epsilon=1e-26, fallback_to_base=True,
                        device=DEVICE)
result

# %% [markdown]
# The model-wide thresholds the density was turned into (one per expert), and the
# per-tensor report (kept fraction of each expert, fraction no expert kept, size of
# the change):

# %%
result.thresholds

# %%
result.report.head(8)

# %% [markdown]
# ## 4. Score the merge against the base and the experts
#
# Every capability has a held-out evaluation set scored by exact match of greedy
# answers. A good merge approaches each expert on that expert's own capability.

# %%
# the base's and experts' scores are evaluated once and stored with the zoo
table = zoo.score({"OTA+FFG (0.3)": result}, device=DEVICE)
pivot = table.pivot_table(index="model", columns="capability", values="accuracy", sort=False)
pivot["mean"] = pivot.mean(axis=1)
pivot.round(3)

# %% [markdown]
# How much of what fine-tuning added does the merge keep? The base already answers
# part of each capability, so the yardstick is the **gain over the base**:
# $(\text{merged} - \text{base}) / (\text{expert} - \text{base})$ per capability (1 keeps
# all of the expert's gain, 0 is no better than the base), pooled over capabilities
# as $\sum(\text{merged} - \text{base}) / \sum(\text{expert} - \text{base})$; negative
# transfer is the worst capability's. Retention (merged / expert) is shown beside it
# only as a secondary column: it credits the base's own score to every merge.

# %%
gain = cl.merge_gain(table, zoo.capabilities)
gain[gain["model"] == "OTA+FFG (0.3)"].round(3)

# %%
g = cl.gain_interval(table, zoo.capabilities, "OTA+FFG (0.3)")
print(f"OTA+FFG keeps {g['pooled']:.0%} of the experts' summed gain over the base "
      f"(95% interval over the evaluation items {g['pooled_low']:.0%} to {g['pooled_high']:.0%}); "
      f"its worst capability keeps {g['worst']:.0%} ({g['worst_low']:.0%} to {g['worst_high']:.0%}).")

# %% [markdown]
# An interactive view of the same table (hover for the numbers):

# %%
cl.views.merge_scores_plotly(table, zoo.capabilities, normalized=True,
                      title="Accuracy relative to each capability's expert")

# %%
print(f"notebook ran in {time.perf_counter() - t_start:.0f} s")

# %% [markdown]
# ## Which of the paper's claims this zoo reproduces
#
# This notebook measures one of them, the curvature overlap (claim (c)), decided by
# the rule of `curvlens.findings` from the overlap computed in section 2; the others
# are decided in `03_ffg_masks` (FFG against magnitude, mask structure) and
# `05_merging` (merges), and all four by `curvlens demo` in its report.

# %%
from IPython.display import Markdown, display  # noqa: E402

claim = cl.finding_overlap(overlap)
FACTS = {"claims": {claim["claim"]: claim["verdict"]}}
display(Markdown(f"**({claim['claim']}) {claim['statement']}: {claim['verdict']}.** {claim['evidence']}. "
                 f"(Rule: {claim['rule']}.)"))

# %% [markdown]
# ## Where next
#
# * `02_curvature_overlap` — curvature similarity by layer and role, the paper's pair grids.
# * `03_ffg_masks` — FFG vs magnitude grafting, where the masks live, their rank.
# * `04_interference` — sign conflicts and the loss each merge is predicted to cost.
# * `05_merging` — sweep methods and parameters, Pareto view, rank-1 moments.
# * `06_teaching` — curvature merging from first principles on quadratics.
# * `07_your_checkpoints` — point curvlens at your own models and moments.
# * `08_soups_and_fronts` — sweeps, greedy soups and Pareto fronts of merge coefficients.
# * `09_fisher_vs_adam` — Adam's $v$ against a Fisher estimated from data.

# %% [markdown]
# ## What this shows
#
# Computed from the tables above (the gain over the base is what fine-tuning added,
# $\text{expert} - \text{base}$ on the expert's own capability; the fraction of it a
# merge keeps is $(\text{merge} - \text{base}) / (\text{expert} - \text{base})$):

# %%
scores = table.pivot_table(index="model", columns="capability", values="accuracy", sort=False)
rows = []
for e, cap in zoo.capabilities.items():
    base_s, exp_s, mrg_s = (float(scores.loc[m, cap]) for m in ("base", f"expert: {e}", "OTA+FFG (0.3)"))
    rows.append({"capability": cap, "expert": e, "base": base_s, "expert score": exp_s, "OTA+FFG": mrg_s,
                 "gain kept": (mrg_s - base_s) / (exp_s - base_s) if exp_s > base_s else float("nan"),
                 "retention": mrg_s / exp_s if exp_s > 0 else float("nan")})
gains = pd.DataFrame(rows).set_index("capability")
kept = gains["gain kept"].dropna()
n_items = table.groupby("capability")["n"].first().astype(int)
rho_pairs = model_overlap["spearman_log"]
word = "strongly" if rho_pairs.min() >= 0.7 else "partly" if rho_pairs.min() >= 0.4 else "weakly"
FACTS.update(summary={"merge_mean": float(scores.loc["OTA+FFG (0.3)"].mean()),
                      "base_mean": float(scores.loc["base"].mean()),
                      "scores": gains[["base", "expert score", "OTA+FFG"]].to_dict("index"),
                      "gain_kept": kept.to_dict(), "least_kept": kept.idxmin(), "most_kept": kept.idxmax(),
                      "spearman_min": float(rho_pairs.min()), "spearman_max": float(rho_pairs.max()),
                      "overlap_word": word, "n_items": n_items.to_dict()})
display(Markdown(
    f"On the {'quick' if QUICK else 'default'} zoo, OTA+FFG at density 0.3 scores a mean accuracy of "
    f"{FACTS['summary']['merge_mean']:.3f} over the four capabilities, against {FACTS['summary']['base_mean']:.3f} "
    f"for the base. Of each expert's gain over the base it keeps between {kept.min():.0%} ({kept.idxmin()}) and "
    f"{kept.max():.0%} ({kept.idxmax()}): "
    + ", ".join(f"{c} {k:.0%}" for c, k in kept.items())
    + f". Measured as retention (merge / expert, which also credits the base's own score) the same merge reads "
    f"{gains['retention'].min():.0%} to {gains['retention'].max():.0%}. The experts' curvature overlaps {word} "
    f"(model-level Spearman {rho_pairs.min():.2f} to {rho_pairs.max():.2f}), and claim (c) reads "
    f"*{FACTS['claims']['c']}*. These numbers come from evaluation sets of {n_items.min()} to {n_items.max()} "
    "items, one zoo and one seed: "
    "notebooks 03 and 05 say how large a difference has to be to mean something."))
cl.views.significant(gains)
