"""A bounded-memory sketch for one model-wide top-k threshold.

FFG keeps, per expert, every entry whose saliency ``s = v * tau**2`` reaches one
threshold for the whole model, chosen so that a given fraction (the density) of all
entries is kept. Finding it exactly would need all saliencies of the model at once
(8B values); :class:`TopKSketch` streams them one tensor at a time into a fixed-size
histogram instead, and returns a threshold whose realised density is known exactly
and is within a stated bound of the target.

Why a histogram over float bit patterns: non-negative IEEE floats sort like their
bit patterns read as integers. Dropping the low mantissa bits (``bits >> 11`` keeps
8 exponent + 12 mantissa bits) gives 2**20 bins that cover every finite float32
from 0 to 3.4e38, each 2**-12 wide relative to its value: saliencies spanning
40 decades need no range to be guessed in advance. The histogram is 8 MB of int64
counts whatever the number of values.
"""
from __future__ import annotations

import math
import numbers

from dataclasses import dataclass

import torch

from curvlens.errors import CurvlensError
from curvlens.math import native
from curvlens.math.checks import float_tensor

__all__ = ["TopKSketch", "BinCounts", "ScoreSource", "top_count"]

_INF_BITS = 0x7F800000  # bit pattern of +inf in float32


@dataclass(frozen=True)
class ScoreSource:
    """The mask scores of one expert's tensor, not yet computed: ``v * tau**2``
    (``fisher``) or ``|tau|`` (``magnitude``) with ``tau = fp32(expert) -
    fp32(base)``, exactly as :func:`curvlens.math.saliency.scores_into` computes
    them. :meth:`TopKSketch.update` and :meth:`BinCounts.update` take it in place
    of the scores: on a CPU the C kernels then compute and bin each score in one
    sweep over the stored inputs, never materialising them.
    """

    base: torch.Tensor  # flat, contiguous, fp32, bf16 or fp16
    expert: torch.Tensor
    v: torch.Tensor | None  # flat fp32 (fisher) or None (magnitude)

    @classmethod
    def of(cls, base, expert, v, criterion: str) -> "ScoreSource | None":
        """A source when the C kernels can take these inputs, else None."""
        b, x = base.reshape(-1).contiguous(), expert.reshape(-1).contiguous()
        vv = None if criterion == "magnitude" else v.reshape(-1).contiguous()
        if vv is not None and vv.dtype != torch.float32:
            return None
        return cls(b, x, vv) if native.available(b, x, *([vv] if vv is not None else [])) else None

    def numel(self) -> int:
        return self.expert.numel()

    def args(self) -> tuple:
        b, x, v = self.base, self.expert, self.v
        return (b.data_ptr(), native.dtype_code(b), x.data_ptr(), native.dtype_code(x),
                v.data_ptr() if v is not None else None, x.numel())


