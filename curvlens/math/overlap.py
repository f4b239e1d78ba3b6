"""How similar are experts' curvature estimates, tensor by tensor?

The paper argues that experts fine-tuned from one base settle in basins with very
similar curvature, and that this is why plain averaging works as well as it does.
:func:`pair_overlaps` measures that similarity for every pair of experts on one
second-moment tensor (each expert's heavy work once); :func:`log10_stats`
summarises one moment tensor on a log scale. The streaming analyses call these per
tensor name and build the DataFrames.

Second moments span tens of decades, so correlations are taken on
``log10(v + eps)``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from curvlens.errors import CurvlensError
from curvlens.math.blocks import Workspace
from curvlens.math.checks import (
    as_tensor, check_moments, check_nonempty, chunks, corr, flat, moments_max, pct_key,
)
from curvlens.math.topk import sample_bracket

__all__ = ["pair_overlaps", "spearman_pairs", "log10_stats", "TOP_FRACS"]

#: Fractions of the top-entry Jaccard indices.
TOP_FRACS = (0.01, 0.1)

# torch.quantile refuses inputs with more than 2**24 elements; above that we sample.
QUANTILE_MAX = 1 << 24


def _stable_sort(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.sort(x, stable=True)``'s order, and sorted keys that are equal where
    the sorted values are. Non-negative float32 values (moments; ``-0.0`` too)
    order as their bit patterns with the sign cleared, and torch sorts 32-bit
    integers by radix: on 65536 values 0.6 ms against 5.7 ms for the floats,
    the same permutation (a stable sort of keys with the floats' order and
    ties)."""
    if x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() > 1:
        bits = x.view(torch.int32) & 0x7FFFFFFF
        if not bool((bits > 0x7F800000).any()) and not bool((x < 0).any()):  # no NaN, no negative value
            return torch.sort(bits, stable=True)
    return torch.sort(x, stable=True)


def _doubled_average_ranks(x: torch.Tensor, ks: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Ranks of the flat tensor ``x`` (ties get their average rank), times two,
    and the index sets of its ``k`` largest entries for each ``k`` in ``ks``.

    Doubling makes average ranks integers (a tie group spanning ranks s..e has
    average (s+e)/2), so they fit int32 up to ~1e9 entries: half the memory of
    float64 ranks. Ties among the top-k are broken towards the higher index, by the
    stable sort, so the sets are deterministic on every device.
    """
    n = x.numel()
    vals, perm = _stable_sort(x)
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


def _dot(x: torch.Tensor, y: torch.Tensor, tmp: torch.Tensor) -> float:
    """``sum(x * y)`` of float32 tensors with torch's cascade summation (relative
    error ~1e-8 on 30M entries, where a BLAS float32 dot is off by ~1e-3)."""
    return float(torch.mul(x, y, out=tmp).sum())


def _top_masks(flat: torch.Tensor, ks: list[int], sorted_sample: torch.Tensor) -> list[torch.Tensor]:
    """Bool masks of the ``k`` largest entries of ``flat`` for each ``k``, ties broken
    towards the higher index (as the full sort of :func:`_doubled_average_ranks`).

    The k-th largest value is found without sorting ``flat``: a sorted uniform
    sample brackets it, the entries above the lowest bracket are pulled out once
    (about the largest top fraction of the tensor), and an exact selection runs on
    them. If a bracket misses (probability ~1e-9), a full ``kthvalue`` decides.
    """
    n = flat.numel()
    br = [sample_bracket(sorted_sample, n, k) for k in ks]
    floor = min(lo for lo, _ in br)
    cand = flat[flat >= floor]
    out = []
    for k, (lo, hi) in zip(ks, br):
        t = None
        n_above = int(torch.count_nonzero(cand > hi))
        if n_above < k:
            inner = cand[(cand >= lo) & (cand <= hi)]
            r = k - n_above  # the threshold is the r-th largest inside the bracket
            if r <= inner.numel():
                t = torch.kthvalue(inner, inner.numel() - r + 1).values
        if t is None:
            t = torch.kthvalue(flat, n - k + 1).values
        mask = flat >= t
        # every entry >= t is >= floor, so the small candidate set counts them
        if int(torch.count_nonzero(cand >= t)) != k:  # ties at t: keep the highest-index ones
            mask = flat > t
            need = k - int(torch.count_nonzero(mask))
            mask[(flat == t).nonzero().flatten()[-need:]] = True
        out.append(mask)
    return out


def _top_sets(f: torch.Tensor, ks: list[int], n: int, dev, sorted_sample=None, ix=None) -> list[torch.Tensor]:
    """Bool masks of the ``k`` largest entries for each ``k`` (0: empty), from the
    sorted sample (:func:`_top_masks`) or the full sort's index sets ``ix``."""
    out = []
    if sorted_sample is not None:
        found = iter(_top_masks(f, [k for k in ks if k > 0], sorted_sample)) if any(ks) else iter(())
        for k in ks:
            out.append(next(found) if k > 0 else torch.zeros(n, dtype=torch.bool, device=dev))
        return out
    for j in ix:
        mk = torch.zeros(n, dtype=torch.bool, device=dev)
        mk[j] = True
        out.append(mk)
    return out


