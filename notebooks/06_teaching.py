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
# # Curvature merging from first principles
#
# Why should a merge weight each expert's parameters by curvature, why is Adam's
# second moment a usable curvature estimate, and why does Fast Fisher Grafting keep
# the entries it keeps? This notebook answers all three on small quadratic problems
# whose answers are known in closed form, with numpy and torch only (no zoo, no
# checkpoints): every claim is checked numerically against the formula, and sliders
# let you change the curvature ratio and the noise and watch the answers move.

# %% tags=["parameters"]
QUICK = True      # unused here (no zoo is needed); kept for the common notebook interface
DEVICE = "auto"   # unused here

# %%
# %matplotlib inline
import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import display

rng = np.random.default_rng(0)
torch.manual_seed(0)

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
# It vanishes when the curvatures agree, and grows with the curvature disagreement
# and with the distance between the experts: the reason curvature overlap (notebook
# `02`) decides how much curvature weighting can gain over linear merging.
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
    plt.show()


display(widgets.interactive(two_expert_picture,
                            log10_ratio=widgets.FloatSlider(value=1.0, min=0.0, max=2.0, step=0.1,
                                                            description="log10 r")))

# %% [markdown]
# **The power $p$ in OTA.** OTA weights expert $i$ by $v_i^{p}$ rather than $v_i$. If
# $v \propto h$ (section 2), $p = 1$ is the exact minimizer above and $p = 0$ is the
# plain average; $p = 1/2$ (the paper's default) sits between them, hedging against
# noisy or miscalibrated curvature estimates. On the 1,000-coordinate problem:

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

# %% [markdown]
# ## 2. What Adam's second moment measures
#
# Adam keeps, per parameter, an exponential moving average of the squared gradient,
# $$v_t = \beta_2\, v_{t-1} + (1 - \beta_2)\, g_t^2, \qquad v_0 = 0,$$
# so $v_t$ estimates $\mathbb{E}[g^2]$ over the last $\sim 1/(1-\beta_2)$ steps (1,000 for
# $\beta_2 = 0.999$), scaled down early in training by the bias factor $1 - \beta_2^t$.
#
# Why is $\mathbb{E}[g^2]$ a curvature estimate? Take linear regression with noise: per
# example $\ell = \tfrac12 (y - x^\top w)^2$, $y = x^\top w^\star + \sigma\varepsilon$, with
# independent features of scales $s_j$. The Hessian is diagonal, $h_j = \mathbb{E}[x_j^2] = s_j^2$.
# A minibatch gradient of $B$ examples is $g_j = -\frac1B \sum_b x_{bj}(y_b - x_b^\top w)$, and
# at the optimum ($w = w^\star$)
# $$\mathbb{E}[g_j^2] = \frac{\sigma^2}{B}\, \mathbb{E}[x_j^2] = \frac{\sigma^2}{B}\, h_j .$$
# The gradient's second moment is proportional to the curvature: this is the
# *empirical Fisher*, equal to the Hessian (up to the noise scale) for a
# log-likelihood loss at its optimum. Away from the optimum $\mathbb{E}[g_j^2]$ also
# contains the squared mean gradient $h_j^2 (w_j - w^\star_j)^2$, which Adam's own
# convergence makes small.
#
# Run real `torch.optim.Adam` (with a learning rate decaying linearly, as in a
# fine-tuning run) and compare its final `exp_avg_sq` with $\sigma^2 h_j / B$ and with
# the gradient's second moment measured directly at the final weights:

