"""Pair statistics of one tensor, every pair of experts in one sweep.

* :func:`overlap_sums`: of the experts' second moments, the sums behind the
  cosine, the Pearson correlation of ``log10(v + eps)`` over the entries either
  expert updated, and the top-set intersections (curvature overlap);
* :func:`tv_sums`: of their task vectors, the edit norms and, per pair, the
  sums behind the task-vector cosine, the sign conflicts and the
  curvature-weighted conflict (interference);
* :func:`weighted_sq_diff`: ``sum v (a - b)**2`` (the predicted loss).

Sums are float64. On a CPU they run in C (:mod:`curvlens.math.native`), a few
inputs in, one sweep over the entries, nothing materialised; elsewhere in torch,
in chunks. The two agree to float64 rounding (the tests check it).
"""
from __future__ import annotations

import ctypes
from typing import Sequence

import torch

from curvlens.errors import CurvlensError
from curvlens.math import native
from curvlens.runtime import background_enabled, side_by_side

__all__ = ["overlap_sums", "tv_sums", "weighted_sq_diff", "OVERLAP_KEYS", "TV_KEYS"]

#: Per pair, in order: support entries, scaled cross and self sums (cosine),
#: support sums of the logs (Pearson).
OVERLAP_KEYS = ("support", "sab", "saa", "sbb", "la", "lb", "laa", "lbb", "lab")
#: Per pair of task vectors, in order.
TV_KEYS = ("dot", "na", "nb", "both", "conflict", "mag", "mag_conflict", "curv", "curv_conflict")

_CHUNK = 1 << 22
_MAX_EXPERTS = 16
_MAX_PAIRS = 64
_OV_BLOCK = 512  # kernels.c's OV_B: the overlap sweep's blocks

#: Tensors from this size on have their overlap sweep split over two threads.
SPLIT_MIN = 1 << 18


def _i32(xs) -> ctypes.Array:
    arr = (ctypes.c_int32 * max(1, len(xs)))()
    for i, x in enumerate(xs):
        arr[i] = int(x)
    return arr


