"""How similar are two experts' curvature estimates, tensor by tensor?

The paper argues that experts fine-tuned from one base settle in basins with very
similar curvature, and that this is why plain averaging works as well as it does.
This module measures that similarity for one pair of second-moment tensors
(:func:`curvature_overlap`) and summarises one moment tensor on a log scale
(:func:`log10_stats`). A streaming driver calls these per tensor name and builds the
DataFrames; nothing here reads files or holds more than a few copies of one tensor.

Second moments span tens of decades, so correlations are taken on ``log10(v + eps)``
and every reduction is accumulated in float64 (in chunks, so the float64 copy of a
50M-entry tensor never exists at once).

The small private helpers at the top (input checks, chunked float64 reductions) are
shared with the sibling modules :mod:`curvlens.math.mask_structure` and
:mod:`curvlens.math.interference`.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch

from curvlens.errors import CurvlensError

__all__ = ["moment_pair_metrics", "log10_stats"]

# Elements per float64 chunk in reductions: 4M entries = 32 MB per float64 copy.
_CHUNK = 1 << 22

# torch.quantile refuses inputs with more than 2**24 elements; above that we sample.
_QUANTILE_MAX = 1 << 24


# --------------------------------------------------------------------------- helpers
def _as_tensor(name: str, x) -> torch.Tensor:
    """Accept a torch tensor (or a numpy array, for notebook convenience)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        try:
            return torch.from_numpy(x)
        except TypeError as err:
            raise CurvlensError(f"{name}: numpy dtype {x.dtype} has no torch equivalent") from err
    raise CurvlensError(f"{name} must be a torch.Tensor; got {type(x).__name__}")


