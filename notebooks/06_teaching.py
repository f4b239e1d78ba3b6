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
# # Curvature merging from first principles
#
# Why should a merge weight each expert's parameters by curvature, why is Adam's
# second moment a usable curvature estimate, and why does Fast Fisher Grafting keep
# the entries it keeps? This notebook answers all three on small quadratic problems
# whose answers are known in closed form, with numpy and torch only (no zoo, no
# checkpoints): every claim is checked numerically against the formula, and sliders
# let you change the curvature ratio and the noise and watch the answers move.
# Section 4 then asks what of this carries over to a real merge (it does not all
# carry over: on this very toy FFG masking *hurts* the merge), and section 5 lists
# the caveats a careful reader needs.
#
# Every sentence below that states a number or a comparison is printed by the cell
# that computes it, and the cell asserts it; the facts are also collected in the
# dict `FACTS`, which `tests/test_notebooks.py` reads back and checks.
#
# **Learning goals.** After working through this notebook you can
#
# 1. derive the curvature-weighted average as the minimizer of a sum of diagonal
#    quadratic losses (Fisher merging: Matena & Raffel 2022, arXiv:2111.09832) and
#    compute the excess loss of plain averaging, and explain why a perfect *overlap*
#    of curvature patterns does not make that excess zero;
# 2. say what Adam's second moment $v$ measures (Kingma & Ba 2015, arXiv:1412.6980),
#    when it is proportional to the curvature, and why its *level* depends on the
#    run (noise, batch size, learning rate);
# 3. explain what Fast Fisher Grafting keeps (the Optimal Brain Damage saliency,
#    LeCun et al., NIPS 1989, of an edit; Mahdavinia et al. 2025, arXiv:2509.11167),
#    when magnitude pruning picks the wrong entries, and why masking is *not* the
#    optimal merge;
# 4. name the caveats before trusting a curvature-weighted merge: the empirical
#    Fisher is not the Hessian (Kunstner et al. 2019, arXiv:1905.12558), the diagonal
#    misses rotations, $v$ is noisy, and small evaluation sets cannot separate close
#    merges.
#
# Three exercises with worked solutions close the notebook (section 7). Terms are
# defined in `docs/glossary.md`, papers listed in `docs/references.md`.

# %% tags=["parameters"]
QUICK = True      # unused here (no zoo is needed); kept for the common notebook interface
DEVICE = "auto"   # unused here

# %%
# %matplotlib inline
import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from IPython.display import Markdown, display

import curvlens as cl  # only for its sliders (cl.views.figure_sliders); no zoo here

rng = np.random.default_rng(0)
torch.manual_seed(0)
torch.set_num_threads(1)  # the tensors here are tiny: extra threads only wait for each other
FACTS = {}  # the computed facts the text relies on (read back by the tests)


def rank_corr(a, b):
    """Spearman rank correlation (Pearson correlation of the ranks)."""
    return float(pd.Series(np.asarray(a)).rank().corr(pd.Series(np.asarray(b)).rank()))

# %% [markdown]
# ## 1. Two experts with diagonal quadratic losses
#
# Let expert $i \in \{1, 2\}$ have the loss
# $$L_i(\theta) = \tfrac12 \sum_j h_{ij}\,(\theta_j - \theta^\star_{ij})^2 ,$$
# minimized at its own weights $\theta^\star_i$, with curvature (Hessian diagonal)
# $h_i > 0$. The merge that is best for both, the minimizer of $L_1 + L_2$, sets
# each coordinate's derivative $h_{1j}(\theta_j - \theta^\star_{1j}) + h_{2j}(\theta_j -
# \theta^\star_{2j})$ to zero:
# $$\hat\theta_j = \frac{h_{1j}\,\theta^\star_{1j} + h_{2j}\,\theta^\star_{2j}}{h_{1j} + h_{2j}} .$$
# This is the **curvature-weighted average** (Fisher merging when $h$ is the Fisher).
# Plain averaging, $\bar\theta = (\theta^\star_1 + \theta^\star_2)/2$, is optimal only where
# $h_{1j} = h_{2j}$. Since $L_1 + L_2$ is itself quadratic with curvature $h_1 + h_2$
# and minimum at $\hat\theta$, the excess loss of plain averaging is
# $$(L_1 + L_2)(\bar\theta) - (L_1 + L_2)(\hat\theta)
#   = \tfrac12 \sum_j (h_{1j} + h_{2j})(\bar\theta_j - \hat\theta_j)^2
#   = \sum_j \frac{(\theta^\star_{1j} - \theta^\star_{2j})^2\,(h_{1j} - h_{2j})^2}{8\,(h_{1j} + h_{2j})} .$$
# It vanishes when the curvatures agree and grows with the distance between the
# experts and with $(h_{1j} - h_{2j})^2 / (h_{1j} + h_{2j})$: a *difference of levels*,
# coordinate by coordinate, not a correlation of patterns. So the overlap metrics
# of notebook `02` (Spearman, cosine), which ignore the overall scale, do not by
# themselves decide how much curvature weighting can gain over plain averaging:
# the cell after the next one gives expert 2 exactly expert 1's curvature times a
# constant, a perfect overlap by every such metric, and the gain is still large.
#
# Numerically, with 1,000 coordinates and curvatures spread over four decades (the
# generic optimizer agrees with the formula up to its stopping tolerance):

# %%
d = 1000
h1 = 10 ** rng.uniform(-2, 2, d)
h2 = 10 ** rng.uniform(-2, 2, d)
t1 = rng.normal(0, 1, d)
t2 = rng.normal(0, 1, d)


def total_loss(theta):
    return 0.5 * np.sum(h1 * (theta - t1) ** 2) + 0.5 * np.sum(h2 * (theta - t2) ** 2)


closed_form = (h1 * t1 + h2 * t2) / (h1 + h2)
plain = (t1 + t2) / 2

# minimize L1 + L2 numerically (torch, L-BFGS), starting from the plain average
theta = torch.tensor(plain, requires_grad=True)
H1, H2, T1, T2 = (torch.tensor(a) for a in (h1, h2, t1, t2))
opt = torch.optim.LBFGS([theta], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                        line_search_fn="strong_wolfe")


def closure():
    opt.zero_grad()
    loss = 0.5 * (H1 * (theta - T1) ** 2).sum() + 0.5 * (H2 * (theta - T2) ** 2).sum()
    loss.backward()
    return loss


opt.step(closure)
numerical = theta.detach().numpy()

gap_formula = np.sum((t1 - t2) ** 2 * (h1 - h2) ** 2 / (8 * (h1 + h2)))
gap_measured = total_loss(plain) - total_loss(closed_form)
print(f"max |numerical minimizer - closed form|  = {np.abs(numerical - closed_form).max():.2e}")
print(f"loss at the curvature-weighted average   = {total_loss(closed_form):.4f}")
print(f"loss at the numerical minimizer          = {total_loss(numerical):.4f}")
print(f"loss at the plain average                = {total_loss(plain):.4f}")
print(f"excess of plain averaging: measured {gap_measured:.6f}, formula {gap_formula:.6f}")
assert np.abs(numerical - closed_form).max() < 1e-3            # L-BFGS stops at its tolerance
assert np.isclose(total_loss(numerical), total_loss(closed_form), rtol=1e-9)
assert np.isclose(gap_measured, gap_formula, rtol=1e-9)
FACTS["lbfgs_max_abs_diff"] = float(np.abs(numerical - closed_form).max())
FACTS["excess_formula_rel_err"] = float(abs(gap_measured - gap_formula) / gap_formula)

# %% [markdown]
# **Overlap is not the gain.** Give expert 2 the curvature $c\,h_1$ (the same pattern,
# a different level; e.g. a run with a $c$ times smaller batch, section 2) and keep
# the two optima. Every scale-free overlap metric says the curvatures agree
# perfectly; the excess of plain averaging is $\sum_j (\theta^\star_{1j} -
# \theta^\star_{2j})^2 h_{1j} (c - 1)^2 / (8 (1 + c))$, zero only at $c = 1$:

