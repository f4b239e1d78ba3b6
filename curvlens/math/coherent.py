"""The diagonal predicted loss of a merge, split into what adds up and what cancels.

The diagonal quadratic ``0.5 * sum v_i (theta - theta_i)**2`` prices every entry's
error on its own. A network does not: a unit's pre-activation sums its row,
``sum_j W_rj x_j``. An error that points along the expert's own edit of that row
(the merge keeps a fraction ``beta`` of it) shifts the pre-activation coherently,
by ``(1 - beta)`` of everything fine-tuning added there; an error orthogonal to it
(what random drop-and-rescale, DARE or DELLA, leaves: unbiased, with independent
signs) is a sum of many small terms that largely cancel.

Per row ``r`` of a tensor (a 1-D tensor is a row per entry: each entry is its own
unit, and both parts are then the diagonal model), with ``d = theta - theta_0``
the merge's edit and ``tau = theta_i - theta_0`` the expert's, in the metric of
``v``::

    beta_r     = <d_r, tau_r>_v / <tau_r, tau_r>_v
    coherent_r = 0.5 (1 - beta_r)**2 <tau_r, tau_r>_v
    residual_r = 0.5 <d_r - beta_r tau_r, d_r - beta_r tau_r>_v

``coherent + residual`` is exactly the diagonal loss (Pythagoras in the
v-metric). Rows the expert did not edit (``<tau_r, tau_r>_v = 0``) are all residual.
"""
from __future__ import annotations

import torch

from curvlens.math.checks import as_tensor, check_moments, check_same_shape

__all__ = ["coherent_split"]


def coherent_split(v, theta_merged, theta_expert, theta_base) -> dict[str, float]:
    """The diagonal predicted loss of one tensor split into its coherent and
    residual parts (see the module docstring).

    Parameters
    ----------
    v : torch.Tensor
        The expert's second moments (non-negative).
    theta_merged, theta_expert, theta_base : torch.Tensor
        Merged, expert and base parameters, all of ``v``'s shape.

    Returns
    -------
    dict
        ``coherent`` and ``residual`` (float64 sums; they add up to
        :func:`~curvlens.math.interference.predicted_loss_increase`), and
        ``residual_per_unit``: the residual with each row's divided by its length
        (the share of an incoherent error that survives a unit's sum when the
        row's inputs are independent; a 1-D tensor's rows have length 1).

    Examples
    --------
    >>> tau = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    >>> v, base = torch.ones(1, 4), torch.zeros(1, 4)
    >>> half = coherent_split(v, base + 0.5 * tau, base + tau, base)      # half of the edit, coherently
    >>> half["coherent"], half["residual"]
    (0.5, 0.0)
    >>> drop = coherent_split(v, torch.tensor([[2.0, 0.0, 2.0, 0.0]]), base + tau, base)   # DARE at 0.5
    >>> drop["coherent"], drop["residual"], drop["residual_per_unit"]
    (0.0, 2.0, 0.5)
    """
    v = check_moments("v", as_tensor("v", v))
    m, e, b = (as_tensor(n, t) for n, t in (("theta_merged", theta_merged), ("theta_expert", theta_expert),
                                            ("theta_base", theta_base)))
    check_same_shape(["v", "theta_merged", "theta_expert", "theta_base"], [v, m, e, b])
    rows = (lambda t: t.reshape(t.shape[0], -1)) if v.dim() > 1 else (lambda t: t.reshape(-1, 1))
    v, b = rows(v).double(), rows(b).double()
    d, tau = rows(m).double() - b, rows(e).double() - b
    tt = (v * tau * tau).sum(1)
    dt = (v * d * tau).sum(1)
    dd = (v * d * d).sum(1)
    edited = tt > 0
    beta = torch.where(edited, dt / torch.where(edited, tt, torch.ones_like(tt)), torch.zeros_like(tt))
    coherent = 0.5 * (1 - beta) ** 2 * tt
    # |d - beta tau|^2 = dd - 2 beta dt + beta^2 tt = dd - beta dt (beta tt = dt); clamp the rounding below 0
    residual = 0.5 * (dd - beta * dt).clamp_min(0)
    width = v.shape[1]
    return {"coherent": float(coherent.sum()), "residual": float(residual.sum()),
            "residual_per_unit": float(residual.sum() / width)}
