"""Top-k selection, exact and fast, on whole tensors or block by block.

Every selection in curvlens keeps exactly ``k`` entries: everything above the
``k``-th largest score, and of the entries equal to it the first ones in flat
order (:func:`select_mask`). bf16-derived scores tie by the million, so ties are
counted, never sorted: :func:`kth_largest` and :func:`kth_largest_blocked` find
the ``k``-th largest with sample-select, :class:`TopKKeeper` hands the mask out
block by block, and :func:`at_least` / :func:`above` build fp32 masks with float
ops (on a CPU, bool tensors cost 3-5x).
"""
from __future__ import annotations

import functools
import math

import torch

from curvlens.errors import CurvlensError
from curvlens.math.blocks import blocks
from curvlens.math.checks import float_tensor
from curvlens.math.saliency import check_threshold

__all__ = ["kth_largest", "kth_largest_blocked", "sample_bracket", "TopKKeeper", "topk_mask", "select_mask",
           "at_least", "above"]


def kth_largest(flat: torch.Tensor, k: int, *, sample: int = 1 << 14) -> torch.Tensor:
    """The exact ``k``-th largest entry of a 1-D tensor, as a 0-d tensor.

    Large tensors use sample-select: a seeded sample brackets the answer between
    two sample quantiles, one counting pass finds how many entries lie above the
    bracket, and ``kthvalue`` runs only on the few entries inside it. The result is
    exact (a bracket that misses falls back to a full ``kthvalue``); on a
    32M-entry tensor it is several times faster than ``kthvalue`` alone.

    Examples
    --------
    >>> kth_largest(torch.tensor([0.1, 3.0, 2.0, 0.5]), 2)
    tensor(2.)
    """
    n = flat.numel()
    if not 1 <= k <= n:
        raise CurvlensError(f"k must be in [1, {n}]; got {k}")
    if n <= 64 * sample:
        return torch.kthvalue(flat, n - k + 1).values
    gen = torch.Generator(device=flat.device).manual_seed(n)
    idx = torch.randint(0, n, (sample,), generator=gen, device=flat.device)
    lo, hi = sample_bracket(torch.sort(flat[idx]).values, n, k)
    above = int(torch.count_nonzero(flat > hi))  # count_nonzero: ~6x a bool sum()
    inside = flat[(flat >= lo) & (flat <= hi)]
    r = k - above  # rank of the answer among the bracketed entries, from the top
    if 1 <= r <= inside.numel():
        return torch.kthvalue(inside, inside.numel() - r + 1).values
    return torch.kthvalue(flat, n - k + 1).values


@functools.lru_cache(maxsize=256)
def _fp32_cut(t: float, inclusive: bool) -> float | None:
    """The fp32 value ``c`` with ``x > c`` equivalent to ``x >= t`` (inclusive) or
    ``x > t`` for fp32 ``x >= 0``; None when every such ``x`` passes."""
    t32 = torch.tensor(float(t), dtype=torch.float32)
    if inclusive:
        if float(t32) <= 0:
            return None
        return float(torch.nextafter(t32, torch.tensor(0.0)))
    return None if float(t32) < 0 else float(t32)


def _mask_above(scores: torch.Tensor, cut: float | None) -> torch.Tensor:
    if cut is None:
        return torch.ones_like(scores, dtype=torch.float32)
    return torch.sign(torch.nn.functional.threshold(scores, cut, 0.0))


def at_least(scores: torch.Tensor, t: float) -> torch.Tensor:
    """fp32 mask, 1.0 where ``scores >= t``, for **nonnegative** scores.

    Built from float ops (``threshold`` then ``sign``): on a CPU a comparison that
    makes a bool tensor, and every op that reads one, costs 3-5x a float op, and
    these masks are made for every block of every tensor.

    Examples
    --------
    >>> at_least(torch.tensor([0.0, 1.0, 2.0, 3.0]), 2.0)
    tensor([0., 0., 1., 1.])
    >>> at_least(torch.tensor([0.0, 1.0]), 0.0)
    tensor([1., 1.])
    """
    return _mask_above(scores, _fp32_cut(float(t), True))