def _sample_within(support: torch.Tensor, n_support: int, m: int, gen: torch.Generator) -> torch.Tensor:
    """``m`` positions drawn uniformly (with replacement) from the True entries of
    ``support``, by rejection from uniform draws over the whole tensor in bounded
    chunks (never an index list of the whole support)."""
    n = support.numel()
    got, need = [], m
    while need > 0:
        draw = min(max(int(need * n / n_support * 1.25) + 64, 1024), 1 << 22)
        pos = torch.randint(n, (draw,), generator=gen).to(support.device)
        pos = pos[support[pos]][:need]
        got.append(pos)
        need -= pos.numel()
    return torch.cat(got)


def _log_corr(la: torch.Tensor, lb: torch.Tensor) -> float:
    """Pearson correlation of two float32 vectors (cascade sums, centred first)."""
    la = la - float(la.sum()) / la.numel()
    lb = lb - float(lb.sum()) / lb.numel()
    tmp = torch.empty_like(la)
    return corr(_dot(la, lb, tmp), _dot(la, la, tmp), _dot(lb, lb, tmp))


def _rank_corr(xa: torch.Tensor, xb: torch.Tensor) -> float:
    """Spearman correlation (average ranks for ties) of two vectors."""
    m = xa.numel()
    ra = _doubled_average_ranks(xa, [])[0].double() - (m + 1)
    rb = _doubled_average_ranks(xb, [])[0].double() - (m + 1)
    return corr(float(ra @ rb), float(ra @ ra), float(rb @ rb))