class TopKSketch:
    """Streaming histogram of non-negative float32 values for top-k thresholds.

    Parameters
    ----------
    mantissa_bits : int
        Mantissa bits kept per bin, 0..16. Bins are ``2**-mantissa_bits`` wide
        relative to their value (normal floats) and there are
        ``2**(8 + mantissa_bits)`` of them; the default 12 gives 2**20 bins (8 MB).
    chunk_size : int
        Values converted and binned at a time inside :meth:`update`, bounding its
        temporary memory (about 12 bytes per value of a chunk).

    Notes
    -----
    Values are binned as float32 (bf16/fp16 are exact in float32; float64 inputs
    are rounded to float32 first). ``-0.0`` counts as ``0.0``. NaN, +-Inf and
    negative values raise a CurvlensError, and a failed update leaves the sketch
    unchanged. Counts live on the CPU; binning runs on the values' device.

    Examples
    --------
    >>> import torch
    >>> sk = TopKSketch()
    >>> _ = sk.update(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    >>> _ = sk.update(torch.tensor([4.0, 5.0, 6.0, 7.0]))
    >>> sk.threshold(0.25)  # keep the top 2 of 8: values >= 6
    (6.0, 2, 8, 0.125)
    """

    def __init__(self, mantissa_bits: int = 12, chunk_size: int = 1 << 24):
        if not (isinstance(mantissa_bits, int) and 0 <= mantissa_bits <= 16):
            raise CurvlensError(f"mantissa_bits must be an int in 0..16; got {mantissa_bits!r}")
        if not (isinstance(chunk_size, int) and chunk_size >= 1):
            raise CurvlensError(f"chunk_size must be a positive int; got {chunk_size!r}")
        self.mantissa_bits = mantissa_bits
        self.chunk_size = chunk_size
        self._shift = 23 - mantissa_bits
        # Non-negative float32 bit patterns are < 2**31, so this many bins cover all.
        self._counts = torch.zeros(1 << (31 - self._shift), dtype=torch.int64)
        self._cum = None  # cumulative counts, cached between updates for threshold()
        self.total = 0

    @property
    def n_bins(self) -> int:
        return self._counts.numel()

    @property
    def nbytes(self) -> int:
        """Memory held by the sketch's counts (independent of how many values it saw)."""
        return self._counts.numel() * self._counts.element_size()

    def __repr__(self) -> str:
        return f"TopKSketch(mantissa_bits={self.mantissa_bits}, total={self.total})"

    def update(self, values) -> "TopKSketch":
        """Add all entries of ``values`` (any shape, any float dtype, any device).

        Returns the sketch, so updates chain.

        Raises
        ------
        CurvlensError
            If ``values`` holds NaN, +-Inf or negative entries; nothing is added then.
        """
        if isinstance(values, ScoreSource):
            return self._update_source(values)
        values = float_tensor("values", values)
        flat = values.reshape(-1)
        n = flat.numel()
        if n == 0:
            return self
        # Accumulate here first and commit at the end, so a bad chunk leaves the
        # sketch unchanged. A dense bincount costs O(n_bins) (~10 ms on a CPU)
        # whatever the chunk size, so small chunks (norms, biases) go through
        # unique() + index_add_ instead, which costs O(chunk log chunk).
        dense = None
        sparse = []
        for start in range(0, n, self.chunk_size):
            c = flat[start:start + self.chunk_size].to(torch.float32)
            lo, hi = torch.aminmax(c)  # NaN propagates, so it fails the test too
            if not (float(lo) >= 0 and float(hi) < math.inf):  # float reductions: ~10x bool ops
                n_nan = int(torch.isnan(c).sum())
                n_inf = int(torch.isinf(c).sum())
                n_neg = int((c < 0).sum()) - int((c == -math.inf).sum())
                raise CurvlensError(
                    f"values must be finite and non-negative; a chunk of {c.numel()} "
                    f"entries (from offset {start}) holds {n_nan} NaN, {n_inf} Inf and "
                    f"{n_neg} negative entries")
            # Clearing the sign bit maps -0.0 to 0.0; everything else is already >= 0.
            bins = (c.contiguous().view(torch.int32) & 0x7FFFFFFF) >> self._shift
            if 8 * bins.numel() < self.n_bins:
                u, cnt = torch.unique(bins, return_counts=True)
                sparse.append((u.long().cpu(), cnt.cpu()))
            else:
                cnt = torch.bincount(bins, minlength=self.n_bins)
                dense = cnt if dense is None else dense.add_(cnt)
        if dense is not None:
            self._counts += dense.cpu()
        for u, cnt in sparse:
            self._counts.index_add_(0, u, cnt)
        self._cum = None
        self.total += n
        return self

    def _update_source(self, src: ScoreSource) -> "TopKSketch":
        """Bin the scores of ``src`` with the C kernel, straight into the counts."""
        bad = native.lib().cl_score_hist(*src.args(), self._shift, self._counts.data_ptr())
        if bad:
            undo = torch.zeros_like(self._counts)
            native.lib().cl_score_hist(*src.args(), self._shift, undo.data_ptr())
            self._counts -= undo
            raise CurvlensError(f"values must be finite and non-negative; {bad} of {src.numel()} scores are "
                                "NaN or Inf")
        self._cum = None
        self.total += src.numel()
        return self

    def merge(self, other: "TopKSketch") -> "TopKSketch":
        """Add the counts of ``other`` (e.g. from another process); returns self."""
        if not isinstance(other, TopKSketch):
            raise CurvlensError(f"can only merge a TopKSketch; got {type(other).__name__}")
        if other.mantissa_bits != self.mantissa_bits:
            raise CurvlensError(f"cannot merge sketches with mantissa_bits {self.mantissa_bits} "
                                f"and {other.mantissa_bits}; expected equal")
        self._counts += other._counts
        self._cum = None
        self.total += other.total
        return self

    def bin_edges(self, b: int) -> tuple[float, float]:
        """Lower and upper edge of bin ``b``: it holds the values in ``[lo, hi)``."""
        lo = torch.tensor([b << self._shift], dtype=torch.int32).view(torch.float32)
        hi_bits = (b + 1) << self._shift
        hi = (math.inf if hi_bits >= _INF_BITS
              else float(torch.tensor([hi_bits], dtype=torch.int32).view(torch.float32)))
        return float(lo), hi

    def bin_of(self, value: float) -> int:
        """The bin a non-negative float32 value falls into."""
        bits = int(torch.tensor([value], dtype=torch.float32).view(torch.int32)) & 0x7FFFFFFF
        return bits >> self._shift

    def locate(self, k: int) -> tuple[int, int, int]:
        """The bin holding the ``k``-th largest value seen (``1 <= k <= total``).

        Returns
        -------
        bin : int
        above : int
            Values in higher bins (all larger than every value in ``bin``).
        count : int
            Values in ``bin``; the answer is the ``k - above``-th largest of them.

        Examples
        --------
        >>> sk = TopKSketch().update(torch.tensor([1.0, 2.0, 2.0, 8.0]))
        >>> b, above, count = sk.locate(2)
        >>> sk.bin_edges(b)[0], above, count
        (2.0, 1, 2)
        """
        n = self.total
        if not (isinstance(k, int) and 1 <= k <= n):
            raise CurvlensError(f"k must be an int in [1, {n}]; got {k!r}")
        if self._cum is None:
            self._cum = self._counts.cumsum(0)
        b = int(torch.searchsorted(self._cum, torch.tensor(n - k), right=True))
        above = n - int(self._cum[b])
        return b, above, int(self._counts[b])

    def count_below_smallest_normal(self) -> int:
        """Values seen that are 0 (or subnormal, below ~1.2e-38): the bins under
        the smallest normal float32. A score there carries no information."""
        return int(self._counts[: self.bin_of(1.1754944e-38)].sum())

    def bin_counts(self, b: int) -> "BinCounts":
        """An exact counter of the distinct float32 values inside bin ``b``."""
        return BinCounts(b << self._shift, 1 << self._shift)

    def threshold(self, density: float) -> tuple[float, int, int, float]:
        """Threshold keeping (about) the top ``density`` fraction of all values seen.

        The target count is ``k = floor(density * N + 0.5)`` (round half up). The
        threshold is the lower edge of the bin in which the count from the top
        first reaches ``k``, so the exact ``k``-th largest value lies in
        ``[threshold, threshold * (1 + 2**-mantissa_bits))``.

        Parameters
        ----------
        density : float
            Target fraction kept, in [0, 1].

        Returns
        -------
        threshold : float
            Keep entries with ``value >= threshold`` (a float32 value, so the
            comparison is exact for float32 saliencies). ``inf`` when ``k == 0``;
            ``0.0`` (keep everything, zeros included) when ``k`` reaches into
            the zeros.
        kept_count : int
            Exact number of values seen that are ``>= threshold``.
        total_count : int
            Number of values seen, ``N``.
        max_abs_density_error : float
            Bound on ``|kept_count / N - density|``: the count of the threshold's
            bin over ``N`` (only that bin is split imprecisely); ``density``
            itself when ``k == 0``.

        Raises
        ------
        CurvlensError
            If the sketch is empty or ``density`` is outside [0, 1].
        """
        if not (isinstance(density, numbers.Real) and 0.0 <= density <= 1.0):
            raise CurvlensError(f"density must be a number in [0, 1]; got {density!r}")
        density = float(density)
        n = self.total
        if n == 0:
            raise CurvlensError("the sketch is empty: call update() with values first")
        k = math.floor(density * n + 0.5)
        if k == 0:
            return math.inf, 0, n, float(density)
        if self._cum is None:
            self._cum = self._counts.cumsum(0)  # cum[b] = number of values in bins <= b
        # Values in bins >= b number n - cum[b-1]; the last bin b where that still
        # reaches k is the number of cum entries <= n - k (cum is non-decreasing).
        b = int(torch.searchsorted(self._cum, torch.tensor(n - k), right=True))
        kept = n - (int(self._cum[b - 1]) if b > 0 else 0)
        return self.bin_edges(b)[0], kept, n, int(self._counts[b]) / n


