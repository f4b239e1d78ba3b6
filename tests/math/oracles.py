"""Float64 reference implementations the fast kernels are checked against (test code)."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from curvlens.errors import CurvlensError
from curvlens.math.checks import (
    as_tensor, check_moments, check_nonempty, check_same_shape, chunks, corr, flat, pct_key,
)
from curvlens.math.overlap import _doubled_average_ranks


def moment_pair_metrics(v_a, v_b, top_fracs: Sequence[float] = (0.01, 0.1),
                      log_eps: float = 1e-30) -> dict:
    """Similarity of two second-moment tensors of the same shape.

    Parameters
    ----------
    v_a, v_b : torch.Tensor
        Non-negative, finite second moments (any float dtype, any device, same shape).
        Entries that are exactly zero in both are left out of the log and rank
        statistics (``excluded_zero`` counts them).
    top_fracs : sequence of float
        Fractions ``f`` in (0, 1] for the top-entry Jaccard indices. Each tensor's
        top set has ``k = max(1, ceil(f * n_positive))`` of its positive entries.
    log_eps : float
        Added before the log so that zero moments stay finite.

    Returns
    -------
    dict
        ``cosine``
            Cosine similarity of ``v_a`` and ``v_b``; nan if either is all zero.
        ``pearson_log``
            Pearson correlation of ``log10(v + log_eps)``; nan if either is constant.
        ``spearman_log``
            Spearman rank correlation (exact, from a full sort; ties get average
            ranks). Spearman is invariant under the strictly increasing map
            ``log10(v + eps)``, so it is computed from the ranks of ``v`` itself;
            nan if either tensor is constant.
        ``jaccard_top<p>``
            One key per fraction, ``p`` its percentage (``jaccard_top1``,
            ``jaccard_top10`` by default): Jaccard index of the index sets of the
            ``k`` largest entries of each tensor. Ties at the boundary are broken
            towards the higher flat index, identically for both tensors.
        ``numel``
            Number of entries.

    Raises
    ------
    CurvlensError
        Different shapes (both are named), an empty tensor, NaN/Inf or negative
        entries, or a fraction outside (0, 1].

    Notes
    -----
    Cost, measured on 2 shared CPU cores for 16M entries without ties: 13-21 s and
    +0.7 GB peak RSS above the inputs (about 11 float32-sized copies, most of it
    torch's stable sort with its int64 permutation and scratch), so a 50M-entry
    tensor needs about 2.2 GB and a minute. All sums are float64, in chunks.

    Examples
    --------
    >>> import torch
    >>> v = torch.tensor([1e-12, 1e-9, 1e-6, 1e-3, 0.0])
    >>> r = moment_pair_metrics(v, v)
    >>> r["cosine"], r["pearson_log"], r["spearman_log"], r["jaccard_top10"]
    (1.0, 1.0, 1.0, 1.0)
    >>> w = v[:4]  # strictly increasing; reversed it is perfectly anti-ranked
    >>> moment_pair_metrics(w, w.flip(0))["spearman_log"]
    -1.0
    """
    v_a = as_tensor("v_a", v_a)
    v_b = as_tensor("v_b", v_b)
    check_same_shape(("v_a", "v_b"), (v_a, v_b))
    check_nonempty("v_a", v_a)
    if v_a.device != v_b.device:
        raise CurvlensError(f"v_a and v_b must be on the same device; got {v_a.device} and {v_b.device}")
    fracs = [float(f) for f in top_fracs]
    for f in fracs:
        if not 0.0 < f <= 1.0:
            raise CurvlensError(f"top_fracs must lie in (0, 1]; got {f!r}")
    if not log_eps > 0:
        raise CurvlensError(f"log_eps must be > 0; got {log_eps!r}")
    n = v_a.numel()
    # Exact zeros in both are no curvature: left out of the log and rank statistics.
    fa, fb = flat(v_a), flat(v_b)
    for (a, b) in chunks(v_a, v_b):
        check_moments("v_a", a)
        check_moments("v_b", b)
    support = (fa > 0) | (fb > 0)
    sa, sb = fa[support], fb[support]
    m = sa.numel()

    # Pass 1: raw sums (cosine over everything, log means over the support).
    dot = na = nb = sla = slb = 0.0
    for a, b in chunks(v_a, v_b):
        dot += float(a @ b)
        na += float(a @ a)
        nb += float(b @ b)
    for a, b in chunks(sa, sb):
        sla += float(torch.log10(a + log_eps).sum())
        slb += float(torch.log10(b + log_eps).sum())
    cosine = corr(dot, na, nb)
    pearson = spearman = math.nan
    if m:
        mla, mlb = sla / m, slb / m
        # Pass 2: centred sums for Pearson (two-pass for numerical stability).
        sxy = sxx = syy = 0.0
        for a, b in chunks(sa, sb):
            x = torch.log10(a + log_eps) - mla
            y = torch.log10(b + log_eps) - mlb
            sxy += float(x @ y)
            sxx += float(x @ x)
            syy += float(y @ y)
        pearson = corr(sxy, sxx, syy)
        # Ranks: exact, by sort. Both rank vectors have mean m+1 (doubled ranks).
        ra, _ = _doubled_average_ranks(sa, [])
        rb, _ = _doubled_average_ranks(sb, [])
        mean_rank = float(m + 1)
        sxy = sxx = syy = 0.0
        for x, y in chunks(ra, rb):
            x = x - mean_rank
            y = y - mean_rank
            sxy += float(x @ y)
            sxx += float(x @ x)
            syy += float(y @ y)
        del ra, rb
        spearman = corr(sxy, sxx, syy)

    out = {"cosine": cosine, "pearson_log": pearson, "spearman_log": spearman}
    # Top sets among each tensor's positive entries: k = ceil(f * n_positive).
    # Round before ceil: 0.07 * 100 is 7.000000000000001 in binary floating point.
    tops = []
    for v in (fa, fb):
        n_pos = int((v > 0).sum())
        ks = [max(1, math.ceil(round(f * n_pos, 6))) if n_pos else 0 for f in fracs]
        tops.append((ks, _doubled_average_ranks(v, ks)[1]))
    marks = torch.zeros(n, dtype=torch.bool, device=v_a.device)
    for j, f in enumerate(fracs):
        (ka, ta), (kb, tb) = (tops[0][0][j], tops[0][1][j]), (tops[1][0][j], tops[1][1][j])
        marks.zero_()
        marks[ta] = True
        inter = int(marks[tb].sum())
        union = ka + kb - inter
        out[pct_key("jaccard_top", f)] = inter / union if union else math.nan
    out["excluded_zero"] = n - m
    out["numel"] = n
    return out