def pair_overlaps(name: str, vs: dict[str, torch.Tensor], pairs: list[tuple[str, str]], spearman_max: int | None,
                  seed: int, log_eps: float, ws: Workspace | None = None) -> tuple[dict[tuple[str, str], dict], bool]:
    """All pair statistics of one tensor (``name``, for messages), each expert's
    heavy work done once: ``cosine``, ``pearson_log`` (of ``log10(v + log_eps)``),
    ``spearman_log`` (average ranks for ties; from a sample of ``spearman_max``
    entries drawn with ``seed`` when the tensor is larger, then the second return
    value is True), ``jaccard_top1`` / ``jaccard_top10`` and ``excluded_zero``.

    Exact zeros are no curvature: an entry whose moment is 0 in *both* experts
    (a token neither ever saw, a parameter neither updated) says nothing about how
    alike their curvature is, yet tied at the bottom it would make any two experts
    look alike. So ``pearson_log`` and ``spearman_log`` are taken over the entries
    where either expert's moment is positive, and ``excluded_zero`` counts the
    entries left out; the Jaccard sets are each expert's top ``ceil(f * n_pos)``
    entries among its ``n_pos`` positive ones (ties towards the higher index), NaN
    when neither has a positive entry. ``cosine`` needs no exclusion (zeros add
    nothing to it). Without zeros all of this is the plain statistic.

    Per expert: a validation read, a scaled copy (for the cosine) and a centred
    log copy (for Pearson), one sort (of the tensor, or of a sample when it is
    larger than ``spearman_max``) and the top-k masks; per pair only products,
    sums and mask intersections, plus a gather of the pair's support when it
    excludes zeros. Whole-tensor float32 operations with cascade summation: about
    1e-7 relative accuracy, at a fraction of a float64 pass.
    """
    ws = ws or Workspace()
    flats = {e: v.reshape(-1).float() for e, v in vs.items()}
    vmaxes = {e: moments_max(f"expert {e!r}, tensor {name!r}", f) for e, f in flats.items()}
    first = next(iter(flats.values()))
    n, dev = first.numel(), first.device
    tmp = ws.get("tmp", n, torch.float32, dev)
    sampled = spearman_max is not None and n > spearman_max
    idx = spearman_sample(n, spearman_max, seed, dev)
    scaled, logs, norm2, ssq, resid, ranks, tops, positive = {}, {}, {}, {}, {}, {}, {}, {}
    for i, (e, f) in enumerate(flats.items()):
        positive[e] = torch.gt(f, 0, out=ws.get(("p", i), n, torch.bool, dev))
        n_pos = int(torch.count_nonzero(positive[e]))
        ks = [max(1, math.ceil(round(fr * n_pos, 6))) if n_pos else 0 for fr in TOP_FRACS]
        if sampled:
            s = f[idx]
            ranks[e], (perm,) = _doubled_average_ranks(s, [s.numel()])
            tops[e] = (ks, _top_sets(f, ks, n, dev, sorted_sample=s[perm]))
            del s, perm
        else:
            ranks[e], ix = _doubled_average_ranks(f, ks)
            tops[e] = (ks, _top_sets(f, ks, n, dev, ix=ix))
        # Cosine on v / max(v): scale-free, and keeps float32 products of tiny
        # moments (1e-20 ** 2) from underflowing.
        vmax = vmaxes[e]
        scaled[e] = torch.mul(f, 1.0 / vmax if vmax > 0 else 0.0, out=ws.get(("s", i), n, torch.float32, dev))
        norm2[e] = _dot(scaled[e], scaled[e], tmp)
        lg = torch.add(f, log_eps, out=ws.get(("l", i), n, torch.float32, dev)).log10_()
        lg.sub_(float(lg.sum()) / n)
        resid[e] = float(lg.sum()) / n  # what float32 centring left over
        logs[e] = lg
        ssq[e] = _dot(lg, lg, tmp) - n * resid[e] ** 2
    m = ranks[next(iter(ranks))].numel()
    inter = ws.get("and", n, torch.bool, dev)
    out = {}
    for a, b in pairs:
        support = torch.logical_or(positive[a], positive[b], out=inter)
        n_support = int(torch.count_nonzero(support))
        row = {"cosine": corr(_dot(scaled[a], scaled[b], tmp), norm2[a], norm2[b])}
        if n_support == n:
            sxy = _dot(logs[a], logs[b], tmp) - n * resid[a] * resid[b]
            # doubled average ranks of m entries have mean m + 1; the sample is small
            ra, rb = ranks[a].double() - (m + 1), ranks[b].double() - (m + 1)
            row["pearson_log"] = corr(sxy, ssq[a], ssq[b])
            row["spearman_log"] = corr(float(ra @ rb), float(ra @ ra), float(rb @ rb))
        elif n_support == 0:
            row["pearson_log"] = row["spearman_log"] = math.nan
        else:
            row["pearson_log"] = _log_corr(logs[a][support], logs[b][support])
            if sampled:
                gen = torch.Generator().manual_seed(seed + 1)
                pos = _sample_within(support, n_support, int(spearman_max), gen)
                row["spearman_log"] = _rank_corr(flats[a][pos], flats[b][pos])
            else:
                row["spearman_log"] = _rank_corr(flats[a][support], flats[b][support])
        (ka, ma), (kb, mb) = tops[a], tops[b]
        for f, k_a, k_b, sa, sb in zip(TOP_FRACS, ka, kb, ma, mb):
            both = int(torch.count_nonzero(torch.logical_and(sa, sb, out=inter)))
            union = k_a + k_b - both
            row[f"jaccard_top{round(100 * f):d}"] = both / union if union else math.nan
        row["excluded_zero"] = n - n_support
        out[a, b] = row
    return out, sampled