class BinCounts:
    """Exact counts of every float32 value in one sketch bin, fed tensor by tensor.

    A :class:`TopKSketch` bin spans ``width`` consecutive float32 bit patterns
    (2048 by default), so counting each pattern exactly takes a fixed
    ``width``-long vector: a second streaming pass through the bin that holds
    the ``k``-th largest value turns the sketch's bracket into the exact value,
    however many entries share it (bf16-derived scores tie in millions).

    Examples
    --------
    >>> sk = TopKSketch().update(torch.tensor([1.0, 2.0, 2.0, 8.0]))
    >>> b, above, count = sk.locate(2)
    >>> bc = sk.bin_counts(b)
    >>> bc.update(torch.tensor([1.0, 2.0, 2.0, 8.0])).tolist()[:1]
    [2]
    """

    def __init__(self, lo_bits: int, width: int):
        self.lo_bits, self.width = int(lo_bits), int(width)
        self.lo = self.value(0)
        top = self.lo_bits + self.width
        self.hi = math.inf if top >= _INF_BITS else self.value(self.width)

    def update(self, values) -> torch.Tensor:
        """Counts (int64, length ``width``, on the CPU) of each value of the bin in
        ``values`` (non-negative floats, or a :class:`ScoreSource`; ``-0.0``
        counts as ``0.0``)."""
        if isinstance(values, ScoreSource):
            counts = torch.zeros(self.width, dtype=torch.int64)
            native.lib().cl_score_bincount(*values.args(), self.lo_bits, self.width, counts.data_ptr())
            return counts
        flat = values.reshape(-1).to(torch.float32)
        # two float compares over the chunk, bit arithmetic only on the few inside
        # (for values >= 0, floats and their bit patterns order alike)
        inside = flat[(flat >= self.lo) & (flat < self.hi)]
        off = (inside.contiguous().view(torch.int32) & 0x7FFFFFFF) - self.lo_bits
        return torch.bincount(off.long(), minlength=self.width).cpu()

    def value(self, offset: int) -> float:
        """The float32 value at ``offset`` in the bin."""
        return float(torch.tensor([self.lo_bits + int(offset)], dtype=torch.int32).view(torch.float32))


def top_count(counts: torch.Tensor, r: int) -> tuple[int, int]:
    """Where the ``r``-th largest entry falls in a count vector indexed by value.

    Returns ``(offset, above)``: the index holding it and how many entries lie at
    higher indices.

    Examples
    --------
    >>> top_count(torch.tensor([5, 0, 2, 1]), 2)  # values 3 (x1), 2 (x2), 0 (x5)
    (2, 1)
    """
    total = int(counts.sum())
    if not 1 <= r <= total:
        raise CurvlensError(f"r must be in [1, {total}]; got {r}")
    from_top = counts.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, torch.tensor(r)))  # first position reaching r
    offset = counts.numel() - 1 - j
    return offset, int(from_top[j - 1]) if j > 0 else 0