def overlap_sums(vs: Sequence[torch.Tensor], pairs: Sequence[tuple[int, int]], eps: float,
                 vmax: Sequence[float], tops: Sequence[Sequence[tuple[float, int]]],
                 split: bool | None = None) -> list[dict]:
    """Per pair ``(a, b)`` of moment tensors (flat fp32, same length): the sums
    of :data:`OVERLAP_KEYS` and ``inter``, the sizes of the intersections of the
    experts' top sets (``tops[e]``: ``(threshold, cut)`` per set, as
    :func:`curvlens.math.moment_sweep.top_sets` gives them).

    ``sab, saa, sbb`` are over all entries of ``v / vmax``; the log sums over the
    support (entries where either is positive) of ``log10(fp32(v + eps))``.

    Examples
    --------
    >>> v = [torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0.0, 2.0, 4.0])]
    >>> r = overlap_sums(v, [(0, 1)], 1e-30, [2.0, 4.0], [[(2.0, 0)], [(4.0, 0)]])[0]
    >>> r["support"], r["sab"], r["inter"]
    (2.0, 1.25, [1])

    ``split`` (default: on a CPU with a second core, see
    :func:`curvlens.runtime.background_enabled`, and at least
    :data:`SPLIT_MIN` entries) hands the second half of the C sweep's blocks to a
    helper thread, which writes each block's sums apart; they are then added
    after the first half's in block order, so every sum is the one-thread sweep's
    to the bit.
    """
    nf = len(tops[0]) if tops else 0
    flats = [v.reshape(-1).float().contiguous() for v in vs]
    n = flats[0].numel()
    thr = torch.tensor([t for per in tops for t, _ in per] or [0.0], dtype=torch.float32)
    cut = torch.tensor([c for per in tops for _, c in per] or [0], dtype=torch.int64)
    if native.available(*flats) and len(flats) <= _MAX_EXPERTS and nf <= 4:
        k = 9 + nf
        out = torch.zeros(max(1, len(pairs)) * k, dtype=torch.float64)
        vm = torch.tensor(list(vmax), dtype=torch.float64)
        lib, ptrs, pa, pb = native.lib(), native.ptr_array(flats), _i32([a for a, _ in pairs]), \
            _i32([b for _, b in pairs])

        def sweep(lo: int, hi: int, parts) -> None:
            lib.cl_overlap_sweep_range(ptrs, len(flats), lo, hi, float(eps), vm.data_ptr(), pa, pb, len(pairs),
                                       nf, thr.data_ptr(), cut.data_ptr(), out.data_ptr(), native.ptr(parts))

        blocks = -(-n // _OV_BLOCK)
        if split is None:
            split = n >= SPLIT_MIN and background_enabled(torch.device("cpu"))
        if not split or blocks < 2 or not pairs:
            sweep(0, n, None)
        else:
            mid = blocks // 2 * _OV_BLOCK  # block-aligned: the same blocks as one sweep
            parts = torch.empty((blocks - blocks // 2) * len(pairs) * k, dtype=torch.float64)
            side_by_side(lambda: sweep(0, mid, None), lambda: sweep(mid, n, parts))
            lib.cl_add_in_order(out.data_ptr(), parts.data_ptr(), blocks - blocks // 2, len(pairs) * k)
        rows = out.reshape(-1, k)[: len(pairs)].tolist()
        return [{**dict(zip(OVERLAP_KEYS, r[:9])), "inter": [int(x) for x in r[9:]]} for r in rows]
    return _overlap_torch(flats, pairs, eps, vmax, tops)


def _overlap_torch(flats, pairs, eps, vmax, tops) -> list[dict]:
    n, dev = flats[0].numel(), flats[0].device
    acc = [dict.fromkeys(OVERLAP_KEYS, 0.0) | {"inter": [0] * len(tops[0] if tops else [])} for _ in pairs]
    idx_all = torch.arange(n, device=dev)
    for s in range(0, max(n, 1), _CHUNK):
        sl = slice(s, min(n, s + _CHUNK))
        ix = idx_all[sl]
        sc = [f[sl].double() * (1.0 / m if m > 0 else 0.0) for f, m in zip(flats, vmax)]
        lg = [torch.log10((f[sl] + eps).double()) for f in flats]
        pos = [f[sl] > 0 for f in flats]
        top = [[(f[sl] > t) | ((f[sl] == t) & (ix >= c)) for t, c in per] for f, per in zip(flats, tops)]
        for r, (a, b) in zip(acc, pairs):
            sup = (pos[a] | pos[b]).double()
            u, w = lg[a] * sup, lg[b] * sup
            for key, val in zip(OVERLAP_KEYS, (sup.sum(), (sc[a] * sc[b]).sum(), (sc[a] ** 2).sum(),
                                               (sc[b] ** 2).sum(), u.sum(), w.sum(), (u * u).sum(),
                                               (w * w).sum(), (u * w).sum())):
                r[key] += float(val)
            r["inter"] = [x + int((ta & tb).sum()) for x, ta, tb in zip(r["inter"], top[a], top[b])]
    return acc


def tv_sums(base: torch.Tensor, weights: Sequence[torch.Tensor], n_edit: int,
            moments: Sequence[torch.Tensor] | None, pairs: Sequence[tuple[int, int, int | None, int | None]]
            ) -> tuple[float, list[float], list[dict]]:
    """Edit norms and pair sums of task vectors ``tau_i = weights[i] - base``.

    Returns ``(base_sq, delta_sq, per_pair)``: ``sum base**2``, ``sum tau_i**2``
    for the first ``n_edit`` weights (the difference taken in float64), and per
    pair ``(a, b, ma, mb)`` (weights ``a`` and ``b``, moments ``ma`` and ``mb``
    or None) the sums of :data:`TV_KEYS` over ``tau`` rounded to fp32 (as torch
    subtracts fp32 tensors) and widened: the dot product and squared norms, the
    entries where ``tau_a tau_b`` is non-zero / negative, ``|tau_a tau_b|`` over
    all / conflicting entries, and that times ``sqrt(v_a) sqrt(v_b)`` (0 without
    moments).

    Examples
    --------
    >>> b = torch.zeros(3)
    >>> bsq, dsq, (p,) = tv_sums(b, [torch.tensor([1.0, -1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])], 2,
    ...                          None, [(0, 1, None, None)])
    >>> dsq, p["dot"], p["conflict"], p["both"]
    ([6.0, 2.0], 0.0, 1.0, 2.0)
    """
    flats = [w.reshape(-1).contiguous() for w in weights]
    fb = base.reshape(-1).contiguous()
    vs = [v.reshape(-1).float().contiguous() for v in moments] if moments is not None else []
    if (native.available(fb, *flats, *vs) and len(flats) <= _MAX_EXPERTS and len(pairs) <= _MAX_PAIRS):
        ne = n_edit
        out = torch.zeros(1 + ne + 10 * max(1, len(pairs)), dtype=torch.float64)
        q = lambda x: -1 if x is None else x  # noqa: E731
        native.lib().cl_tv_sweep(fb.data_ptr(), native.dtype_code(fb), native.ptr_array(flats),
                                 _i32([native.dtype_code(f) for f in flats]), len(flats), ne,
                                 native.ptr_array(vs), fb.numel(), _i32([p[0] for p in pairs]),
                                 _i32([p[1] for p in pairs]), _i32([q(p[2]) for p in pairs]),
                                 _i32([q(p[3]) for p in pairs]), len(pairs), out.data_ptr())
        o = out.tolist()
        per = [dict(zip(TV_KEYS, o[1 + ne + 10 * i: 1 + ne + 10 * i + 9])) for i in range(len(pairs))]
        return o[0], o[1:1 + ne], per
    return _tv_torch(fb, flats, n_edit, vs, pairs)


def _tv_torch(fb, flats, n_edit, vs, pairs):
    n = fb.numel()
    bsq, dsq = 0.0, [0.0] * n_edit
    per = [dict.fromkeys(TV_KEYS, 0.0) for _ in pairs]
    for s in range(0, max(n, 1), _CHUNK):
        sl = slice(s, min(n, s + _CHUNK))
        b32, b64 = fb[sl].float(), fb[sl].double()
        bsq += float((b64 * b64).sum())
        taus = [(f[sl].float() - b32).double() for f in flats]
        for i in range(n_edit):
            d = flats[i][sl].double() - b64
            dsq[i] += float((d * d).sum())
        for r, (a, b, ma, mb) in zip(per, pairs):
            ta, tb = taus[a], taus[b]
            pr = ta * tb
            conf = (pr < 0).double()
            mag = pr.abs()
            vals = [pr.sum(), (ta * ta).sum(), (tb * tb).sum(), (pr != 0).double().sum(), conf.sum(),
                    mag.sum(), (mag * conf).sum()]
            if ma is not None and mb is not None:
                w = mag * vs[ma][sl].double().sqrt() * vs[mb][sl].double().sqrt()
                vals += [w.sum(), (w * conf).sum()]
            else:
                vals += [0.0, 0.0]
            for key, val in zip(TV_KEYS, vals):
                r[key] += float(val)
    return bsq, dsq, per


def weighted_sq_diff(v: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> float:
    """``sum v * (a - b)**2`` with the difference in float64; ``v`` None: ``sum (a - b)**2``
    (an edit's squared norm, without a float64 copy of either tensor).

    Examples
    --------
    >>> weighted_sq_diff(torch.tensor([1.0, 4.0, 0.5]), torch.tensor([2.0, 3.0, 4.0]), torch.tensor([1.0, 2.0, 3.0]))
    5.5
    >>> weighted_sq_diff(None, torch.tensor([2.0, 3.0, 4.0]), torch.tensor([1.0, 2.0, 3.0]))
    3.0
    """
    fa, fb = (t.reshape(-1).contiguous() for t in (a, b))
    if fa.numel() != fb.numel() or (v is not None and v.numel() != fa.numel()):
        raise CurvlensError(f"weighted_sq_diff: sizes differ ({None if v is None else v.numel()}, "
                         f"{fa.numel()}, {fb.numel()})")
    fv = None if v is None else v.reshape(-1).contiguous()
    fv = fv if fv is None or fv.dtype == torch.float32 else fv.float()
    if native.available(fa, fb, *([] if fv is None else [fv])):
        return native.lib().cl_wsq_diff(None if fv is None else fv.data_ptr(), fa.data_ptr(),
                                        native.dtype_code(fa), fb.data_ptr(), native.dtype_code(fb), fa.numel())
    total = 0.0
    for s in range(0, max(fa.numel(), 1), _CHUNK):
        sl = slice(s, s + _CHUNK)
        d = fa[sl].double() - fb[sl].double()
        d = d * d
        total += float((d if fv is None else fv[sl].double() * d).sum())
    return total