# %%
rows = []
for c in (1.0, 2.0, 5.0, 20.0):
    hA, hB = h1, c * h1
    rows.append({"c": c, "spearman": rank_corr(hA, hB),
                 "cosine": float(hA @ hB / np.linalg.norm(hA) / np.linalg.norm(hB)),
                 "excess of plain averaging": float(np.sum((t1 - t2) ** 2 * (hA - hB) ** 2 / (8 * (hA + hB)))),
                 "excess / L at the optimum": float(np.sum((t1 - t2) ** 2 * (hA - hB) ** 2 / (8 * (hA + hB)))
                                                    / (0.5 * np.sum(hA * hB / (hA + hB) * (t1 - t2) ** 2)))})
scaled = pd.DataFrame(rows).set_index("c")
assert (scaled["spearman"] > 0.999999).all() and (scaled["cosine"] > 0.999999).all()
assert scaled.loc[1.0, "excess of plain averaging"] == 0 and (scaled["excess of plain averaging"].iloc[1:] > 0).all()
FACTS["scaled_copy_excess_rel_c5"] = float(scaled.loc[5.0, "excess / L at the optimum"])
display(Markdown(f"With $c = 5$, Spearman and cosine are both 1, yet plain averaging pays "
                 f"{scaled.loc[5.0, 'excess / L at the optimum']:.0%} more than the optimum's "
                 f"$L_1 + L_2$."))
scaled.round(3)

# %% [markdown]
# In two dimensions the picture is the whole story: the experts' loss ellipses
# (thin: expert 1, dashed: expert 2), the contours of $L_1 + L_2$, the plain average
# (square) and the curvature-weighted one (star), which sits exactly at the minimum.
# Move the slider: the curvature ratio $r$ makes expert 1 sharp along $\theta_1$ and
# flat along $\theta_2$ and expert 2 the other way round ($h_1 = (r, 1/r)$, $h_2 = (1/r, r)$);
# at $r = 1$ the curvatures agree and both merges coincide.

# %%
def two_expert_picture(log10_ratio=1.0):
    r = 10.0 ** log10_ratio
    a1, a2 = np.array([r, 1 / r]), np.array([1 / r, r])
    s1, s2 = np.array([-1.0, 0.5]), np.array([1.0, -0.5])
    xs, ys = np.meshgrid(np.linspace(-2.2, 2.2, 200), np.linspace(-2.2, 2.2, 200))

    def loss(a, s):
        return 0.5 * (a[0] * (xs - s[0]) ** 2 + a[1] * (ys - s[1]) ** 2)

    hat = (a1 * s1 + a2 * s2) / (a1 + a2)
    avg = (s1 + s2) / 2
    L = lambda p: 0.5 * np.sum(a1 * (p - s1) ** 2) + 0.5 * np.sum(a2 * (p - s2) ** 2)  # noqa: E731
    fig, ax = plt.subplots(figsize=(5, 4.4))
    ax.contour(xs, ys, loss(a1, s1), levels=[0.1, 0.4, 1.0], colors="C0", linewidths=0.8)
    ax.contour(xs, ys, loss(a2, s2), levels=[0.1, 0.4, 1.0], colors="C1", linewidths=0.8,
               linestyles="dashed")
    ax.contour(xs, ys, loss(a1, s1) + loss(a2, s2), levels=12, colors="0.7", linewidths=0.5)
    ax.plot(*s1, "o", color="C0", label="expert 1 optimum")
    ax.plot(*s2, "o", color="C1", label="expert 2 optimum")
    ax.plot(*avg, "s", color="k", label=f"plain average: L = {L(avg):.3f}")
    ax.plot(*hat, "*", color="C3", ms=12, label=f"curvature-weighted: L = {L(hat):.3f}")
    ax.set_aspect("equal")
    ax.set_xlabel("θ₁")
    ax.set_ylabel("θ₂")
    ax.set_title(f"curvature ratio r = {r:.2g}", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    return fig


display(cl.views.figure_sliders(two_expert_picture,
                               log10_ratio=widgets.FloatSlider(value=1.0, min=0.0, max=2.0, step=0.1,
                                                               description="log10 r")))

# %% [markdown]
# **The power $p$ in OTA.** OTA weights expert $i$ by $v_i^{p}$ rather than $v_i$. If
# $v \propto h$ exactly (section 2), $p = 1$ is the exact minimizer above and $p = 0$ is
# the plain average; $p = 1/2$ (the paper's default) sits between them. With exact
# curvature, on the 1,000-coordinate problem:

# %%
powers = np.linspace(0, 1.6, 33)
losses = []
for p in powers:
    w1, w2 = h1 ** p, h2 ** p
    losses.append(total_loss((w1 * t1 + w2 * t2) / (w1 + w2)))
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(powers, losses)
ax.axvline(1.0, color="0.6", ls=":", lw=1)
ax.set_xlabel("power p of the curvature weight h**p")
ax.set_ylabel("L1 + L2 at the merge")
_ = ax.set_title(f"minimum at p = {powers[int(np.argmin(losses))]:.2f} (exact: 1)", fontsize=10)
assert abs(powers[int(np.argmin(losses))] - 1.0) < 1e-9

# %% [markdown]
# **Why $p = \tfrac12$ hedges.** A real $v$ is a *noisy* curvature estimate (a
# minibatch EMA, section 2; a different level per run). Multiply each expert's
# curvature by independent log-normal noise, $\hat h_{ij} = h_{ij} e^{s z_{ij}}$, and
# merge with $\hat h^p$: the noise enters the weights as $e^{p s z}$, so a smaller
# power damps it, at the price of following the true curvature less. The best $p$
# falls as the noise grows:

# %%
noise_rows = []
for s_noise in (0.0, 0.5, 1.0, 2.0, 3.0):
    g_noise = np.random.default_rng(7)
    e1 = h1 * np.exp(s_noise * g_noise.normal(size=d))
    e2 = h2 * np.exp(s_noise * g_noise.normal(size=d))
    ls = np.array([total_loss((e1 ** p * t1 + e2 ** p * t2) / (e1 ** p + e2 ** p)) for p in powers])
    noise_rows.append({"noise s (natural log)": s_noise, "best p": float(powers[int(np.argmin(ls))]),
                       "L at p=1": float(ls[np.isclose(powers, 1.0)][0]),
                       "L at p=0.5": float(ls[np.isclose(powers, 0.5)][0]),
                       "L at p=0": float(ls[0])})
noisy = pd.DataFrame(noise_rows).set_index("noise s (natural log)")
best_p = noisy["best p"].to_numpy()
assert best_p[0] == 1.0 and np.all(np.diff(best_p) <= 0) and best_p[-1] < 1.0
FACTS["best_p_by_noise"] = dict(zip(map(str, noisy.index), best_p.tolist()))
half_beats_one = noisy.index[noisy["L at p=0.5"] < noisy["L at p=1"]]
FACTS["p_half_beats_p1_from_noise"] = float(half_beats_one.min()) if len(half_beats_one) else None
display(Markdown(f"The best power goes from {best_p[0]:.2f} without noise to {best_p[-1]:.2f} at "
                 f"$s = {noisy.index[-1]:g}$; $p = 1/2$ beats $p = 1$ from $s = "
                 f"{FACTS['p_half_beats_p1_from_noise']:g}$ on (a factor $e^{{\\pm s}}$ of noise per entry)."
                 if len(half_beats_one) else "$p = 1/2$ never beats $p = 1$ over these noise levels."))
noisy.round(3)

# %% [markdown]
# ## 2. What Adam's second moment measures
#
# Adam keeps, per parameter, an exponential moving average of the squared gradient,
# $$v_t = \beta_2\, v_{t-1} + (1 - \beta_2)\, g_t^2, \qquad v_0 = 0,$$
# so $v_t$ averages $g^2$ over the last $\sim 1/(1-\beta_2)$ steps (1,000 for
# $\beta_2 = 0.999$), scaled down early in training by the bias factor $1 - \beta_2^t$.
#
# Why is $\mathbb{E}[g^2]$ a curvature estimate? Take linear regression with noise: per
# example $\ell = \tfrac12 (y - x^\top w)^2$, $y = x^\top w^\star + \sigma\varepsilon$, with
# independent Gaussian features of scales $s_j$. The Hessian is diagonal,
# $h_j = \mathbb{E}[x_j^2] = s_j^2$. A minibatch gradient of $B$ examples is
# $g_j = -\frac1B \sum_b x_{bj}(y_b - x_b^\top w)$. With $\delta = w - w^\star$ and the excess
# loss $\Delta L = \tfrac12 \sum_k h_k \delta_k^2$, Gaussian moments give exactly
# $$\mathbb{E}[g_j^2] = \underbrace{\frac{h_j\,(\sigma^2 + 2\Delta L)}{B}}_{\text{minibatch noise}}
#   + \underbrace{\Big(1 + \frac1B\Big) h_j^2 \delta_j^2}_{\text{mean gradient}} .$$
# At the optimum ($\delta = 0$) this is $\sigma^2 h_j / B$: proportional to the curvature
# (the *empirical Fisher*; section 5 compares it with the Fisher and the Hessian).
# Away from it, **every** coordinate's noise term carries the whole model's excess
# loss $2\Delta L$, not only the coordinates that are far from converged.
#
# The runs below use the update of `torch.optim.Adam` (betas 0.9/0.999, eps 1e-8)
# written out in a few lines so that several runs (one per row: noise, batch size,
# learning rate, clipping) advance together; the next cell checks it against
# `torch.optim.Adam` itself. The learning rate decays linearly to 2%, as in a
# fine-tuning run.

# %%
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def adam_runs(sigma=1.0, batch=32, lr=5e-2, clip=np.inf, steps=3000, dim=40, seed=0, every=20):
    """Adam on noisy linear regression, one run per row of the broadcast settings.

    Returns h (dim,), the final v (runs, dim), the floor sigma^2 h / B (runs, dim), the
    history of run 0 (step, v, the exact E[g^2] at the current weights, Delta L) and the
    final weights with w*."""
    sig, bs, lrs, clips = (np.atleast_1d(np.asarray(a, dtype=float)) for a in
                           np.broadcast_arrays(sigma, batch, lr, clip))
    runs = len(sig)
    g = torch.Generator().manual_seed(seed)
    scales = 10 ** torch.linspace(-1.0, 1.0, dim, dtype=torch.float64)  # h spans 4 decades
    h = scales ** 2
    w_star = torch.randn(dim, generator=g, dtype=torch.float64)
    bmax = int(bs.max())
    sig_t, lr_t, clip_t = (torch.tensor(a) for a in (sig, lrs, clips))
    wts = (torch.arange(bmax)[None, :] < torch.tensor(bs)[:, None]).double() / torch.tensor(bs)[:, None]
    w = torch.zeros(runs, dim, dtype=torch.float64)
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    history = []
    for t in range(1, steps + 1):
        # common random numbers: every run sees the same examples (the first B of them)
        x = torch.randn(bmax, dim, generator=g, dtype=torch.float64) * scales
        eps = torch.randn(bmax, generator=g, dtype=torch.float64)
        resid = (x @ w_star)[None, :] + sig_t[:, None] * eps[None, :] - w @ x.T   # (runs, bmax)
        grad = -(resid * wts) @ x                             # gradient of the batch-mean loss
        norm = grad.norm(dim=1, keepdim=True)                 # clip_grad_norm_, per run
        grad = grad * torch.clamp(clip_t[:, None] / (norm + 1e-6), max=1.0)
        m = BETA1 * m + (1 - BETA1) * grad
        v = BETA2 * v + (1 - BETA2) * grad ** 2
        step = lr_t[:, None] * max(0.02, 1 - (t - 1) / steps) / (1 - BETA1 ** t)
        w = w - step * m / (v.sqrt() / np.sqrt(1 - BETA2 ** t) + EPS)
        if t % every == 0 or t == 1 or t == 100:
            delta = w[0] - w_star
            dl = 0.5 * float((h * delta ** 2).sum())
            eg2 = h * (sig[0] ** 2 + 2 * dl) / bs[0] + (1 + 1 / bs[0]) * h ** 2 * delta ** 2
            history.append((t, v[0].clone().numpy(), eg2.numpy(), dl))
    floor = (sig_t[:, None] ** 2 * h[None, :] / torch.tensor(bs)[:, None]).numpy()
    return h.numpy(), v.numpy(), floor, history, (w.numpy(), w_star.numpy())


def adam_torch(sigma=1.0, batch=32, lr=5e-2, steps=300, dim=40, seed=0):
    """The same run (same draws) with torch.optim.Adam and autograd; returns the final v."""
    g = torch.Generator().manual_seed(seed)
    scales = 10 ** torch.linspace(-1.0, 1.0, dim, dtype=torch.float64)
    w_star = torch.randn(dim, generator=g, dtype=torch.float64)
    w = torch.zeros(1, dim, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr, betas=(BETA1, BETA2), eps=EPS)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.02, 1 - t / steps))
    for _ in range(steps):
        x = torch.randn(batch, dim, generator=g, dtype=torch.float64) * scales
        y = x @ w_star + sigma * torch.randn(batch, generator=g, dtype=torch.float64)
        opt.zero_grad()
        (0.5 * ((y - x @ w[0]) ** 2).mean()).backward()
        opt.step()
        schedule.step()
    return opt.state[w]["exp_avg_sq"].detach().numpy()