# %%
def adam_on_regression(sigma=1.0, batch=32, steps=5000, dim=40, lr=5e-2, seed=0):
    """Adam on noisy linear regression, learning rate decaying linearly to 2% (as a
    fine-tuning schedule); returns h, the final v, the predicted v, the measured E[g^2]
    and the history of v for three coordinates."""
    g = torch.Generator().manual_seed(seed)
    scales = 10 ** torch.linspace(-1.0, 1.0, dim, dtype=torch.float64)  # h spans 4 decades
    w_star = torch.randn(dim, generator=g, dtype=torch.float64)
    w = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr, betas=(0.9, 0.999), eps=1e-8)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.02, 1 - t / steps))
    track = [0, dim // 2, dim - 1]
    history = []
    for t in range(steps):
        x = torch.randn(batch, dim, generator=g, dtype=torch.float64) * scales
        y = x @ w_star + sigma * torch.randn(batch, generator=g, dtype=torch.float64)
        opt.zero_grad()
        loss = 0.5 * ((y - x @ w) ** 2).mean()
        loss.backward()
        opt.step()
        schedule.step()
        if t % 20 == 0:
            history.append((t + 1, opt.state[w]["exp_avg_sq"][track].clone()))
    v = opt.state[w]["exp_avg_sq"].detach().clone()
    h = scales ** 2
    # the gradient's second moment measured directly at the final w (fresh minibatches)
    with torch.no_grad():
        gs = []
        for _ in range(500):
            x = torch.randn(batch, dim, generator=g, dtype=torch.float64) * scales
            y = x @ w_star + sigma * torch.randn(batch, generator=g, dtype=torch.float64)
            gs.append(-(x * (y - x @ w)[:, None]).mean(0))
        g2 = torch.stack(gs).pow(2).mean(0)
    return h.numpy(), v.numpy(), (sigma ** 2 * h / batch).numpy(), g2.numpy(), history, track


h, v, v_pred, g2, history, track = adam_on_regression()
slope = np.polyfit(np.log10(h), np.log10(v), 1)[0]
print(f"log-log slope of v against h: {slope:.3f} (1 = v proportional to curvature)")
print(f"median v / (sigma^2 h / B) = {np.median(v / v_pred):.3f}; "
      f"median v / measured E[g^2] = {np.median(v / g2):.3f}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), constrained_layout=True)
ax = axes[0]
ax.loglog(h, v, "o", ms=4, label="Adam exp_avg_sq (final)")
ax.loglog(h, g2, "x", ms=4, label="measured E[g²]")
ax.loglog(h, v_pred, "-", color="0.3", label="σ² h / B")
ax.set_xlabel("curvature h")
ax.set_ylabel("second moment")
ax.legend(fontsize=8)
ax.set_title(f"v tracks curvature: slope {slope:.2f}", fontsize=10)
ax = axes[1]
steps_seen = np.array([t for t, _ in history])
vals = np.stack([x.numpy() for _, x in history])
for k, j in enumerate(track):
    ax.loglog(steps_seen, vals[:, k], color=f"C{k}", label=f"h = {h[j]:.2g}")
    ax.axhline(v_pred[j], color=f"C{k}", ls=":", lw=1)
    ax.loglog(steps_seen, v_pred[j] * (1 - 0.999 ** steps_seen), color=f"C{k}", ls="--", lw=0.8, alpha=0.6)
ax.set_xlabel("step")
ax.set_ylabel("exp_avg_sq")
ax.set_title("during training (dotted: σ²h/B; dashed: times 1 - β₂ᵗ)", fontsize=9)
_ = ax.legend(fontsize=8)

# %% [markdown]
# Early on, $v$ is large where the mean gradient $h_j(w_j - w^\star_j)$ is large (the
# sharp directions start far from converged) and it lags the true second moment by
# the bias factor $1 - \beta_2^t$ (dashed); after a few thousand steps it settles on
# $\sigma^2 h / B$. The paper uses the final $v$ raw (no bias correction), which is
# harmless after an epoch of fine-tuning ($\beta_2^t \approx 0$ once $t \gg 1000$);
# `curvlens.Moments.open(..., bias_correction=True)` applies it when the step is
# known. Change the noise and the batch size: the *level* of $v$ moves as
# $\sigma^2/B$, its *shape* across coordinates (what merging and FFG use) does not.

# %%
def adam_picture(sigma=1.0, log2_batch=5):
    batch = 2 ** int(log2_batch)
    h, v, v_pred, g2, _, _ = adam_on_regression(sigma=sigma, batch=batch, steps=3000)
    slope = np.polyfit(np.log10(h), np.log10(v), 1)[0]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.loglog(h, v, "o", ms=4, label="Adam exp_avg_sq")
    ax.loglog(h, v_pred, "-", color="0.3", label="σ² h / B")
    ax.set_xlabel("curvature h")
    ax.set_ylabel("v")
    ax.set_title(f"σ = {sigma:.2g}, B = {batch}: slope {slope:.2f}, "
                 f"median v/(σ²h/B) = {np.median(v / v_pred):.2f}", fontsize=9)
    ax.legend(fontsize=8)
    plt.show()


display(widgets.interactive(
    adam_picture,
    sigma=widgets.FloatLogSlider(value=1.0, base=10, min=-1, max=1, step=0.1, description="noise σ"),
    log2_batch=widgets.IntSlider(value=5, min=0, max=8, description="log2 B")))

# %% [markdown]
# ## 3. What Fast Fisher Grafting keeps
#
# Give one expert the task vector $\tau = \theta^\star - \theta_0$ and curvature $h$ (in
# practice $v$). Keeping only the entries in a mask $m$, $\theta = \theta_0 + m \odot \tau$,
# raises the expert's quadratic loss by exactly
# $$\Delta L(m) = \tfrac12 \sum_j h_j\, \tau_j^2\,(1 - m_j) ,$$
# a sum of independent per-entry costs $s_j = \tfrac12 h_j \tau_j^2$. So among all masks
# keeping $k$ entries, the one keeping the $k$ largest **saliencies** $h_j\tau_j^2$ is
# exactly optimal: that is FFG, with $v$ for $h$. Magnitude pruning keeps the largest
# $|\tau_j|$ instead, which is optimal only when the curvature is the same everywhere.
#
# Fine-tuning tends to move flat directions further (a small curvature gives a small
# restoring force), so $|\tau|$ and $h$ are often anti-correlated, and then magnitude
# pruning keeps exactly the wrong entries. We draw $h$ over four decades and
# $\tau_j \sim \mathcal N(0, h_j^{-\alpha})$: $\alpha = 0$ makes magnitude and curvature
# independent, $\alpha > 0$ anti-correlates them.

# %%
def graft_curves(alpha=0.5, n=20000, seed=1):
    g = np.random.default_rng(seed)
    h = 10 ** g.uniform(-2, 2, n)
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
    return dens, out


dens, curves = graft_curves(alpha=0.5)
i = int(np.argmin(np.abs(dens - 0.1)))
for name, c in curves.items():
    print(f"{name:16s} density 0.10: loss increase = {c[i]:.3f} of reverting everything")
assert all(np.all(curves["FFG: h·τ²"] <= c + 1e-12) for c in curves.values()), "FFG is optimal"

# %%
def graft_picture(alpha=0.5):
    dens, curves = graft_curves(alpha=alpha)
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for name, c in curves.items():
        ax.plot(dens, c, label=name, ls="-" if "FFG" in name else "--" if "magnitude" in name else ":")
    ax.set_xlabel("density (fraction of τ kept)")
    ax.set_ylabel("loss increase / full revert cost")
    ax.set_title(f"α = {alpha:.2f}: |τ| ∝ h^(-α/2) on average", fontsize=10)
    ax.legend(fontsize=8)
    plt.show()


display(widgets.interactive(graft_picture,
                            alpha=widgets.FloatSlider(value=0.5, min=-1.0, max=1.5, step=0.1,
                                                      description="α")))

# %% [markdown]
# FFG's curve is the lower envelope for every $\alpha$ (it is the optimum); magnitude
# pruning matches it only at $\alpha = -1$, where $h\tau^2$ and $|\tau|$ rank the entries
# identically in expectation. On real experts (notebook `03`) the saliency uses Adam's
# $v$, and the mask is taken with one model-wide threshold, so that the density of
# each layer and role emerges from where the saliency is.
#
# **Putting it together.** OTA + FFG merges $N$ experts as
# $$\theta = \theta_0 + \frac{\sum_i W_i \tau_i}{\sum_i W_i}, \qquad
#   W_i = (v_i^{p} + \epsilon)\,[v_i \tau_i^2 \ge t_i] ,$$
# i.e. section 1's curvature-weighted average (with $v$ from section 2 as the
# curvature and power $p$), restricted to the entries each expert needs (section 3).