def above(scores: torch.Tensor, t: float) -> torch.Tensor:
    """fp32 mask, 1.0 where ``scores > t``, for **nonnegative** scores (see
    :func:`at_least`).

    Examples
    --------
    >>> above(torch.tensor([0.0, 1.0, 2.0, 3.0]), 2.0)
    tensor([0., 0., 0., 1.])
    """
    return _mask_above(scores, _fp32_cut(float(t), False))


def sample_bracket(sorted_sample: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two values of a sorted uniform sample of ``n`` entries that bracket their
    ``k``-th largest with overwhelming probability (the sample quantile ``1 - k/n``
    +- about 6 standard errors). A bracket reaching past the sample's ends is open
    there (-inf / +inf): entries beyond the sampled extremes may hold the answer.

    Examples
    --------
    >>> lo, hi = sample_bracket(torch.arange(1000.0), 10_000, 5_000)
    >>> bool(lo < 500.0 < hi)
    True
    """
    sample = sorted_sample.numel()
    q = 1.0 - k / n
    half = 6.0 * (q * (1.0 - q) / sample) ** 0.5 + 2.0 / sample
    lo_i, hi_i = int((q - half) * sample), int((q + half) * sample) + 1
    dev = sorted_sample.device
    lo = sorted_sample[lo_i] if lo_i > 0 else torch.tensor(-math.inf, device=dev)
    hi = sorted_sample[hi_i] if hi_i < sample - 1 else torch.tensor(math.inf, device=dev)
    return lo, hi


def kth_largest_blocked(score, n: int, k: int, size: int, *, nonnegative: bool = False,
                        sample: int = 1 << 14) -> tuple[torch.Tensor, int, int]:
    """The exact ``k``-th largest of ``n`` scores produced block by block.

    Like :func:`kth_largest`, but the scores are never held all at once:
    ``score(ix)`` returns the fp32 scores at ``ix`` (a slice, or an index tensor
    for the sample), so a caller can compute them from bf16 inputs one cache-sized
    block at a time. One pass counts the entries above a sampled bracket and
    keeps the few inside it; a bracket that misses (probability ~1e-9) costs a
    second, whole-tensor pass.

    Parameters
    ----------
    score : callable
        ``score(ix) -> 1-D fp32 tensor`` for ``ix`` a slice of ``range(n)`` or a
        1-D int64 index tensor.
    n, k : int
        Number of entries and rank from the top (``1 <= k <= n``).
    size : int
        Block length (see :mod:`curvlens.math.blocks`).
    nonnegative : bool
        The scores are never negative (magnitudes, saliencies): allows faster
        float-op counting.

    Returns
    -------
    kth : torch.Tensor
        0-d tensor, the ``k``-th largest score.
    above : int
        How many scores are strictly larger (so ``k - above`` entries equal to
        ``kth`` complete the top ``k``).
    equal : list of int
        How many scores equal ``kth`` in each block (for :class:`TopKKeeper`).

    Examples
    --------
    >>> x = torch.tensor([0.1, 3.0, 2.0, 0.5, 2.0])
    >>> kth_largest_blocked(lambda ix: x[ix], 5, 3, size=2)
    (tensor(2.), 1, [0, 1, 1])
    """
    if not 1 <= k <= n:
        raise CurvlensError(f"k must be in [1, {n}]; got {k}")
    if n > 8 * sample:  # else one block-sized selection is cheaper than a pass
        gen = torch.Generator(device="cpu").manual_seed(n)
        idx = torch.randint(0, n, (sample,), generator=gen)
        lo, hi = sample_bracket(torch.sort(score(idx)).values, n, k)
        found = (_select_point(score, n, k, size, hi, nonnegative) if bool(lo == hi)
                 else _select_bracket(score, n, k, size, lo, hi, nonnegative))
        if found is not None:
            return found
    flat = score(slice(0, n))
    kth = kth_largest(flat, k, sample=sample)
    equal = [int(torch.count_nonzero(flat[sl] == kth)) for sl in blocks(n, size)]
    return kth, int(torch.count_nonzero(flat > kth)), equal


def _count(a: torch.Tensor, t: torch.Tensor, inclusive: bool, nonnegative: bool) -> int:
    """Entries of ``a`` above ``t`` (or at least ``t``). For nonnegative scores a
    float-op mask summed in fp32 (exact: a block has at most 2**24 entries), ~2x
    cheaper than counting a bool comparison."""
    if nonnegative:
        return int((at_least(a, float(t)) if inclusive else above(a, float(t))).sum())
    return int(torch.count_nonzero(a >= t if inclusive else a > t))


def _select_point(score, n, k, size, t, nonnegative):
    """The bracket is one value (heavy ties, as in bf16-derived scores): two counts
    per block decide, with nothing extracted."""
    above_t, equal = 0, []
    for sl in blocks(n, size):
        a = score(sl)
        gt = _count(a, t, False, nonnegative)
        above_t += gt
        equal.append(_count(a, t, True, nonnegative) - gt)
    return (t, above_t, equal) if 1 <= k - above_t <= sum(equal) else None


def _select_bracket(score, n, k, size, lo, hi, nonnegative):
    """Count the entries above ``hi``, pull out those in ``[lo, hi]`` and select
    among them. Ties at the bracket's ends are counted rather than selected, so a
    value shared by millions of entries costs a comparison, not a ``kthvalue``."""
    above_hi, inside = 0, []
    for sl in blocks(n, size):
        a = score(sl)
        if nonnegative:  # float masks: the "above hi" mask serves the count and the bracket
            over = above(a, float(hi))
            above_hi += int(over.sum())
            inside.append(a[(at_least(a, float(lo)) - over).bool()])
        else:
            above_hi += int(torch.count_nonzero(a > hi))
            inside.append(a[(a >= lo) & (a <= hi)])
    pooled = torch.cat(inside)
    r = k - above_hi  # rank of the answer among the pooled entries, from the top
    if not 1 <= r <= pooled.numel():
        return None
    n_hi = int(torch.count_nonzero(pooled == hi))
    n_lo = int(torch.count_nonzero(pooled == lo))
    if r <= n_hi:
        kth = hi
    elif r > pooled.numel() - n_lo:
        kth = lo
    else:
        strict = pooled[(pooled > lo) & (pooled < hi)]
        kth = torch.kthvalue(strict, strict.numel() - (r - n_hi) + 1).values
    equal = [int(torch.count_nonzero(part == kth)) for part in inside]
    return kth, above_hi + int(torch.count_nonzero(pooled > kth)), equal


class TopKKeeper:
    """The top-``k`` mask of one tensor of **nonnegative** scores, handed out
    block by block in index order, as fp32 0/1 masks (see :func:`at_least`).

    Entries above ``kth`` are kept; of the entries equal to it, the first
    ``ties = k - above`` in index order are (the tie rule of :func:`topk_mask`).
    Blocks must be asked for in order, each once; :meth:`reset` starts over.
    Given ``equal``, the count of entries equal to ``kth`` per block (from
    :func:`kth_largest_blocked`), the keeper knows beforehand which blocks keep
    all, none or some of their ties, and only the one block that keeps some
    looks for them.

    Examples
    --------
    >>> keeper = TopKKeeper(torch.tensor(2.0), ties=1)
    >>> keeper(torch.tensor([2.0, 3.0])), keeper(torch.tensor([2.0, 0.0]))
    (tensor([1., 1.]), tensor([0., 0.]))
    """

    def __init__(self, kth: torch.Tensor, ties: int, equal: list[int] | None = None):
        self.kth, self.ties = float(kth), int(ties)
        self.quota = None
        if equal is not None:  # ties kept in each block, lowest indices first
            left, self.quota = self.ties, []
            for c in equal:
                self.quota.append(min(c, left))
                left -= self.quota[-1]
            self.equal = list(equal)
        self.reset()

    def reset(self) -> None:
        self.remaining = self.ties
        self.block = 0

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        if self.quota is not None:
            j = self.block
            self.block += 1
            if self.quota[j] == self.equal[j]:
                return at_least(scores, self.kth)
            if self.quota[j] == 0:
                return above(scores, self.kth)
            self.remaining = self.quota[j]  # the one block that keeps some ties
        if self.remaining <= 0:
            return above(scores, self.kth)
        keep = at_least(scores, self.kth)
        tied = torch.nonzero(scores == self.kth).flatten()
        if tied.numel() <= self.remaining:  # every tie in this block still fits
            self.remaining -= tied.numel()
            return keep
        keep[tied[self.remaining:]] = 0.0
        self.remaining = 0
        return keep


def topk_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``k`` highest-scoring entries of one tensor.

    ``k = max(1, int(density * numel))`` for ``0 < density < 1``, exactly as
    mergekit 0.1.5's magnitude sparsification (a positive density always keeps
    at least one entry); ``density >= 1`` keeps everything and ``density == 0``
    nothing. Entries are selected with ``torch.kthvalue``; among entries equal to the
    k-th largest score the lowest indices are kept (mergekit's argsort breaks such
    ties in an unspecified order).

    Parameters
    ----------
    scores : torch.Tensor
        Any floating-point tensor (``saliency`` or ``magnitude_scores``).
    density : float
        Fraction of entries to keep, in ``[0, 1]``.

    Returns
    -------
    torch.Tensor
        bool tensor of ``scores``' shape.

    Examples
    --------
    >>> topk_mask(torch.tensor([0.1, 3.0, 2.0, 0.5]), 0.5)
    tensor([False,  True,  True, False])
    >>> topk_mask(torch.tensor([0.1, 3.0, 2.0, 0.5]), 0.1)  # int(0.4) = 0, kept 1
    tensor([False,  True, False, False])
    """
    scores = float_tensor("scores", scores)
    d = check_threshold("density", density)
    if not 0.0 <= d <= 1.0:
        raise CurvlensError(f"density must be in [0, 1]; got {density!r}")
    n = scores.numel()
    if d >= 1.0:
        return torch.ones_like(scores, dtype=torch.bool)
    if d == 0.0 or n == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    k = max(1, int(d * n))
    flat = scores.reshape(-1).float()
    # Selection, not sorting: kthvalue is O(n) where mergekit's argsort is
    # O(n log n) (0.7 s vs 5 s for a 32M-entry tensor on 2 cores). Entries above
    # the k-th largest value are kept; if several entries equal it and only some
    # fit, the lowest indices are kept. That is deterministic on every device,
    # whereas mergekit's choice among equal scores follows its unstable sort (and
    # differs between its CPU and GPU runs); without such a split tie the masks
    # are identical.
    kth = kth_largest(flat, k)
    return select_mask(scores, kth, k - int(torch.count_nonzero(flat > kth)))


def select_mask(scores: torch.Tensor, kth, ties: int | None) -> torch.Tensor:
    """The top-k rule applied: entries above ``kth``, and of the entries equal to
    it the first ``ties`` in flat (row-major) order (``None``: all of them).

    This is the one tie rule of every selection in curvlens: per tensor
    (:func:`topk_mask`) and model-wide, where ``ties`` is the tensor's share of
    the model's tied entries in tensor order
    (:func:`curvlens.passes.thresholds.model_selections`).

    Examples
    --------
    >>> select_mask(torch.tensor([2.0, 3.0, 2.0, 2.0]), 2.0, 1)
    tensor([ True,  True, False, False])
    >>> select_mask(torch.tensor([2.0, 3.0, 2.0, 2.0]), 2.0, None)
    tensor([True, True, True, True])
    """
    flat = scores.reshape(-1)
    kth = float(kth)
    if ties is None:
        return (flat >= kth).reshape(scores.shape)
    mask = flat > kth
    if ties > 0:
        tied = torch.nonzero(flat == kth).flatten()
        if tied.numel() < ties:
            raise CurvlensError(f"{ties} tied entries to keep but only {tied.numel()} equal the threshold "
                                f"{kth!r}; were the scores computed differently?")
        mask[tied[:ties]] = True
    return mask.reshape(scores.shape)