v_check = adam_runs(steps=300, clip=np.inf)[1]
v_torch = adam_torch(steps=300)
rel = float(np.max(np.abs(v_check - v_torch) / v_torch))
print(f"written-out Adam vs torch.optim.Adam, 300 steps: max relative difference of v = {rel:.1e}")
assert rel < 1e-8
FACTS["adam_vs_torch_rel"] = rel

# %% [markdown]
# The default run ($\sigma = 1$, $B = 32$, 5,000 steps): the final `exp_avg_sq` against
# the curvature, next to the floor $\sigma^2 h / B$ and the gradient's second moment
# measured directly at the final weights (500 fresh minibatches).

# %%
h, v_all, floor_all, history, (w_fin, w_star) = adam_runs(sigma=1.0, batch=32, steps=5000)
v, v_pred = v_all[0], floor_all[0]
g2 = history[-1][2]  # the exact E[g^2] at the final weights (the formula above)
# a Monte-Carlo check of the formula at the same weights: 2,000 fresh minibatches of 32
g_mc = torch.Generator().manual_seed(123)
x = torch.randn(2000, 32, len(h), generator=g_mc, dtype=torch.float64) * torch.tensor(np.sqrt(h))
y = x @ torch.tensor(w_star) + torch.randn(2000, 32, generator=g_mc, dtype=torch.float64)
g2_mc = (-(x * (y - x @ torch.tensor(w_fin[0]))[..., None]).mean(1)).pow(2).mean(0).numpy()
FACTS["eg2_formula_vs_mc_median_rel"] = float(np.median(np.abs(g2_mc / g2 - 1)))
assert FACTS["eg2_formula_vs_mc_median_rel"] < 0.1
slope = np.polyfit(np.log10(h), np.log10(v), 1)[0]
FACTS["adam_default_slope"] = float(slope)
FACTS["adam_default_median_ratio"] = float(np.median(v / v_pred))
print(f"log-log slope of v against h: {slope:.3f} (1 = v proportional to curvature)")
print(f"median v / (sigma^2 h / B) = {np.median(v / v_pred):.3f}; "
      f"median v / E[g^2] at the final weights = {np.median(v / g2):.3f}")