def spearman_sample(n: int, spearman_max: int | None, seed: int, device) -> torch.Tensor | None:
    """The entries :func:`spearman_pairs` ranks when every entry is in a pair's
    support: ``spearman_max`` of them drawn with replacement (seeded), or None
    (all of them) for tensors no larger than that."""
    if spearman_max is None or n <= spearman_max:
        return None
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(n, (int(spearman_max),), generator=gen).to(device)


def spearman_ranks(flat: torch.Tensor, sample: torch.Tensor | None) -> torch.Tensor:
    """Doubled average ranks of ``flat`` at ``sample`` (all of it when None), as
    :func:`spearman_pairs` ranks an expert whose pairs cover every entry."""
    return _doubled_average_ranks(flat[sample] if sample is not None else flat, [])[0]


def spearman_pairs(flats: dict[str, torch.Tensor], pairs: list[tuple[str, str]], n_support: dict,
                   spearman_max: int | None, seed: int,
                   ranks: dict[str, torch.Tensor] | None = None) -> tuple[dict[tuple[str, str], float], bool]:
    """``spearman_log`` of :func:`pair_overlaps` alone, for pairs whose support
    sizes (entries where either moment is positive) are already known: the same
    ranks, samples and seeds, so the same numbers. Returns ``({pair: rho},
    sampled)``. ``ranks``: experts' :func:`spearman_ranks` made already (at
    :func:`spearman_sample`'s entries), for pairs with the whole tensor as support.

    Examples
    --------
    >>> v = {"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([3.0, 2.0, 1.0])}
    >>> spearman_pairs(v, [("a", "b")], {("a", "b"): 3}, None, 0)
    ({('a', 'b'): -1.0}, False)
    """
    first = next(iter(flats.values()))
    n, dev = first.numel(), first.device
    sampled = spearman_max is not None and n > spearman_max
    idx = spearman_sample(n, spearman_max, seed, dev)
    full = [p for p in pairs if n_support[p] == n]
    ranks = dict(ranks or {})
    for e in dict.fromkeys(x for p in full for x in p):
        if e not in ranks:
            ranks[e] = spearman_ranks(flats[e], idx)
    out = {}
    for a, b in pairs:
        ns = n_support[a, b]
        if ns == n:
            m = ranks[a].numel()
            ra, rb = ranks[a].double() - (m + 1), ranks[b].double() - (m + 1)
            out[a, b] = corr(float(ra @ rb), float(ra @ ra), float(rb @ rb))
        elif ns == 0:
            out[a, b] = math.nan
        else:
            support = (flats[a] > 0) | (flats[b] > 0)
            if sampled:
                gen = torch.Generator().manual_seed(seed + 1)
                pos = _sample_within(support, ns, int(spearman_max), gen)
                out[a, b] = _rank_corr(flats[a][pos], flats[b][pos])
            else:
                out[a, b] = _rank_corr(flats[a][support], flats[b][support])
    return out, sampled


def log10_stats(v, quantiles: Sequence[float] = (0.01, 0.1, 0.5, 0.9, 0.99),
                max_exact: int = QUANTILE_MAX, seed: int = 0) -> dict:
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
    v = as_tensor("v", v)
    check_nonempty("v", v)
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
    for (c,) in chunks(v):
        check_moments("v", c)
        lg = torch.log10(c[c > 0])
        if lg.numel():
            n_pos += lg.numel()
            s1 += float(lg.sum())
            lo = min(lo, float(lg.min()))
            hi = max(hi, float(lg.max()))
    out = {"numel": n, "n_positive": n_pos, "frac_zero": (n - n_pos) / n}
    nan_keys = ["mean", "std", "min", "max", "median"] + [pct_key("q", q) for q in qs]
    if n_pos == 0:
        out.update({k: math.nan for k in nan_keys})
        out["sampled"] = False
        return out
    mean = s1 / n_pos
    s2 = 0.0
    for (c,) in chunks(v):
        d = torch.log10(c[c > 0]) - mean
        s2 += float(d @ d)
    out.update({"mean": mean, "std": math.sqrt(s2 / n_pos), "min": lo, "max": hi})

    # Quantiles in float64 (float32 on MPS, which has no float64): at most
    # max_exact entries, so this copy is bounded.
    entries = flat(v)
    pos = entries[entries > 0]
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
        out[pct_key("q", q)] = val
    out["sampled"] = sampled
    return out
