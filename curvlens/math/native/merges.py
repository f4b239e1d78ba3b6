"""The merge kernels of ``merges.c``, called on whole tensors.

Each function returns None when the kernel cannot take its inputs (no compiled
library, a tensor not on the CPU, not contiguous, or not fp32, bf16 or fp16, or
an input holding a NaN, an infinity or, for OTA, a negative moment): the caller
then runs its torch code, which makes the same values, or refuses the input with
its own message. Where a kernel runs, its result is bit-identical to the torch
code's (``tests/math/test_native_merges.py``).
"""
from __future__ import annotations

import ctypes
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from curvlens.math import native
from curvlens.math.blocks import BLOCK
from curvlens.runtime import background_enabled, side_by_side

__all__ = ["MaskedMerge", "ota_merge", "ties_merge", "kth_largest_magnitude"]

#: Entries per kernel call of the OTA merge: its v**p blocks (torch.pow, the
#: torch code's own operation, so the same bits) stay in cache.
OTA_CHUNK = 1 << 18
#: The torch code's block; OTA_CHUNK is a multiple of it.
POW_BLOCK = BLOCK["cpu"]


@dataclass
class MaskedMerge:
    """A kernel's merged tensor (fp32, the inputs' shape) and its mask counts."""

    out: torch.Tensor
    kept: list[int]
    any_kept: int
    remaining: list[int]  # tie quotas left per expert (-1: every tie was kept)


def _ready(*tensors: torch.Tensor) -> bool:
    return native.available(*tensors)


def _i64(values) -> torch.Tensor:
    return torch.tensor([int(x) for x in values], dtype=torch.int64)


def _masks(masks: Sequence[tuple[float, int] | None]):
    on = torch.tensor([int(m is not None) for m in masks], dtype=torch.int32)
    thr = torch.tensor([m[0] if m is not None else 0.0 for m in masks], dtype=torch.float32)
    quota = _i64(m[1] if m is not None else -1 for m in masks)
    return on, thr, quota