# %%
track = [0, len(h) // 2, len(h) - 1]
steps_seen = np.array([t for t, *_ in history])
vals = np.stack([hv for _, hv, _, _ in history])
eg2s = np.stack([e for _, _, e, _ in history])
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
ax = axes[0]
ax.loglog(h, v, "o", ms=4, label="Adam exp_avg_sq (final)")
ax.loglog(h, g2, "x", ms=4, label="E[g²] at the final weights")
ax.loglog(h, v_pred, "-", color="0.3", label="floor σ² h / B")
ax.set_xlabel("curvature h")
ax.set_ylabel("second moment")
ax.legend(fontsize=8)
ax.set_title(f"v tracks curvature: slope {slope:.2f}", fontsize=10)
ax = axes[1]
for k, j in enumerate(track):
    ax.loglog(steps_seen, vals[:, j], color=f"C{k}", label=f"v, h = {h[j]:.2g}")
    ax.loglog(steps_seen, eg2s[:, j], color=f"C{k}", ls="--", lw=0.8)
    ax.axhline(v_pred[j], color=f"C{k}", ls=":", lw=1)
ax.set_xlabel("step")
ax.set_ylabel("second moment")
ax.set_title("during training (solid: v; dashed: E[g²] now; dotted: floor)", fontsize=9)
_ = ax.legend(fontsize=8)

# %%
i100 = int(np.flatnonzero(steps_seen == 100)[0])
early = vals[i100] / v_pred                       # v at step 100 over its floor, per coordinate
dl1 = history[0][3]                               # Delta L after the first step
noise_share1 = (h * (1.0 + 2 * dl1) / 32) / eg2s[0]   # the noise term's share of E[g^2] at step 1
lag = np.median(vals / eg2s, axis=1)              # median v / E[g^2 now], over coordinates, per step
lag_first, lag_100, lag_final = float(lag[0]), float(lag[i100]), float(lag[-1])
above_from = int(steps_seen[int(np.argmax(lag > 1))])
FACTS.update(step100_over_floor_min=float(early.min()), step100_over_floor_max=float(early.max()),
             step100_over_floor_flattest=float(early[0]), step1_dL=float(dl1),
             step1_noise_share_flattest=float(noise_share1[0]),
             v_over_eg2_step1=lag_first, v_over_eg2_step100=lag_100, v_over_eg2_final=lag_final,
             v_above_eg2_from_step=above_from)
assert early.min() > 1.0                 # every coordinate, the flattest included, is above its floor
assert noise_share1[0] > 0.5             # for the flattest coordinate the early E[g^2] is noise, not mean gradient
assert lag_first < 0.01 and lag_100 > 1.0 and lag_final > 1.0
display(Markdown(
    f"At step 100 **every** coordinate's $v$ sits above its floor, by a factor {early.min():.1f} to "
    f"{early.max():.0f}; the flattest one by {early[0]:.1f}. The mean gradient does not explain that: after the "
    f"first step $2\\Delta L = {2 * dl1:.0f}$, so the noise term $h_j(\\sigma^2 + 2\\Delta L)/B$ inflates "
    f"every coordinate, and for the flattest it is {noise_share1[0]:.0%} of $\\mathbb{{E}}[g_j^2]$. The right "
    f"panel shows the moving average's lag: after one step the median $v / \\mathbb{{E}}[g^2]$ is "
    f"{lag_first:.4f} (the bias factor $1 - \\beta_2 = {1 - BETA2:.3f}$); the loss then falls within a few "
    f"dozen steps while $v$ keeps the early gradients, so from step {above_from} on $v$ is *above* the current "
    f"$\\mathbb{{E}}[g^2]$ (median {lag_100:.1f}× at step 100) and at the end it is still {lag_final:.2f}×."))

# %% [markdown]
# The paper uses the final $v$ raw (no bias correction), which is harmless after an
# epoch of fine-tuning ($\beta_2^t \approx 0$ once $t \gg 1000$);
# `curvlens.Moments.open(..., bias_correction=True)` applies it when the step is known.
#
# **Level and shape.** The shape of $v$ across coordinates (the slope against $h$)
# is robust. Its *level*, the factor $v / (\sigma^2 h / B)$, is not just $\sigma^2/B$:
# when the noise floor is low, the final $v$ is dominated by the memory of the
# unconverged phase. Move the sliders (noise, batch size, learning rate), and see
# the table after them for all settings at once.

# %%
def adam_picture(sigma=1.0, log2_batch=5, log10_lr=-1.3):
    batch, lr = 2 ** int(log2_batch), 10 ** log10_lr
    h, v, floor, _, _ = adam_runs(sigma=sigma, batch=batch, lr=lr, steps=3000)
    v, floor = v[0], floor[0]
    slope = np.polyfit(np.log10(h), np.log10(v), 1)[0]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.loglog(h, v, "o", ms=4, label="Adam exp_avg_sq")
    ax.loglog(h, floor, "-", color="0.3", label="σ² h / B")
    ax.set_xlabel("curvature h")
    ax.set_ylabel("v")
    ax.set_title(f"σ = {sigma:.2g}, B = {batch}, lr = {lr:.2g}: slope {slope:.2f}, "
                 f"v/(σ²h/B) = {np.min(v / floor):.2f} .. {np.max(v / floor):.2f}", fontsize=9)
    ax.legend(fontsize=8)
    return fig


display(cl.views.figure_sliders(
    adam_picture,
    sigma=widgets.FloatLogSlider(value=1.0, base=10, min=-1, max=1, step=0.1, description="noise σ"),
    log2_batch=widgets.IntSlider(value=5, min=0, max=8, description="log2 B"),
    log10_lr=widgets.FloatSlider(value=-1.3, min=-2, max=-0.7, step=0.1, description="log10 lr")))

# %% [markdown]
# Every setting of the sliders' ranges that matters, in one batch of runs (3,000
# steps unless stated; "bias-corrected" divides by $1 - \beta_2^t$; clipping is
# `clip_grad_norm_` at 1.0). `mean v` is the level a merge sees:

# %%
settings = pd.DataFrame(
    [dict(what="noise σ", sigma=s_, batch=32, lr=0.05, clip=np.inf) for s_ in (0.1, 0.3, 1.0, 3.0, 10.0)]
    + [dict(what="batch B", sigma=1.0, batch=b_, lr=0.05, clip=np.inf) for b_ in (1, 8, 128)]
    + [dict(what="learning rate", sigma=1.0, batch=32, lr=l_, clip=np.inf) for l_ in (0.01, 0.2)]
    + [dict(what="clip 1.0", sigma=1.0, batch=32, lr=0.05, clip=1.0)])
parts = []
for steps in (3000, 1000):
    sub = settings if steps == 3000 else settings.iloc[[2]]
    h_, v_, fl_, _, _ = adam_runs(sigma=sub["sigma"], batch=sub["batch"], lr=sub["lr"], clip=sub["clip"],
                                  steps=steps)
    ratio = v_ / fl_
    parts.append(sub.assign(
        steps=steps, what=sub["what"] if steps == 3000 else "run length",
        **{"mean v": v_.mean(1), "bias-corrected mean v": v_.mean(1) / (1 - BETA2 ** steps),
           "v/floor min": ratio.min(1), "v/floor median": np.median(ratio, 1), "v/floor max": ratio.max(1),
           "slope": [np.polyfit(np.log10(h_), np.log10(r), 1)[0] for r in v_]}))
levels = pd.concat(parts, ignore_index=True).drop(columns="clip")
sig01 = levels[(levels["what"] == "noise σ") & (levels["sigma"] == 0.1)].iloc[0]
sig1 = levels[(levels["what"] == "noise σ") & (levels["sigma"] == 1.0)].iloc[0]
sig10 = levels[(levels["what"] == "noise σ") & (levels["sigma"] == 10.0)].iloc[0]
FACTS.update(level_sigma01_min=float(sig01["v/floor min"]), level_sigma01_max=float(sig01["v/floor max"]),
             level_sigma1_median=float(sig1["v/floor median"]), level_sigma10_median=float(sig10["v/floor median"]),
             level_mean_v_spread=float(levels["mean v"].max() / levels["mean v"].min()),
             level_slope_min=float(levels["slope"].min()), level_slope_max=float(levels["slope"].max()))
assert sig01["v/floor min"] > 5 and abs(sig10["v/floor median"] - 1) < 0.2
display(Markdown(
    f"At $\\sigma = 0.1$ the final $v$ is {sig01['v/floor min']:.0f} to {sig01['v/floor max']:.0f} times "
    f"$\\sigma^2 h / B$: a memory of the unconverged early phase, not noise. At the default $\\sigma = 1$ the "
    f"median factor is {sig1['v/floor median']:.2f}, at $\\sigma = 10$ it is {sig10['v/floor median']:.2f}. "
    f"Across these settings the mean $v$ spans a factor {FACTS['level_mean_v_spread']:.0f}, while the slope "
    f"against $h$ stays between {levels['slope'].min():.2f} and {levels['slope'].max():.2f}. The shape is "
    "what FFG's *ranking within one expert* uses; a merge compares the *levels* of different experts "
    "(section 4)."))
levels.round(3)

# %% [markdown]
# ## 3. What Fast Fisher Grafting keeps
#
# Give one expert the task vector $\tau = \theta^\star - \theta_0$ and curvature $h$ (in
# practice $v$). Keeping only the entries in a mask $m$, $\theta = \theta_0 + m \odot \tau$,
# raises the expert's quadratic loss by exactly
# $$\Delta L(m) = \tfrac12 \sum_j h_j\, \tau_j^2\,(1 - m_j) ,$$
# a sum of independent per-entry costs $s_j = \tfrac12 h_j \tau_j^2$. So among all masks
# keeping $k$ entries, the one keeping the $k$ largest **saliencies** $h_j\tau_j^2$ is
# exactly optimal *for grafting that one expert*: that is FFG, with $v$ for $h$.
# Magnitude pruning keeps the largest $|\tau_j|$ instead, which is optimal only when
# the curvature is the same everywhere.
#
# How close magnitude comes depends on how $|\tau|$ and $h$ are related. We draw $h$
# over a number of decades and $\tau_j \sim \mathcal N(0, h_j^{-\alpha})$, so that the
# saliency is $h^{1-\alpha} z^2$ and the magnitude $h^{-\alpha/2} |z|$. Both increase with $h$
# when $\alpha < 0$ and both decrease when $\alpha > 1$: then the two criteria rank the
# entries alike *in expectation* (not exactly: the draw $z$ enters them with
# different weights). For $0 < \alpha < 1$ they pull in opposite directions:
# magnitude prefers the flat entries FFG drops. ($|\tau|$ and $h$ are anti-correlated
# for every $\alpha > 0$, but that alone does not make magnitude wrong: for $\alpha > 1$
# the flat entries are also the salient ones.) At $\alpha = 0$ magnitude is blind to
# the curvature.

# %%
def graft_curves(alpha=0.5, decades=4.0, n=20000, seed=1):
    g = np.random.default_rng(seed)
    h = 10 ** g.uniform(-decades / 2, decades / 2, n)
    tau = g.normal(0, 1, n) * h ** (-alpha / 2)
    cost = 0.5 * h * tau ** 2                  # the loss increase of reverting each entry
    dens = np.linspace(0.0, 1.0, 51)
    out = {}
    for name, score in [("FFG: h·τ²", h * tau ** 2), ("magnitude: |τ|", np.abs(tau)),
                        ("random", g.random(n))]:
        order = np.argsort(-score)
        kept_cost = np.concatenate([[0.0], np.cumsum(cost[order])])
        k = np.round(dens * n).astype(int)
        out[name] = 1.0 - kept_cost[k] / cost.sum()   # fraction of the full revert cost paid
    return dens, out, rank_corr(np.abs(tau), h)


rows = []
for alpha in (-1.0, -0.5, 0.0, 0.25, 0.5, 0.75, 1.0, 1.5):
    dens, curves, rho = graft_curves(alpha=alpha)
    assert all(np.all(curves["FFG: h·τ²"] <= c + 1e-12) for c in curves.values()), "FFG is optimal"
    i = int(np.argmin(np.abs(dens - 0.1)))
    rows.append({"α": alpha, "Spearman(|τ|, h)": rho, **{name: c[i] for name, c in curves.items()}})
alphas = pd.DataFrame(rows).set_index("α")
alphas["magnitude / FFG"] = alphas["magnitude: |τ|"] / alphas["FFG: h·τ²"]
worst_alpha = float(alphas["magnitude / FFG"].idxmax())
below_random = [a for a in alphas.index if alphas.loc[a, "magnitude: |τ|"] > alphas.loc[a, "random"]]
FACTS.update(graft_m1_ffg=float(alphas.loc[-1.0, "FFG: h·τ²"]), graft_m1_mag=float(alphas.loc[-1.0, "magnitude: |τ|"]),
             graft_worst_alpha=worst_alpha, graft_mag_worse_than_random_alphas=[float(a) for a in below_random],
             graft_spearman_by_alpha={str(a): float(r) for a, r in alphas["Spearman(|τ|, h)"].items()})
assert alphas.loc[-1.0, "magnitude: |τ|"] > alphas.loc[-1.0, "FFG: h·τ²"]      # close, not equal, at α = -1
assert 0.0 < worst_alpha < 1.0 and 0.5 in below_random
assert all((alphas.loc[a, "Spearman(|τ|, h)"] < 0) == (0 < a) for a in alphas.index if a != 0)
display(Markdown(
    f"Loss increase at density 0.1, as a fraction of reverting everything (4 decades of $h$). At "
    f"$\\alpha = -1$ magnitude pays {alphas.loc[-1.0, 'magnitude: |τ|']:.3f} against FFG's "
    f"{alphas.loc[-1.0, 'FFG: h·τ²']:.3f}: close, not equal. Magnitude is furthest from FFG at "
    f"$\\alpha = {worst_alpha:g}$, and worse than a random mask at $\\alpha \\in$ "
    f"{{{', '.join(f'{a:g}' for a in below_random)}}}. $|\\tau|$ and $h$ are anti-correlated exactly for "
    f"$\\alpha > 0$; magnitude *prefers the wrong entries* only while $0 < \\alpha < 1$."))
alphas.round(3)

# %%
def graft_picture(alpha=0.5, decades=4.0):
    dens, curves, rho = graft_curves(alpha=alpha, decades=decades)
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for name, c in curves.items():
        ax.plot(dens, c, label=name, ls="-" if "FFG" in name else "--" if "magnitude" in name else ":")
    ax.set_xlabel("density (fraction of τ kept)")
    ax.set_ylabel("loss increase / full revert cost")
    ax.set_title(f"α = {alpha:.2f}, h over {decades:g} decades: Spearman(|τ|, h) = {rho:+.2f}", fontsize=9)
    ax.legend(fontsize=8)
    return fig


display(cl.views.figure_sliders(graft_picture,
                               alpha=widgets.FloatSlider(value=0.5, min=-1.0, max=1.5, step=0.1, description="α"),
                               decades=widgets.FloatSlider(value=4.0, min=0.0, max=8.0, step=0.5,
                                                           description="decades of h")))

# %% [markdown]
# **Spread, not anti-correlation.** Notebook `03` measures the rank correlation of
# $|\tau|$ and $v$ on the demo zoo. Where it is weak ($\alpha$ near 0 in this toy), FFG's
# advantage over magnitude cannot come from anti-correlation; it comes from how
# widely the curvature is spread: with $\alpha = 0$ the two criteria coincide when $h$
# is constant, and the gap opens with the number of decades $h$ spans (the second
# slider):

# %%
spread_rows = []
for decades in (0.0, 1.0, 2.0, 4.0, 8.0):
    dens, curves, rho = graft_curves(alpha=0.0, decades=decades)
    i = int(np.argmin(np.abs(dens - 0.1)))
    spread_rows.append({"decades of h": decades, "Spearman(|τ|, h)": rho, "FFG": curves["FFG: h·τ²"][i],
                        "magnitude": curves["magnitude: |τ|"][i], "random": curves["random"][i]})
spread = pd.DataFrame(spread_rows).set_index("decades of h")
gap = (spread["magnitude"] - spread["FFG"]).to_numpy()
assert abs(gap[0]) < 1e-12 and np.all(np.diff(gap) > 0) and (spread["Spearman(|τ|, h)"].fillna(0).abs() < 0.05).all()
FACTS["spread_gap_by_decades"] = dict(zip(map(str, spread.index), gap.tolist()))
display(Markdown(f"At $\\alpha = 0$ (no correlation: |Spearman| < 0.05 in every row; undefined for constant $h$) the extra revert cost "
                 f"magnitude pays at density 0.1 grows from {gap[0]:.3f} with constant curvature to "
                 f"{gap[-1]:.3f} over {spread.index[-1]:g} decades."))
spread.round(3)

# %% [markdown]
# ## 4. From the toy to a real merge
#
# OTA + FFG merges $N$ experts as
# $$\theta = \theta_0 + \frac{\sum_i W_i \tau_i}{\sum_i W_i}, \qquad
#   W_i = (v_i^{p} + \epsilon)\,[v_i \tau_i^2 \ge t_i] ,$$
# section 1's curvature-weighted average (with $v$ from section 2 and power $p$),
# restricted to the entries each expert's FFG mask keeps. It is tempting to read this
# as "the optimal merge, restricted to what each expert needs". It is not, and the
# toy shows why.
#
# **What the saliency prices, and what a merge pays.** FFG's saliency
# $\tfrac12 v_{ij}\tau_{ij}^2$ is the cost to expert $i$ of moving entry $j$ back to
# $\theta_0$. In a merge, an entry that expert $i$ masks but expert $k$ keeps does not
# go back to $\theta_0$: it goes to $\theta_0 + \tau_{kj}$, and expert $i$ pays
# $\tfrac12 v_{ij}(\tau_{kj} - \tau_{ij})^2$. (Where every expert masks it, it does go
# back to $\theta_0$, and the saliency is the right price.) And for a diagonal quadratic
# with $v \propto h$ and $p = 1$, section 1 says the unmasked curvature-weighted
# average is already the exact minimizer of $\sum_i L_i$: any mask can only raise it.
#
# Two experts on section 1's 1,000 coordinates (base $\theta_0 = 0$, so $\tau_i = \theta^\star_i$),
# each with its own FFG mask at a common density, merged with weights $h_i^p$
# (entries both experts mask fall back to the base):

# %%
def ffg_mask(h, tau, density):
    k = int(round(density * len(tau)))
    m = np.zeros(len(tau))
    m[np.argsort(-(h * tau ** 2))[:k]] = 1.0
    return m


def toy_merge(w1, w2, m1=1.0, m2=1.0):
    """theta_0 + sum_i W_i tau_i / sum_i W_i on the toy (theta_0 = 0), base where both are masked."""
    W1, W2 = w1 * m1, w2 * m2
    tot = W1 + W2
    return np.where(tot > 0, (W1 * t1 + W2 * t2) / np.where(tot > 0, tot, 1.0), 0.0)


bridge_densities = (0.1, 0.3, 0.5)
rows = []
for p in (1.0, 0.5, 0.0):
    w1, w2 = h1 ** p, h2 ** p
    row = {"p": p, "no mask": total_loss(toy_merge(w1, w2))}
    for dn in bridge_densities:
        row[f"FFG d={dn}"] = total_loss(toy_merge(w1, w2, ffg_mask(h1, t1, dn), ffg_mask(h2, t2, dn)))
    rows.append(row)
bridge = pd.DataFrame(rows).set_index("p")
mask_cols = [f"FFG d={dn}" for dn in bridge_densities]
hurts_p1 = bool((bridge.loc[1.0, mask_cols] > bridge.loc[1.0, "no mask"]).all())
helps_p0 = [c for c in mask_cols if bridge.loc[0.0, c] < bridge.loc[0.0, "no mask"]]
FACTS.update(bridge_p1_nomask=float(bridge.loc[1.0, "no mask"]),
             bridge_p1_masked={c: float(bridge.loc[1.0, c]) for c in mask_cols},
             bridge_p0_nomask=float(bridge.loc[0.0, "no mask"]),
             bridge_p0_masked={c: float(bridge.loc[0.0, c]) for c in mask_cols},
             bridge_masks_hurt_p1=hurts_p1, bridge_masks_help_p0=helps_p0)
assert hurts_p1 and helps_p0

# the merge's actual cost to expert 1 on the entries only expert 2 keeps, against the saliency's price
m1, m2 = ffg_mask(h1, t1, 0.3), ffg_mask(h2, t2, 0.3)
only2 = (m1 == 0) & (m2 == 1)
revert_price = 0.5 * np.sum(h1[only2] * t1[only2] ** 2)
merge_cost = 0.5 * np.sum(h1[only2] * (t2[only2] - t1[only2]) ** 2)
merged = toy_merge(h1, h2, m1, m2)
assert np.isclose(0.5 * np.sum(h1[only2] * (merged[only2] - t1[only2]) ** 2), merge_cost)
FACTS.update(bridge_only2_share=float(only2.mean()), bridge_merge_over_revert=float(merge_cost / revert_price))
display(Markdown(
    "With exact curvature weights ($p = 1$) the FFG masks **raise** $L_1 + L_2$ at every density: "
    + ", ".join(f"{bridge.loc[1.0, c]:.0f} at {c.removeprefix('FFG ')}" for c in mask_cols)
    + f", against {bridge.loc[1.0, 'no mask']:.0f} without masks. With a plain average of the kept edits "
    f"($p = 0$, the 'linear combine') the masks **lower** it where the table shows it "
    f"({', '.join(c.removeprefix('FFG ') for c in helps_p0)}; {bridge.loc[0.0, 'no mask']:.0f} without masks). "
    f"At density 0.3, {only2.mean():.0%} of the entries are kept by expert 2 only; on them the merge costs "
    f"expert 1 {merge_cost / revert_price:.1f}× what its saliency priced: expert 1 dropped them *because* "
    "$h_1\\tau_1^2$ is small there, and expert 2's edit, which the merge puts in their place, is unrelated "
    "to that."))
bridge.round(1)

# %% [markdown]
# **When masking helps a merge, and when it hurts.** In the toy the masks act as a
# crude curvature weighting: an entry an expert drops is one where it is flat or
# barely moved, so the other expert takes it over. That can only help where the
# combine weights do *not* already price the curvature: above, it helped the plain
# average ($p = 0$) and hurt the exact curvature weights ($p = 1$). A real merge is in
# between and has
# what the toy lacks: losses that are not quadratic (large edits of two experts do
# not add their costs independently), curvature that is not diagonal (an entry's
# cost depends on the others, section 5), and a $v$ that is a noisy, mis-leveled
# estimate of $h$. Those are the interference FFG's masks can remove; whether they
# do on the zoo is measured, not assumed, in notebook `05` (OTA with and without
# masks, and the plain average with and without them). Move $p$ and the density:

# %%
def bridge_picture(p=1.0, density=0.3):
    w1, w2 = h1 ** p, h2 ** p
    dd = np.linspace(0.05, 1.0, 20)
    ls = [total_loss(toy_merge(w1, w2, ffg_mask(h1, t1, x), ffg_mask(h2, t2, x))) for x in dd]
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    ax.plot(dd, ls, label="OTA + FFG masks")
    ax.axhline(total_loss(toy_merge(w1, w2)), color="0.4", ls="--", label="no masks")
    ax.axhline(total_loss(closed_form), color="C3", ls=":", label="optimum (p = 1)")
    ax.axvline(density, color="0.7", lw=0.8)
    ax.set_xlabel("FFG density (each expert)")
    ax.set_ylabel("L1 + L2 at the merge")
    ax.set_title(f"p = {p:.2f}", fontsize=10)
    ax.legend(fontsize=8)
    return fig


display(cl.views.figure_sliders(bridge_picture,
                               p=widgets.FloatSlider(value=1.0, min=0.0, max=1.5, step=0.1, description="power p"),
                               density=widgets.FloatSlider(value=0.3, min=0.05, max=1.0, step=0.05,
                                                           description="density")))

# %% [markdown]
# **The level of $v$ is a merge issue.** OTA compares $v_1^p$ with $v_2^p$ entry by entry,
# and with `normalise: none` (the default, as notebook `02` says) it uses the raw
# levels. Section 2 showed how far the level of $v$ moves with the noise, the batch
# size, the learning rate, the run length, bias correction and clipping, for the
# *same* curvature. Give expert 1's estimate the level $c$, $v_1 = c\,h_1$, $v_2 = h_2$, and
# merge with `normalise: none` or `global` (each expert's $v^p$ divided by its mean
# over the tensor):

# %%
rows = []
for c in (1.0, 1 / 32, 32.0, 1000.0):
    for p in (1.0, 0.5):
        w1, w2 = (c * h1) ** p, h2 ** p
        rows.append({"level c of v1": c, "p": p, "normalise none": total_loss(toy_merge(w1, w2)),
                     "normalise global": total_loss(toy_merge(w1 / w1.mean(), w2 / w2.mean()))})
level = pd.DataFrame(rows).set_index(["level c of v1", "p"])
none_c32 = float(level.loc[(32.0, 1.0), "normalise none"])
glob_c32 = float(level.loc[(32.0, 1.0), "normalise global"])
FACTS.update(level_merge_c1=float(level.loc[(1.0, 1.0), "normalise none"]), level_merge_c32_none=none_c32,
             level_merge_c32_global=glob_c32)
assert none_c32 > glob_c32 and all(np.isclose(level.xs(c, level="level c of v1")["normalise global"],
                                              level.xs(1.0, level="level c of v1")["normalise global"]).all()
                                   for c in (1 / 32, 32.0, 1000.0))
display(Markdown(
    f"A level factor of 32 (e.g. batch 1 against batch 32) raises $L_1 + L_2$ of the $p = 1$ merge from "
    f"{level.loc[(1.0, 1.0), 'normalise none']:.0f} to {none_c32:.0f} with `normalise: none`; `global` "
    f"gives {glob_c32:.0f} whatever the level. Normalising is not free either: it assumes both experts' "
    "curvatures have the same mean, which two real experts need not have. Notebook `05` shows the level of "
    "$v$ across the zoo's experts and the merge with both settings."))
level.round(1)

# %% [markdown]
# ## 5. Caveats a lecture needs
#
# **Empirical Fisher, Fisher, Hessian.** For the regression above, per example: the
# Hessian of the loss is $H = \mathbb{E}[x x^\top]$ (diagonal $h$); the Fisher of the Gaussian
# model $y \sim \mathcal N(x^\top w, \sigma^2)$ is $H / \sigma^2$, so the Fisher equals the
# Hessian of the negative log-likelihood *for any $w$*; the *empirical* Fisher, the
# mean squared per-example gradient (what Adam's $v$ estimates, times $1/B$ plus the
# squared mean gradient), is $\mathbb{E}[x_j^2 r^2] = h_j(\sigma^2 + 2\Delta L) + 2h_j^2\delta_j^2$.
# It is proportional to the Hessian only at the optimum *of a well-specified model*.
# Away from the optimum the $h^2\delta^2$ term bends it; if the noise depends on the
# input (misspecification) it is off even at the optimum. Per coordinate, the
# empirical Fisher divided by $\sigma^2 h$:

# %%
g_ef = np.random.default_rng(11)
dim_ef = 40
h_ef = 10 ** np.linspace(-2.0, 2.0, dim_ef)
w_st = g_ef.normal(size=dim_ef)
x_ef = g_ef.normal(size=(100_000, dim_ef)) * np.sqrt(h_ef)


def emp_fisher(w, noise_sd):
    r = x_ef @ (w_st - w) + noise_sd * g_ef.normal(size=len(x_ef))
    return np.mean(x_ef ** 2 * r[:, None] ** 2, axis=0)


cases = {"at the optimum": emp_fisher(w_st, 1.0),
         "at the start (w = 0)": emp_fisher(np.zeros(dim_ef), 1.0),
         "at the optimum, misspecified": emp_fisher(w_st, np.sqrt(1 + x_ef[:, -1] ** 2 / h_ef[-1]))}
ef = pd.DataFrame({k: {"EF/(σ²h) min": (f / h_ef).min(), "EF/(σ²h) max": (f / h_ef).max(),
                       "slope vs h": np.polyfit(np.log10(h_ef), np.log10(f), 1)[0]} for k, f in cases.items()}).T
ef["max/min"] = ef["EF/(σ²h) max"] / ef["EF/(σ²h) min"]
opt_spread = ef.loc["at the optimum", "max/min"]
start = ef.loc["at the start (w = 0)"]
mis = cases["at the optimum, misspecified"] / h_ef
FACTS.update(ef_opt_spread=float(opt_spread), ef_start_spread=float(start["max/min"]),
             ef_start_level=float(start["EF/(σ²h) min"]), ef_mis_last_over_median=float(mis[-1] / np.median(mis[:-1])))
assert opt_spread < 1.1 and start["max/min"] > opt_spread and start["EF/(σ²h) min"] > 10
assert mis[-1] / np.median(mis[:-1]) > 1.5
display(Markdown(
    f"At the optimum the ratio is flat (max/min {opt_spread:.2f}, sampling error only). At the start its level "
    f"is {start['EF/(σ²h) min']:.0f} to {start['EF/(σ²h) max']:.0f} (the $2\\Delta L$ term) and its shape is bent "
    f"by a factor {start['max/min']:.2f} (the $h^2\\delta^2$ term). With input-dependent noise on the sharpest "
    f"feature, that coordinate's empirical Fisher is {mis[-1] / np.median(mis[:-1]):.1f}× what its curvature "
    "says, at the optimum."))
ef.round(3)

# %% [markdown]
# **The diagonal assumption.** Everything above treats each coordinate on its own. If
# the experts' Hessians have off-diagonal terms, the optimal merge is
# $(H_1 + H_2)^{-1}(H_1\theta^\star_1 + H_2\theta^\star_2)$ and the diagonal (Fisher/OTA)
# weights only approximate it. Rotate each expert's curvature by a random rotation
# of growing angle (50 coordinates), keep the diagonal of $H_i$ as the merge weight:

# %%
g_rot = torch.Generator().manual_seed(3)
n_rot = 50
D1 = torch.tensor(10 ** np.random.default_rng(3).uniform(-2, 2, n_rot))
D2 = torch.tensor(10 ** np.random.default_rng(4).uniform(-2, 2, n_rot))
s1, s2 = (torch.randn(n_rot, generator=g_rot, dtype=torch.float64) for _ in range(2))
A1, A2 = (torch.randn(n_rot, n_rot, generator=g_rot, dtype=torch.float64) for _ in range(2))
rows = []
for angle in (0.0, 0.1, 0.3, 1.0, 3.0):
    R1, R2 = (torch.linalg.matrix_exp(angle * (A - A.T) / torch.linalg.matrix_norm(A - A.T, 2)) for A in (A1, A2))
    H1, H2 = R1 @ torch.diag(D1) @ R1.T, R2 @ torch.diag(D2) @ R2.T
    Lq = lambda th: float(0.5 * (th - s1) @ H1 @ (th - s1) + 0.5 * (th - s2) @ H2 @ (th - s2))  # noqa: E731
    best = torch.linalg.solve(H1 + H2, H1 @ s1 + H2 @ s2)
    a, b = torch.diagonal(H1), torch.diagonal(H2)
    rows.append({"angle": angle,
                 "off-diagonal share of H1": float(torch.linalg.norm(H1 - torch.diag(a)) / torch.linalg.norm(H1)),
                 "L optimum": Lq(best), "L diagonal weights": Lq((a * s1 + b * s2) / (a + b)),
                 "L plain average": Lq((s1 + s2) / 2)})
diag = pd.DataFrame(rows).set_index("angle")
diag["diagonal's share of the gain"] = ((diag["L plain average"] - diag["L diagonal weights"])
                                        / (diag["L plain average"] - diag["L optimum"]))
share = diag["diagonal's share of the gain"].to_numpy()
FACTS["diag_share_of_gain"] = dict(zip(map(str, diag.index), share.tolist()))
assert np.isclose(share[0], 1.0) and share[-1] < 0.5 * share[0]
display(Markdown(
    f"Without rotation the diagonal weights capture all of the gain over plain averaging; with the largest "
    f"rotation (off-diagonal share {diag['off-diagonal share of H1'].iloc[-1]:.2f}) they capture "
    f"{share[-1]:.0%} of it" + (" (worse than plain averaging)" if share[-1] < 0 else "")
    + ". Adam's $v$ carries no off-diagonal information at all."))
diag.round(3)

# %% [markdown]
# **Error bars on small evaluation sets.** An accuracy measured on $n$ examples has a
# standard error $\sqrt{a(1-a)/n}$; the difference of two merges scored on the same
# examples has a smaller (paired) one, but not zero. The demo zoo's evaluation sets
# are small (notebooks `03` and `05` print their sizes and the resulting noise
# scale), so differences of a few points between merges can be noise. At accuracy
# 0.5:

# %%
se = pd.DataFrame({"n": [25, 50, 100, 200, 1000]})
se["standard error"] = np.sqrt(0.25 / se["n"])
se["95% interval ±"] = 1.96 * se["standard error"]
FACTS["se_n50"] = float(se.loc[se["n"] == 50, "standard error"].iloc[0])
se.set_index("n").round(3)

# %% [markdown]
# ## 6. Which of the paper's claims this notebook checks
#
# None directly: this notebook uses no zoo, only toys whose answers are known. The
# paper's claims are checked on the zoo's numbers in notebooks `02` (curvature
# overlap), `03` (FFG against magnitude, mask structure) and `05` (merges).
#
# ## 7. Exercises
#
# **Exercise 1 (overlap is not the gain).** Two experts share the curvature
# pattern, $h_2 = c\,h_1$, and keep the optima of section 1. (a) Show that the excess
# loss of plain averaging is $\sum_j (\theta^\star_{1j} - \theta^\star_{2j})^2 h_{1j}
# (c - 1)^2 / (8 (1 + c))$. (b) For which $c$ does plain averaging pay twice the
# excess it pays at $c = 2$? (c) What does `normalise: global` do to this excess?
#
# *Solution.* (a) Put $h_2 = c h_1$ in the excess of section 1:
# $(h_1 - c h_1)^2 / (8 (h_1 + c h_1)) = h_1 (c - 1)^2 / (8 (1 + c))$ per coordinate.
# (b) The excess is $K f(c)$ with $f(c) = (c - 1)^2 / (1 + c)$, increasing for $c > 1$:
# solve $f(c) = 2 f(2) = 2/3$ numerically. (c) Dividing each expert's weights by
# their mean makes both weights $h_1 / \bar h_1$: the merge becomes the plain
# average and pays the full excess of (a). Here the level difference *is* the
# information the optimal merge needs, and normalising removes it. Checked:

# %%
K = float(np.sum((t1 - t2) ** 2 * h1)) / 8


def f_c(c):
    return (c - 1) ** 2 / (1 + c)


excess = {c: float(np.sum((t1 - t2) ** 2 * (h1 - c * h1) ** 2 / (8 * (h1 + c * h1)))) for c in (2.0, 5.0)}
assert all(np.isclose(excess[c], K * f_c(c), rtol=1e-12) for c in excess)
lo, hi = 2.0, 50.0                      # bisection for f(c) = 2 f(2) on c > 2
for _ in range(80):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if f_c(mid) < 2 * f_c(2.0) else (lo, mid)
c_double = (lo + hi) / 2
normalised = (h1 / h1.mean() * t1 + (5 * h1) / (5 * h1).mean() * t2) / (h1 / h1.mean() + (5 * h1) / (5 * h1).mean())
assert np.allclose(normalised, (t1 + t2) / 2)
FACTS.update(ex1_K=K, ex1_excess=excess, ex1_c_double=c_double)
display(Markdown(f"(a) holds to machine precision at $c = 2$ and $c = 5$; (b) $c = {c_double:.3f}$ "
                 f"($f(c) = {f_c(c_double):.4f}$ against $2 f(2) = {2 * f_c(2.0):.4f}$); (c) with `normalise: global` "
                 "the merge of $h_1$ and $5 h_1$ is exactly the plain average."))

# %% [markdown]
# **Exercise 2 (how many evaluation items?).** Two merges score about 0.80 and 0.85.
# (a) With independent evaluation sets of $n$ items each, how large must $n$ be for
# the difference to be two standard errors? (b) The zoo's `facts` capability has 12
# items: what is the smallest difference between two accuracies on it that is two
# standard errors at accuracy 0.5?
#
# *Solution.* (a) The difference of two independent accuracies has variance
# $a_1(1-a_1)/n + a_2(1-a_2)/n$; set $2\sqrt{\cdot} = 0.05$ and solve for $n$. (b) At
# $a = 0.5$ on both, $2\sqrt{2 \cdot 0.25 / 12}$. (Scored on the *same* items, a paired
# comparison does better; notebook 05 uses the unpaired scale as a conservative one.)

# %%
var_sum = 0.80 * 0.20 + 0.85 * 0.15
n_needed = int(np.ceil(var_sum / (0.05 / 2) ** 2))
facts_gap = 2 * np.sqrt(2 * 0.25 / 12)
assert 2 * np.sqrt(var_sum / n_needed) <= 0.05 < 2 * np.sqrt(var_sum / (n_needed - 1))
FACTS.update(ex2_n_needed=n_needed, ex2_facts_gap=float(facts_gap))
display(Markdown(f"(a) $n = {n_needed}$ items per merge; (b) {facts_gap:.2f}: on 12 items only a difference of "
                 f"about {facts_gap:.0%} of the scale means anything."))

# %% [markdown]
# **Exercise 3 (the power p under noise).** Section 1 found the best power $p$ falling
# as the noise on the curvature grows. (a) Explain why $p = 0$ (the plain average)
# is never the best choice at $s = 3$ on that problem, though it ignores the noise
# completely. (b) Compute the loss of $p = 1/2$ relative to the best $p$ at each noise
# level: how much does the paper's default give away?
#
# *Solution.* (a) At $p = 0$ the weights ignore the true curvature as well as the
# noise; a small positive $p$ still follows the true curvature (which spans four
# decades) more than it amplifies the noise $e^{p s z}$. (b) From the table of
# section 1:

# %%
regret = (noisy["L at p=0.5"] / noisy.apply(lambda r: min(r["L at p=0"], r["L at p=0.5"], r["L at p=1"]), axis=1)
          ).rename("L(p=1/2) / best of p in {0, 1/2, 1}")
best_at_3 = noisy.loc[3.0, "best p"]
assert best_at_3 > 0 and noisy.loc[3.0, "L at p=0"] > noisy.loc[3.0, ["L at p=0.5", "L at p=1"]].min()
safe = bool(regret.max() < 1.5)
FACTS.update(ex3_best_p_at_s3=float(best_at_3), ex3_regret={str(k): float(v) for k, v in regret.items()},
             ex3_safe_default=safe)
display(Markdown(f"(a) at $s = 3$ the best power is {best_at_3:.2f} and $p = 0$ loses to it; (b) $p = 1/2$ costs "
                 + ", ".join(f"{x:.2f}× at $s = {s_:g}$" for s_, x in regret.items())
                 + " the best of the three powers: "
                 + (f"never more than {regret.max():.2f}×, which is why it is a safe default when the noise is unknown."
                    if safe else f"up to {regret.max():.2f}× at one noise level, so it is not a safe default here.")))
regret.to_frame().round(3)

# %% [markdown]
# ## What this shows

# %%
share = FACTS["diag_share_of_gain"]
last_share = list(share.values())[-1]
worst_a = FACTS["graft_worst_alpha"]
rho_worst = FACTS["graft_spearman_by_alpha"][str(worst_a)]
display(Markdown(
    f"On problems whose answers are known: the curvature-weighted average is the optimal merge of diagonal "
    f"quadratics (the excess of plain averaging matches its formula to a relative error of "
    f"{FACTS['excess_formula_rel_err']:.1g}), and a "
    f"perfect overlap of curvature patterns still leaves plain averaging {FACTS['scaled_copy_excess_rel_c5']:.0%} "
    f"above the optimum when the levels differ 5×. Adam's $v$ follows the curvature with slope "
    f"{FACTS['adam_default_slope']:.2f} on a log-log scale at the end of a run, but its level spans a factor "
    f"{FACTS['level_mean_v_spread']:.0f} across runs of the same problem. FFG is the optimal graft of one expert "
    f"and magnitude pruning falls furthest behind it at α = {worst_a:g}, where Spearman$(|\\tau|, h)$ = "
    f"{rho_worst:+.2f} (magnitude is worse than a random mask at α ∈ {FACTS['graft_mag_worse_than_random_alphas']}); "
    f"but masking a merge is not "
    f"the optimal merge: with exact curvature weights the masks raised the loss at every density "
    f"({FACTS['bridge_p1_nomask']:.0f} without masks, {min(FACTS['bridge_p1_masked'].values()):.0f} or more with). "
    f"The best power $p$ falls from {list(FACTS['best_p_by_noise'].values())[0]:.2f} to "
    f"{list(FACTS['best_p_by_noise'].values())[-1]:.2f} as the noise on $v$ grows, and diagonal weights keep "
    f"{last_share:.0%} of the gain once the curvature is rotated far from the axes"
    + (" (they do worse than plain averaging there)" if last_share < 0 else "") + ". On the zoo, "
    "notebooks 02-05 measure which of these effects are large enough to see."))