def _check_same_shape(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    """Raise a CurvlensError naming every tensor's shape if they differ."""
    shapes = [tuple(t.shape) for t in tensors]
    if any(s != shapes[0] for s in shapes[1:]):
        got = ", ".join(f"{n} {s}" for n, s in zip(names, shapes))
        raise CurvlensError(f"{', '.join(names)} must have the same shape; got {got}")


def _check_nonempty(name: str, t: torch.Tensor) -> None:
    if t.numel() == 0:
        raise CurvlensError(f"{name} is empty (shape {tuple(t.shape)}); expected at least one entry")


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float64 copy of ``t`` on its device (MPS has no float64: fall back to CPU)."""
    if t.device.type == "mps":
        t = t.cpu()
    return as_bytes(t).to(torch.float64)


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A bool tensor viewed as uint8 (no copy); other tensors unchanged.

    torch's CPU kernels for bool are scalar loops: converting a bool tensor to
    float, or reducing it along a dimension, runs ~10x (conversion) to ~100x
    (``any(dim)``) slower than the same operation on its uint8 view.
    """
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def _flat(t: torch.Tensor) -> torch.Tensor:
    # reshape, not view: a non-contiguous input (a transposed weight) is copied once.
    return t.reshape(-1)


def _chunks(*tensors: torch.Tensor, chunk: int = _CHUNK) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield aligned float64 slices of the flattened tensors, ``chunk`` entries each.

    Chunking keeps float64 accuracy without a full float64 copy of a huge tensor.
    A float64 input is not copied, so the chunks alias it: never modify them in place.
    """
    flats = [_flat(t) for t in tensors]
    n = flats[0].numel()
    for start in range(0, n, chunk):
        yield tuple(_wide(f[start:start + chunk]) for f in flats)


def _check_moments_chunk(name: str, c: torch.Tensor) -> None:
    """Second moments must be finite and non-negative (DESIGN: never skip silently)."""
    if not bool(torch.isfinite(c).all()):
        n_bad = int((~torch.isfinite(c)).sum())
        raise CurvlensError(f"{name} contains {n_bad} NaN/Inf entries in a chunk; "
                            "expected finite second moments")
    if bool((c < 0).any()):
        raise CurvlensError(f"{name} contains negative entries (min {float(c.min()):.3g}); "
                            "expected non-negative second moments")


def _ratio(num: float, den: float) -> float:
    """num / den, or nan when the denominator is zero (degenerate input)."""
    return num / den if den > 0 else math.nan


def _corr(sxy: float, sxx: float, syy: float) -> float:
    """Correlation from centred sums, clamped to [-1, 1]; nan for a constant input.

    ``sxy / sqrt(sxx * syy)`` (one square root of the product) makes identical inputs
    give exactly 1.0, since IEEE sqrt(x*x) == x.
    """
    den = sxx * syy
    if not den > 0:
        return math.nan
    return max(-1.0, min(1.0, sxy / math.sqrt(den)))


def _pct_key(prefix: str, frac: float) -> str:
    """Key for a fraction as a percentage: 0.01 -> 'prefix1', 0.001 -> 'prefix0.1'."""
    return f"{prefix}{round(100 * frac, 10):g}"


# ----------------------------------------------------------------------- overlap
def _doubled_average_ranks(x: torch.Tensor, ks: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Ranks of the flat tensor ``x`` (ties get their average rank), times two,
    and the index sets of its ``k`` largest entries for each ``k`` in ``ks``.

    Doubling makes average ranks integers (a tie group spanning ranks s..e has
    average (s+e)/2), so they fit int32 up to ~1e9 entries: half the memory of
    float64 ranks. Ties among the top-k are broken towards the higher index, by the
    stable sort, so the sets are deterministic on every device.
    """
    n = x.numel()
    vals, perm = torch.sort(x, stable=True)
    rank_dtype = torch.int32 if 2 * n + 1 < 2**31 else torch.int64
    ranks = torch.empty(n, dtype=rank_dtype, device=x.device)
    if not bool((vals[1:] == vals[:-1]).any()):
        # No ties (the usual case for moments): rank = sorted position, and no
        # per-group bookkeeping (which would cost three more int64 copies).
        del vals
        ranks[perm] = torch.arange(2, 2 * n + 2, 2, dtype=rank_dtype, device=x.device)
    else:
        _, counts = torch.unique_consecutive(vals, return_counts=True)
        del vals, _
        # Doubled average rank of a group spanning ranks s..e (1-based): s + e =
        # 2 e - count + 1, with e the running sum of the counts. In place, to keep
        # the number of group-sized int64 copies at two.
        doubled = torch.cumsum(counts, 0).mul_(2).sub_(counts).add_(1).to(rank_dtype)
        ranks[perm] = torch.repeat_interleave(doubled, counts)
        del doubled, counts
    tops = [perm[n - k:].clone() for k in ks]
    return ranks, tops


def moment_pair_metrics(v_a, v_b, top_fracs: Sequence[float] = (0.01, 0.1),
                      log_eps: float = 1e-30) -> dict:
    """Similarity of two second-moment tensors of the same shape.

    Parameters
    ----------
    v_a, v_b : torch.Tensor
        Non-negative, finite second moments (any float dtype, any device, same shape).
    top_fracs : sequence of float
        Fractions ``f`` in (0, 1] for the top-entry Jaccard indices. The top set has
        ``k = max(1, ceil(f * numel))`` entries.
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
    v_a = _as_tensor("v_a", v_a)
    v_b = _as_tensor("v_b", v_b)
    _check_same_shape(("v_a", "v_b"), (v_a, v_b))
    _check_nonempty("v_a", v_a)
    if v_a.device != v_b.device:
        raise CurvlensError(f"v_a and v_b must be on the same device; got {v_a.device} and {v_b.device}")
    fracs = [float(f) for f in top_fracs]
    for f in fracs:
        if not 0.0 < f <= 1.0:
            raise CurvlensError(f"top_fracs must lie in (0, 1]; got {f!r}")
    if not log_eps > 0:
        raise CurvlensError(f"log_eps must be > 0; got {log_eps!r}")
    n = v_a.numel()

    # Pass 1: raw sums (validation, cosine, log means).
    dot = na = nb = sla = slb = 0.0
    for a, b in _chunks(v_a, v_b):
        _check_moments_chunk("v_a", a)
        _check_moments_chunk("v_b", b)
        dot += float(a @ b)
        na += float(a @ a)
        nb += float(b @ b)
        sla += float(torch.log10(a + log_eps).sum())
        slb += float(torch.log10(b + log_eps).sum())
    cosine = _corr(dot, na, nb)
    mla, mlb = sla / n, slb / n

    # Pass 2: centred sums for Pearson (two-pass for numerical stability).
    sxy = sxx = syy = 0.0
    for a, b in _chunks(v_a, v_b):
        x = torch.log10(a + log_eps) - mla
        y = torch.log10(b + log_eps) - mlb
        sxy += float(x @ y)
        sxx += float(x @ x)
        syy += float(y @ y)
    pearson = _corr(sxy, sxx, syy)

    # Ranks: exact, by sort. Both rank vectors have mean n+1 (doubled ranks).
    # Round before ceil: 0.07 * 100 is 7.000000000000001 in binary floating point.
    ks = [max(1, math.ceil(round(f * n, 6))) for f in fracs]
    ra, tops_a = _doubled_average_ranks(_flat(v_a), ks)
    rb, tops_b = _doubled_average_ranks(_flat(v_b), ks)
    mean_rank = float(n + 1)
    sxy = sxx = syy = 0.0
    for x, y in _chunks(ra, rb):
        x = x - mean_rank
        y = y - mean_rank
        sxy += float(x @ y)
        sxx += float(x @ x)
        syy += float(y @ y)
    del ra, rb
    spearman = _corr(sxy, sxx, syy)

    out = {"cosine": cosine, "pearson_log": pearson, "spearman_log": spearman}
    marks = torch.zeros(n, dtype=torch.bool, device=v_a.device)
    for f, k, ta, tb in zip(fracs, ks, tops_a, tops_b):
        marks.zero_()
        marks[ta] = True
        inter = int(marks[tb].sum())
        out[_pct_key("jaccard_top", f)] = inter / (2 * k - inter)
    out["numel"] = n
    return out


# -------------------------------------------------------------------- log10 stats
def log10_stats(v, quantiles: Sequence[float] = (0.01, 0.1, 0.5, 0.9, 0.99),
                max_exact: int = _QUANTILE_MAX, seed: int = 0) -> dict:
    """Summary of ``log10 v`` over the positive entries of one moment tensor.

    Parameters
    ----------
    v : torch.Tensor
        Non-negative, finite second moments (any float dtype, any device).
    quantiles : sequence of float
        Quantile levels in [0, 1] (linear interpolation, as ``numpy.quantile``).
    max_exact : int
        Quantiles are exact when there are at most this many positive entries
        (default ``2**24``, the largest input ``torch.quantile`` accepts). Above it
        they are taken on a uniform random subsample of ``max_exact`` positive
        entries (with replacement) drawn by a CPU ``torch.Generator`` seeded with
        ``seed``, so results are reproducible; ``sampled`` is then True. Mean, std,
        min, max and ``frac_zero`` are always exact.
    seed : int
        Seed of that subsample.

    Returns
    -------
    dict
        ``numel``, ``n_positive``, ``frac_zero`` (fraction of exact zeros),
        ``mean``, ``std`` (population), ``min``, ``max``, ``median`` of ``log10 v``
        over ``v > 0``, one ``q<p>`` key per quantile level with ``p`` its
        percentage (``q1, q10, q50, q90, q99`` by default), and ``sampled``.
        Statistics of the logs are nan when no entry is positive.

    Raises
    ------
    CurvlensError
        Empty tensor, NaN/Inf or negative entries, or a level outside [0, 1].

    Examples
    --------
    >>> import torch
    >>> s = log10_stats(torch.tensor([0.0, 1e-8, 1e-6, 1e-4]), quantiles=(0.5,))
    >>> s["frac_zero"], round(s["mean"], 6), round(s["q50"], 6), s["sampled"]
    (0.25, -6.0, -6.0, False)
    """
    v = _as_tensor("v", v)
    _check_nonempty("v", v)
    qs = [float(q) for q in quantiles]
    for q in qs:
        if not 0.0 <= q <= 1.0:
            raise CurvlensError(f"quantiles must lie in [0, 1]; got {q!r}")
    if int(max_exact) < 1:
        raise CurvlensError(f"max_exact must be >= 1; got {max_exact!r}")
    n = v.numel()

    # Exact moments of the logs, float64 in chunks; validates as it goes.
    n_pos = 0
    s1 = 0.0
    lo, hi = math.inf, -math.inf
    for (c,) in _chunks(v):
        _check_moments_chunk("v", c)
        lg = torch.log10(c[c > 0])
        if lg.numel():
            n_pos += lg.numel()
            s1 += float(lg.sum())
            lo = min(lo, float(lg.min()))
            hi = max(hi, float(lg.max()))
    out = {"numel": n, "n_positive": n_pos, "frac_zero": (n - n_pos) / n}
    nan_keys = ["mean", "std", "min", "max", "median"] + [_pct_key("q", q) for q in qs]
    if n_pos == 0:
        out.update({k: math.nan for k in nan_keys})
        out["sampled"] = False
        return out
    mean = s1 / n_pos
    s2 = 0.0
    for (c,) in _chunks(v):
        d = torch.log10(c[c > 0]) - mean
        s2 += float(d @ d)
    out.update({"mean": mean, "std": math.sqrt(s2 / n_pos), "min": lo, "max": hi})

    # Quantiles in float64 (float32 on MPS, which has no float64): at most
    # max_exact entries, so this copy is bounded.
    flat = _flat(v)
    pos = flat[flat > 0]
    sampled = n_pos > int(max_exact)
    if sampled:
        gen = torch.Generator().manual_seed(int(seed))
        idx = torch.randint(n_pos, (int(max_exact),), generator=gen).to(pos.device)
        pos = pos[idx]
        del idx
    lg = torch.log10(pos.float() if pos.device.type == "mps" else pos.to(torch.float64))
    del pos
    levels = torch.tensor([0.5] + qs, dtype=lg.dtype, device=lg.device)
    vals = torch.quantile(lg, levels).tolist()
    out["median"] = vals[0]
    for q, val in zip(qs, vals[1:]):
        out[_pct_key("q", q)] = val
    out["sampled"] = sampled
    return out