def ota_merge(base: torch.Tensor, experts: Sequence[torch.Tensor], moments: Sequence[torch.Tensor], *,
              power: float, scaling: Sequence[float], eps: float, masks: Sequence[tuple[float, int] | None],
              cut: float, fallback_to_base: bool, split: bool | None = None) -> MaskedMerge | None:
    """OTA's ``combine='precond'`` merge with a base (see ``cl_ota_merge``).

    ``masks[i]`` is ``(threshold, tie quota)`` (quota -1: every tie kept) or None
    (no mask); ``cut`` the fp32 weight sum at or below which an entry counts as
    masked by every expert. ``v**power`` is torch's (``torch.pow`` on a CPU is not
    correctly rounded: its sqrt differs from IEEE's in the last bit for about a
    sixth of the entries), one cache-sized chunk at a time.

    ``split`` (default: on a CPU with a second core, see
    :func:`curvlens.runtime.background_enabled`, and at least two chunks) hands
    the second half of the chunks to a helper thread, which the caller takes
    back if the helper has not started it (:class:`curvlens.runtime.Background`).
    Every entry's value is the same either way; a tie quota is handed out in flat
    order, so the second half first assumes the whole quota is left and is run
    again, after the first, in the one case where that kept too many ties.
    """
    if not _ready(base, *experts, *moments):
        return None
    n = base.numel()
    on, thr, quota = _masks(masks)
    job = _OtaJob(base, experts, moments, power, scaling, eps, on, thr, cut, fallback_to_base)
    if split is None:
        split = background_enabled(torch.device("cpu"))
    mid = -(-n // (2 * OTA_CHUNK)) * OTA_CHUNK  # chunk-aligned: the same torch.pow calls as unsplit
    if not split or mid >= n:
        part = job.run(0, n, quota)
        if part.bad:
            return None
        return MaskedMerge(job.out.reshape(base.shape), part.kept.tolist(), part.any_kept, part.quota.tolist())
    first, second = side_by_side(lambda: job.run(0, mid, quota), lambda: job.run(mid, n, quota))
    if first.bad or second.bad:
        return None
    used = quota - second.quota  # ties the second half kept, assuming the whole quota was left
    if bool(((quota >= 0) & (used > first.quota)).any()):  # the first half left fewer: redo with what it left
        second = job.run(mid, n, first.quota)
        if second.bad:
            return None
        left = second.quota
    else:
        left = torch.where(quota >= 0, first.quota - used, quota)
    kept = first.kept + second.kept
    return MaskedMerge(job.out.reshape(base.shape), kept.tolist(), first.any_kept + second.any_kept, left.tolist())


@dataclass
class _Part:
    """One range's mask counts: kept per expert, entries some expert kept, tie
    quotas left after it, whether an input was bad (non-finite or a negative moment)."""

    kept: torch.Tensor
    any_kept: int
    quota: torch.Tensor
    bad: bool


class _OtaJob:
    """The arguments of one OTA merge; :meth:`run` merges a range of entries into
    ``out`` (ranges are disjoint, so two threads may run two)."""

    def __init__(self, base, experts, moments, power, scaling, eps, on, thr, cut, fallback):
        self.ne, n = len(experts), base.numel()
        self.flat_b, self.flat_x = base.reshape(-1), [x.reshape(-1) for x in experts]
        self.flat_v = [v.reshape(-1) for v in moments]
        self.out = torch.empty(n, dtype=torch.float32)
        self.power, self.eps, self.on, self.thr, self.cut, self.fallback = power, eps, on, thr, cut, fallback
        self.scale = torch.tensor([float(s) for s in scaling], dtype=torch.float32)
        self.bdt = native.dtype_code(base)
        self.xdt = torch.tensor([native.dtype_code(x) for x in experts], dtype=torch.int32)
        self.vdt = torch.tensor([native.dtype_code(v) for v in moments], dtype=torch.int32)

    def run(self, lo: int, hi: int, quota: torch.Tensor) -> _Part:
        quota = quota.clone()  # the kernel takes tie quotas from it
        ne = self.ne
        kept, any_kept, bad = torch.zeros(ne, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), \
            torch.zeros(1, dtype=torch.int32)
        pws = [torch.empty(min(hi - lo, OTA_CHUNK), dtype=torch.float32) for _ in range(ne)]
        fn = native.lib().cl_ota_merge
        for s0 in range(lo, hi, OTA_CHUNK):
            s1 = min(hi, s0 + OTA_CHUNK)
            vs = [v[s0:s1] for v in self.flat_v]
            for v, w in zip(vs, pws):
                # in the torch code's blocks: its pow's vector loop and tail give other
                # bits for some powers (0.7, not 0.5), so the same calls
                for a in range(0, s1 - s0, POW_BLOCK):
                    e = min(s1 - s0, a + POW_BLOCK)
                    torch.pow(v[a:e].float(), self.power, out=w[a:e])
            fn(self.flat_b[s0:s1].data_ptr(), self.bdt, native.ptr_array([x[s0:s1] for x in self.flat_x]),
               self.xdt.data_ptr(), native.ptr_array(vs), self.vdt.data_ptr(), native.ptr_array(pws), ne, s1 - s0,
               self.scale.data_ptr(), float(self.eps), self.on.data_ptr(), self.thr.data_ptr(), quota.data_ptr(),
               float(self.cut), int(bool(self.fallback)), self.out[s0:s1].data_ptr(), kept.data_ptr(),
               any_kept.data_ptr(), bad.data_ptr())
            if int(bad):
                break
        return _Part(kept, int(any_kept), quota, bool(int(bad)))


def ties_merge(base: torch.Tensor, experts: Sequence[torch.Tensor], *, masks: Sequence[tuple[float, int] | None],
               weights: Sequence[float] | None, normalize: bool, lam: float) -> MaskedMerge | None:
    """TIES's sign-consensus merge of magnitude-masked task vectors (see
    ``cl_ties_merge``); ``weights`` None for unit weights."""
    if len(experts) > 16 or not _ready(base, *experts):
        return None
    ne, n = len(experts), base.numel()
    on, thr, quota = _masks(masks)
    out = torch.empty(base.shape, dtype=torch.float32)
    kept, any_kept, bad = torch.zeros(ne, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), \
        torch.zeros(1, dtype=torch.int32)
    w = None if weights is None else torch.tensor([float(x) for x in weights], dtype=torch.float32)
    xdt = torch.tensor([native.dtype_code(x) for x in experts], dtype=torch.int32)
    native.lib().cl_ties_merge(base.data_ptr(), native.dtype_code(base), native.ptr_array(experts), xdt.data_ptr(),
                               ne, n, on.data_ptr(), thr.data_ptr(), quota.data_ptr(), native.ptr(w),
                               int(bool(normalize)), float(lam), out.data_ptr(), kept.data_ptr(),
                               any_kept.data_ptr(), bad.data_ptr())
    if int(bad):
        return None
    return MaskedMerge(out, kept.tolist(), int(any_kept), quota.tolist())


def kth_largest_magnitude(base: torch.Tensor, expert: torch.Tensor, k: int) -> tuple[float, int, int] | None:
    """The ``k``-th largest ``|expert - base|`` (fp32, as torch computes it) over
    the tensor, how many entries are above it and how many equal it. None when
    the kernels cannot take the tensors or a difference is not finite.

    A strided sample brackets the answer and one sweep counts the entries above
    the bracket and keeps those inside, among which the answer is selected
    exactly; a bracket that misses (the sample is only a guess) is replaced by
    two sweeps over the bit patterns (a histogram of their top halves, then
    exact counts in the one bin holding the answer). Exact either way.
    """
    if not _ready(base, expert):
        return None
    n = base.numel()
    if not 1 <= k <= n:
        return None
    if n < BRACKET_MIN:  # small (norms, biases): torch's own top-k costs less than any sweep
        s = (expert.reshape(-1).float() - base.reshape(-1).float()).abs()
        if not bool(torch.isfinite(s).all()):
            return None
        kth = torch.topk(s, k, sorted=False).values.min()
        return float(kth), int((s > kth).sum()), int((s == kth).sum())
    found = _bracketed(base, expert, k)
    if found is not None:
        return None if found == "bad" else found
    return _by_histogram(base, expert, k)


#: Tensors from this size on are bracketed from a sample first.
BRACKET_MIN = 1 << 17
_SAMPLE = 1 << 14
_KERNEL_BLOCK = 512  # merges.c's MB: the bracket kernel stores values a block at a time


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.numpy().view(np.uint32)


def _bracketed(base: torch.Tensor, expert: torch.Tensor, k: int):
    n = base.numel()
    fb, fx = base.reshape(-1), expert.reshape(-1)
    idx = torch.linspace(0, n - 1, _SAMPLE, dtype=torch.float64).long()
    sample = np.sort(_bits((fx[idx].float() - fb[idx].float()).abs()))[::-1]  # descending patterns
    m, p = len(sample), k / n
    margin = 6.0 * math.sqrt(m * p * (1.0 - p)) + 16.0
    hi_i, lo_i = math.floor(p * m - margin), math.ceil(p * m + margin)
    hi = 0x7F7FFFFF if hi_i < 0 else int(sample[hi_i])
    lo = 0 if lo_i >= m else int(sample[lo_i])
    if lo > hi:
        return None
    # room for the values inside as the sample counts them: bf16 task vectors tie
    # heavily (5% of an embedding's magnitudes can equal the answer), so the
    # bracket holds far more than its width in sample ranks
    cap = _room(n, int(np.count_nonzero((sample >= lo) & (sample <= hi))), m)
    for _ in range(2):
        buf = np.empty(cap, dtype=np.uint32)
        above, bad = np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64)
        inside = native.lib().cl_mag_bracket(base.data_ptr(), native.dtype_code(base), expert.data_ptr(),
                                             native.dtype_code(expert), n, ctypes.c_uint32(lo), ctypes.c_uint32(hi),
                                             above.ctypes.data, buf.ctypes.data, cap, bad.ctypes.data)
        if int(bad[0]):
            return "bad"
        a = int(above[0])
        if not a < k <= a + inside:
            return None  # the sample's guess missed: the histogram decides
        if inside <= cap:
            break
        # the answer is inside but did not fit: one more sweep, with room for all
        # of them (the kernel counted them; a block's worth more, as it stores by blocks)
        cap = inside + _KERNEL_BLOCK
    else:
        return None
    vals = buf[:inside]
    t = k - a  # rank of the answer among the bracketed values, from the top
    kth_bits = np.partition(vals, inside - t)[inside - t]
    kth = float(np.array([kth_bits], dtype=np.uint32).view(np.float32)[0])
    return kth, a + int(np.count_nonzero(vals > kth_bits)), int(np.count_nonzero(vals == kth_bits))


