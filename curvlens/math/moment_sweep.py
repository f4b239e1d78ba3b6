"""One sweep over a second-moment tensor feeds every per-expert curvature statistic.

:func:`moment_sweep` reads ``v`` once and returns a :class:`MomentSummary`: zero
and positive counts, the float64 sums of ``log10 v`` and of ``v``, the maximum,
a 65536-bin histogram of the positive values (bins of the top 16 bits of the
float32 pattern: bf16-width bins, 1/128 of an octave) and, optionally, counts of
``log10 v`` in user-given bins. Everything else is derived from it without
sorting the tensor:

* :func:`log10_quantiles`: exact quantiles of ``log10 v`` over the positive
  entries (``torch.quantile``'s linear interpolation, bit for bit): the histogram
  says which bins hold the needed order statistics, one selection pass pulls the
  entries of those bins out, and a ``kthvalue`` on those few finds them;
* :func:`top_sets`: each top-``k`` set as a threshold and a tie cut (ties
  towards the higher index), the same way;
* :func:`user_bins`: user bin edges in log10 units turned into float32 bit
  patterns, so counting them needs no logarithm and reproduces
  ``torch.bucketize`` of ``log10`` in float64 exactly.

On a CPU the sweeps run in C (:mod:`curvlens.math.native`); elsewhere (a GPU,
no compiler) in torch, with the same results (the float64 sums to rounding).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from curvlens.math import native

__all__ = ["MomentSummary", "moment_sweep", "order_selections", "log10_quantiles", "top_sets", "user_bins", "UserBins", "FINE_BINS"]

#: Bins of the fine histogram (the top 16 bits of a non-negative float32).
FINE_BINS = 1 << 16
_MAX_FINITE = 0x7F7FFFFF


@dataclass(frozen=True)
class UserBins:
    """Bin edges in log10 units as float32 bit patterns: a positive value with
    bits ``b`` falls in bin ``k`` when ``lo[k] <= b < lo[k+1]`` (the last bin:
    ``lo[-1] <= b <= hi``), exactly where ``log10(float64(v))`` falls among
    ``edges`` (half-open bins, the last closed). ``lut`` maps each fine bin to its
    user bin (-1: none; -2: it straddles an edge, decide per value)."""

    edges: torch.Tensor  # float64 (nb + 1)
    lo: torch.Tensor  # int64 (nb)
    hi: int
    lut: torch.Tensor  # int32 (FINE_BINS)

    @property
    def n(self) -> int:
        return self.lo.numel()


def _first_bits(edges: torch.Tensor, strict: bool) -> torch.Tensor:
    """Per edge, the smallest positive float32 bit pattern whose float64 log10 is
    ``>= edge`` (``> edge`` when strict); ``_MAX_FINITE + 1`` when none is. A
    binary search over bit patterns, with the very log10 the histogram semantics
    are defined by (torch's, in float64)."""
    lo = torch.ones_like(edges, dtype=torch.int64)
    hi = torch.full_like(lo, _MAX_FINITE + 1)
    for _ in range(32):
        mid = (lo + hi) // 2
        val = torch.log10(mid.to(torch.int32).view(torch.float32).double())
        ok = val > edges if strict else val >= edges
        hi = torch.where(ok, mid, hi)
        lo = torch.where(ok, lo, mid + 1)
    return lo


def user_bins(edges) -> UserBins:
    """The bit-pattern form of log10 bin edges (see :class:`UserBins`).

    Examples
    --------
    >>> ub = user_bins([-3.0, -2.0, 0.0])
    >>> ub.n, float(torch.tensor(int(ub.lo[1]), dtype=torch.int32).view(torch.float32))
    (2, 0.010000000707805157)
    """
    e = torch.as_tensor(edges, dtype=torch.float64).reshape(-1)
    first = _first_bits(e, strict=False)
    lo = first[:-1].clone()
    hi = int(_first_bits(e[-1:], strict=True)[0]) - 1
    fine = torch.arange(FINE_BINS, dtype=torch.int64)
    a, b = fine << 16, torch.clamp((fine << 16) + 0xFFFF, max=_MAX_FINITE)

    def which(bits):
        k = torch.searchsorted(lo, bits, right=True) - 1
        inside = (bits >= lo[0]) & (bits <= hi)
        return torch.where(inside, k, torch.full_like(k, -1)), inside

    ka, ina = which(a)
    kb, inb = which(b)
    same_side = (~ina) & (~inb) & ((a > hi) == (b > hi))  # wholly below or wholly above
    lut = torch.where((ka == kb) & ina & inb, ka, torch.full_like(ka, -2))
    lut = torch.where(same_side, torch.full_like(lut, -1), lut)
    return UserBins(e, lo, hi, lut.to(torch.int32))


@dataclass
class MomentSummary:
    """What one sweep over a moment tensor knows (see :func:`moment_sweep`)."""

    numel: int
    zeros: int
    positive: int
    sum_log10: float  # over the positive entries
    sum_v: float
    vmax: float
    hist: torch.Tensor  # int64 (FINE_BINS) on the CPU, positive entries only
    user_counts: torch.Tensor | None = None  # int64 (nb)


def moment_sweep(v: torch.Tensor, bins: UserBins | None = None) -> MomentSummary:
    """Sweep a (finite, non-negative) moment tensor once.

    Examples
    --------
    >>> s = moment_sweep(torch.tensor([0.0, 1e-8, 1e-6, 1e-4]))
    >>> s.zeros, s.positive, round(s.sum_log10 / s.positive, 6), s.vmax
    (1, 3, -6.0, 9.999999747378752e-05)
    """
    flat = v.reshape(-1)
    if flat.dtype != torch.float32:
        flat = flat.float()
    n = flat.numel()
    if native.available(flat):
        flat = flat.contiguous()
        hist = torch.zeros(FINE_BINS, dtype=torch.int64)
        out = torch.zeros(5, dtype=torch.float64)
        uc = torch.zeros(bins.n if bins is not None else 1, dtype=torch.int64)
        lo = bins.lo.to(torch.int64).clamp(max=0xFFFFFFFF).to(torch.int64) if bins is not None else None
        lo32 = lo.to(torch.int64).numpy().astype("uint32") if lo is not None else None
        native.lib().cl_moment_sweep(flat.data_ptr(), n, hist.data_ptr(),
                                     bins.lut.data_ptr() if bins is not None else None,
                                     lo32.ctypes.data if lo32 is not None else None,
                                     bins.n if bins is not None else 0,
                                     min(bins.hi, 0xFFFFFFFF) if bins is not None else 0,
                                     uc.data_ptr(), out.data_ptr())
        z, p, sl, sv, vm = out.tolist()
        return MomentSummary(n, int(z), int(p), sl, sv, vm, hist, uc if bins is not None else None)
    return _sweep_torch(flat, bins)


def _sweep_torch(flat: torch.Tensor, bins: UserBins | None) -> MomentSummary:
    pos = flat[flat > 0]
    bits = pos.view(torch.int32).long()
    hist = torch.bincount(bits >> 16, minlength=FINE_BINS).cpu()
    uc = None
    if bins is not None:
        k = torch.searchsorted(bins.lo.to(bits.device), bits, right=True) - 1
        ok = (bits >= int(bins.lo[0])) & (bits <= bins.hi)
        uc = torch.bincount(k[ok], minlength=bins.n).cpu()
    n = flat.numel()
    return MomentSummary(n, n - pos.numel(), pos.numel(), float(torch.log10(pos.double()).sum()),
                         float(flat.double().sum()), float(flat.max()) if n else 0.0, hist, uc)


def _collect(flat: torch.Tensor, hist: torch.Tensor, fine: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The positive entries (values, flat indices, in index order) of the marked
    fine bins."""
    fine = sorted(set(fine))
    count = int(hist[fine].sum())
    if native.available(flat):
        mark = torch.zeros(FINE_BINS, dtype=torch.uint8)
        mark[fine] = 1
        vals = torch.empty(count, dtype=torch.float32)
        idx = torch.empty(count, dtype=torch.int64)
        got = native.lib().cl_collect_bins(flat.data_ptr(), flat.numel(), mark.data_ptr(), vals.data_ptr(),
                                           idx.data_ptr(), count)
        assert got == count  # noqa: S101  (the histogram came from the same values)
        return vals, idx
    bins = flat.view(torch.int32) >> 16
    sel = (flat > 0) & torch.isin(bins, torch.tensor(fine, dtype=torch.int32, device=flat.device))
    idx = sel.nonzero().flatten()
    return flat[idx].cpu(), idx.cpu()


def order_selections(v: torch.Tensor, s: MomentSummary, levels: Sequence[float] = (),
                     ks: Sequence[int] = ()) -> tuple[list[float], list[tuple[float, int]]]:
    """Quantiles of ``log10 v`` (over the positive entries) at ``levels`` and the
    top-``k`` sets for ``ks``, from ONE selection sweep over ``v``.

    Quantiles are ``torch.quantile``'s (linear interpolation of the sorted
    float64 logs), bit for bit. A top-``k`` set is ``(threshold, cut)``: entry
    ``i`` is in it when ``v[i] > threshold``, or ``v[i] == threshold`` and ``i >=
    cut`` (of the entries tied at the threshold, the highest indices); ``k == 0``
    is the empty set ``(inf, numel)``; every ``k`` is at most the positive
    entries.

    Examples
    --------
    >>> v = torch.tensor([0.0, 1e-8, 1e-6, 1e-4, 1e-2])
    >>> q, _ = order_selections(v, moment_sweep(v), [0.5, 0.25])
    >>> [round(x, 6) for x in q]
    [-5.0, -6.5]
    >>> v = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0])
    >>> order_selections(v, moment_sweep(v), ks=[2, 0])[1]
    [(3.0, 2), (inf, 5)]
    """
    flat = v.reshape(-1)
    flat = (flat if flat.dtype == torch.float32 else flat.float()).contiguous()
    p = s.positive
    if p == 0:
        return [math.nan] * len(levels), [(math.inf, flat.numel()) for _ in ks]
    q = torch.tensor(list(levels), dtype=torch.float64)
    ranks = q * (p - 1)
    below, above = ranks.long(), ranks.ceil().long()
    wanted = set(below.tolist()) | set(above.tolist()) | {p - k for k in ks if k > 0}
    cum = s.hist.cumsum(0)
    bins = {r: int(torch.searchsorted(cum, r, right=True)) for r in wanted}
    vals, idx = _collect(flat, s.hist, list(bins.values()))
    ordered = torch.sort(vals).values
    start, offset = 0, {}
    for b in sorted(set(bins.values())):  # candidates of bin b follow those of the lower bins
        offset[b] = start - (int(cum[b - 1]) if b > 0 else 0)
        start += int(s.hist[b])
    value = {r: float(ordered[r + offset[b]]) for r, b in bins.items()}
    quantiles = []
    if len(q):
        lo = torch.log10(torch.tensor([value[int(r)] for r in below], dtype=torch.float32).double())
        hi = torch.log10(torch.tensor([value[int(r)] for r in above], dtype=torch.float32).double())
        quantiles = torch.lerp(lo, hi, ranks - below).tolist()
    tops = []
    for k in ks:
        if k == 0:
            tops.append((math.inf, flat.numel()))
            continue
        t, b = value[p - k], bins[p - k]
        inside = (vals.view(torch.int32) >> 16) == b
        n_above = p - int(cum[b]) + int((vals[inside] > t).sum())
        tied = idx[inside & (vals == t)]
        tops.append((t, int(tied[tied.numel() - (k - n_above)])))
    return quantiles, tops


def log10_quantiles(v: torch.Tensor, s: MomentSummary, levels: Sequence[float]) -> list[float]:
    """Quantiles of ``log10 v`` over the positive entries (see :func:`order_selections`).

    Examples
    --------
    >>> v = torch.tensor([0.0, 1e-8, 1e-6, 1e-4, 1e-2])
    >>> [round(x, 6) for x in log10_quantiles(v, moment_sweep(v), [0.5, 0.25])]
    [-5.0, -6.5]
    """
    return order_selections(v, s, levels)[0]


def top_sets(v: torch.Tensor, s: MomentSummary, ks: Sequence[int]) -> list[tuple[float, int]]:
    """The top-``k`` sets of ``v`` as ``(threshold, cut)`` (see :func:`order_selections`).

    Examples
    --------
    >>> v = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0])
    >>> top_sets(v, moment_sweep(v), [2, 0])
    [(3.0, 2), (inf, 5)]
    """
    return order_selections(v, s, (), ks)[1]