def _room(n: int, n_in: int, m: int) -> int:
    """Values the bracketed sweep makes room for: the sample's share inside the
    bracket, with a margin."""
    return int(n * n_in / m * 1.5) + 4096


def _by_histogram(base: torch.Tensor, expert: torch.Tensor, k: int) -> tuple[float, int, int] | None:
    n = base.numel()
    lib, bd, xd = native.lib(), native.dtype_code(base), native.dtype_code(expert)
    hist = np.zeros(1 << 15, dtype=np.int64)  # bits >> 16 of a finite |x| is below 0x7f80
    bad = lib.cl_score_hist(base.data_ptr(), bd, expert.data_ptr(), xd, None, n, 16, hist.ctypes.data)
    if bad:
        return None
    bucket, above_bucket = _kth_bin(hist, k)
    counts = np.zeros(1 << 16, dtype=np.int64)
    lib.cl_score_bincount(base.data_ptr(), bd, expert.data_ptr(), xd, None, n, ctypes.c_uint32(bucket << 16),
                          ctypes.c_uint32(1 << 16), counts.ctypes.data)
    off, above_in = _kth_bin(counts, k - above_bucket)  # the answer's rank inside the bin
    kth = float(np.array([(bucket << 16) + off], dtype=np.uint32).view(np.float32)[0])
    return kth, above_bucket + above_in, int(counts[off])


def _kth_bin(counts: np.ndarray, k: int) -> tuple[int, int]:
    """The bin holding the ``k``-th largest of the counted values (bins ascending),
    and how many values lie in the bins above it."""
    from_top = np.cumsum(counts[::-1])
    j = int(np.searchsorted(from_top, k))  # first bin, from the top, reaching k
    return len(counts) - 1 - j, int(from_top[j - 1]) if j > 0 else 0
