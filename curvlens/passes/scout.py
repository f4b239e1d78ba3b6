"""Exact model-wide selections from ONE read of the scores' inputs, bracketed by a sample.

:func:`curvlens.passes.thresholds.model_selections` needs two full reads (a
histogram locates the bin of the ``k``-th largest score, a second read counts
inside it). Here a small sample comes first: ``sample`` entries per expert, read
as short runs (``chunk`` entries) at random places of every tensor with
``pread`` (:meth:`curvlens.io.checkpoint.Checkpoint.chunks`: a fraction of a
percent of the bytes of a large model). The sample brackets each ``k``-th largest
score in ``[lo, hi]``, wide enough that a miss is a many-standard-error event
(the standard error measured between the runs, so correlated entries within a
run widen it as they should). One full read then counts the scores above ``hi``
and every distinct float32 value in ``[lo, hi]`` exactly (a window of counters),
which gives the exact ``k``-th largest score and how many entries tie with it.
Which tied entries are kept (the first ones in model order, as everywhere) is
decided as the next pass meets each tensor (:class:`~curvlens.passes.thresholds.TieLedger`).

The result is the same selection as :func:`model_selections`, always: a bracket
that misses (or a window too wide for ``max_window`` counters) is detected, and
those selections are made the two-read way. The number of full reads taken is
returned.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from curvlens.errors import CurvlensError
from curvlens.math import native
from curvlens.math.blocks import tensor_seed
from curvlens.math.quantile import ScoreSource
from curvlens.passes.experts import Experts
from curvlens.runtime import Background, background_enabled, progress_bar, resolve_device
from curvlens.passes.thresholds import Selection, TieLedger, model_selections, selection_criteria

__all__ = ["scout_selections", "scout_sample", "partial_reads"]

_SMALLEST_NORMAL_BITS = 0x00800000

#: Sampled entries per expert and criterion. Measured on a 250M x 3 zoo (fisher and
#: magnitude, densities 0.1 and 0.3): 2**21 took 9.6 s in all, 2**20 5.7 s and
#: 2**19 5.4 s, with the full read's counters barely busier (177M, 185M, 199M
#: entries inside the brackets: most are ties of bf16 task vectors' magnitudes).
SAMPLE = 1 << 20


def partial_reads(experts: Experts, moments: bool = True) -> bool:
    """Whether a sample of every model (and moments file) can be read without
    reading the tensors (safetensors files, read by ``pread``)."""
    models = ([experts.base] if experts.base is not None else []) + [e.checkpoint for e in experts.experts]
    ok = all(m.partial_reads for m in models)
    if moments:
        ok = ok and all(e.moments is not None and e.moments.partial_reads for e in experts.experts)
    return ok


def _bits(x: float) -> int:
    return int(torch.tensor([x], dtype=torch.float32).view(torch.int32)) & 0x7FFFFFFF


def _value(bits: int) -> float:
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32))


def _scores(b: torch.Tensor, x: torch.Tensor, v: torch.Tensor | None, criterion: str) -> torch.Tensor:
    """The mask scores, in fp32 exactly as :func:`curvlens.math.saliency.scores_into`."""
    tau = x.float() - b.float()
    return torch.abs(tau) if criterion == "magnitude" else torch.mul(v.float(), tau.square())


def scout_sample(experts: Experts, criteria: Sequence[str], *, sample: int = SAMPLE, chunk: int = 256,
                 seed: int = 0, progress: bool = False) -> dict:
    """Sampled scores of every expert and criterion, in runs of ``chunk`` entries.

    Returns ``{(criterion, expert index): (scores, weights, run ids)}``: each
    sampled entry's score, the number of model entries it stands for, and which
    run it came from (-1: a tensor smaller than four runs, read whole, so known
    exactly).
    """
    names = experts.tensor_names(floating_only=True)
    ref = experts.reference
    numel = {n: ref.shape(n).numel() for n in names}
    total = sum(numel.values())
    fisher = "fisher" in criteria
    parts: dict = {(c, i): [] for c in criteria for i in range(len(experts))}
    run = 0
    bar = progress_bar(len(names), "selection: sample", progress)
    for n in names:
        size = numel[n]
        if size == 0:
            bar.update(1)
            continue
        if size <= 4 * chunk:
            starts, length = np.array([0]), size
        else:
            k = max(1, math.ceil(sample * size / total / chunk))
            rng = np.random.default_rng(tensor_seed(seed, n))
            starts, length = np.sort(rng.integers(0, size - chunk + 1, size=k)), chunk
        weight = size / (len(starts) * length)
        b = experts.base.chunks(n, starts, length)
        if length == size:  # read whole: no sampling error
            ids = np.full(size, -1)
        else:
            ids = np.repeat(np.arange(run, run + len(starts)), length)
            run += len(starts)
        for i, e in enumerate(experts.experts):
            x = e.checkpoint.chunks(n, starts, length)
            v = e.moments.chunks(n, starts, length) if fisher else None
            for c in criteria:
                s = _scores(b, x, v, c).reshape(-1)
                parts[c, i].append((s, np.full(s.numel(), weight), ids))
        bar.update(1)
    bar.close()
    out = {}
    for key, ps in parts.items():
        out[key] = (torch.cat([p[0] for p in ps]).double().numpy(), np.concatenate([p[1] for p in ps]),
                    np.concatenate([p[2] for p in ps]))
    return out


def _sorted(scores, weights, runs):
    """The sample in decreasing score order, with cumulative weight fractions."""
    order = _descending(scores)
    s, w, r = scores[order], weights[order], runs[order]
    return s, w, r, np.cumsum(w) / w.sum(), runs, weights


def _descending(scores: np.ndarray) -> np.ndarray:
    """Indices of ``scores`` (>= 0) in decreasing order; any order of equal scores
    brackets the same values.

    fp32 scores (every criterion's) are sorted by their bit patterns, sign
    cleared (-0.0 is 0.0), with torch's stable (radix) sort of 32-bit keys: on a
    million samples 0.01-0.02 s, against 0.08-0.10 s for numpy's stable sort of
    the same keys (the same order: both are stable) and 0.26 s for a quicksort
    of bf16 task vectors' magnitudes, which take only a few thousand values.
    """
    f = scores.astype(np.float32)
    if not np.array_equal(f, scores):  # not fp32 values (or NaN): the floats themselves
        return np.argsort(-scores)
    # descending magnitude = ascending ~bits as unsigned; flipping the top bit
    # makes that order the signed int32 order torch sorts
    keys = (~(f.view(np.uint32) & np.uint32(0x7FFFFFFF)) ^ np.uint32(0x80000000)).view(np.int32)
    return torch.sort(torch.from_numpy(keys), stable=True).indices.numpy()


def _bracket(sample, frac_above: float, z: float) -> tuple[float, float]:
    """Scores bracketing the value that ``frac_above`` of the model exceeds."""
    s, w, r, cum, runs, weights = sample
    pos = min(int(np.searchsorted(cum, frac_above)), len(s) - 1)
    # standard error of the fraction above the estimate, between the sampled runs
    # (a ratio estimate; tensors read whole add none)
    n_runs = int(runs.max()) + 1
    total_w = float(weights.sum())
    se = 0.0
    if n_runs > 0:
        top = r[: pos + 1]
        above_w = np.bincount(top[top >= 0], weights=w[: pos + 1][top >= 0], minlength=n_runs)
        run_w = np.bincount(runs[runs >= 0], weights=weights[runs >= 0], minlength=n_runs)
        used = run_w > 0
        p_hat = above_w.sum() / run_w.sum()
        dev = (above_w - p_hat * run_w)[used]
        se = math.sqrt(float((dev ** 2).sum()) * used.sum() / max(1, used.sum() - 1)) / total_w
    half = z * se + 4.0 / len(s)
    hi_i = int(np.searchsorted(cum, frac_above - half))  # a larger score: fewer entries above it
    lo_i = int(np.searchsorted(cum, frac_above + half)) + 1
    hi = math.inf if frac_above - half <= 0 else float(s[max(hi_i - 1, 0)])
    lo = 0.0 if frac_above + half >= 1 or lo_i >= len(s) else float(s[lo_i])
    return lo, hi


def scout_selections(experts: Experts, densities, criteria: Sequence[str] = ("fisher",), *, device="auto",
                     progress: bool = True, sample: int = SAMPLE, chunk: int = 256, z: float = 7.0,
                     max_window: int = 1 << 22) -> tuple[dict[tuple[str, str, float], Selection], int]:
    """The selections of :func:`model_selections` (same arguments, same result)
    from a sample and one full read. Returns ``(selections, full reads taken)``.

    Parameters
    ----------
    sample, chunk
        Sampled entries per expert and criterion, in runs of ``chunk``.
    z
        Bracket half-width in standard errors of the sampled fraction.
    max_window
        Most counters per selection (float32 values inside a bracket, 8 bytes
        each); a wider bracket falls back to the two-read selection.
    """
    criteria = selection_criteria(experts, criteria)
    wanted = _densities(experts, densities)
    dev = resolve_device(device)
    names = experts.tensor_names(floating_only=True)
    total = sum(experts.reference.shape(n).numel() for n in names)
    samples = {key: _sorted(*x) for key, x in
               scout_sample(experts, criteria, sample=sample, chunk=chunk, progress=progress).items()}
    plans, misses = {}, {}
    for c in criteria:
        for i, e in enumerate(experts.names):
            for d in wanted[i]:
                k = math.floor(d * total + 0.5)
                if k == 0:
                    continue
                lo, hi = _bracket(samples[c, i], k / total, z)
                lo_b, hi_b = _bits(lo), (0x7F7FFFFF if math.isinf(hi) else _bits(hi))
                if hi_b - lo_b + 1 > max_window:
                    misses[c, i, d] = "window"
                    continue
                plans[c, i, d] = (k, lo_b, hi_b, torch.zeros(hi_b - lo_b + 1, dtype=torch.int64), [0])
    _window_pass(experts, names, criteria, plans, dev, progress)
    out = {}
    for (c, i, d), (k, lo_b, hi_b, counts, above) in plans.items():
        sel = _resolve(experts.names[i], c, d, k, total, lo_b, counts, above[0])
        if sel is None:
            misses[c, i, d] = "bracket"
        else:
            out[c, experts.names[i], d] = sel
    for c in criteria:
        for i, e in enumerate(experts.names):
            for d in wanted[i]:
                if math.floor(d * total + 0.5) == 0:
                    out[c, e, d] = Selection(e, c, d, math.inf, 0, total, 0, None)
    reads = 1
    if misses:
        per = [sorted({d for (cc, ii, d) in misses if ii == i}) or [wanted[i][0]] for i in range(len(experts))]
        found = model_selections(experts, per, sorted({c for c, _, _ in misses}), device=dev, progress=progress)
        for (c, i, d) in misses:
            out[c, experts.names[i], d] = found[c, experts.names[i], d]
        reads += 2
    return out, reads


def _densities(experts: Experts, densities) -> list[list[float]]:
    n = len(experts)
    if isinstance(densities, Sequence) and not isinstance(densities, str):
        if len(densities) != n:
            raise CurvlensError(f"density has {len(densities)} entries but there are {n} experts")
        per = list(densities)
    else:
        per = [densities] * n
    out = []
    for name, d in zip(experts.names, per):
        ds = list(d) if isinstance(d, Sequence) and not isinstance(d, str) else [d]
        for x in ds:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 < float(x) <= 1.0:
                raise CurvlensError(f"density for expert {name!r} must be in (0, 1], got {x!r}")
        out.append(sorted({float(x) for x in ds}))
    return out


def _window_pass(experts: Experts, names, criteria, plans: dict, dev, progress: bool) -> None:
    """One read: per selection, the scores above its bracket and each value inside.

    Each expert's sweeps of a tensor touch only that expert's counters, so on a
    CPU with two cores they are shared with a second thread (the caller takes an
    expert whenever the helper is busy; see :class:`curvlens.runtime.Background`):
    the counts do not depend on which thread swept what.
    """
    by_expert: dict = {}  # expert -> criterion -> its plans
    for (c, i, d), plan in plans.items():
        by_expert.setdefault(i, {}).setdefault(c, []).append(plan)
    if not by_expert:
        return
    fisher = any("fisher" in by_c for by_c in by_expert.values())
    share = Background(background_enabled(dev), budget=1)
    try:
        for g in experts.iter_tensors(names, device=dev, dtype=None, moments=fisher, progress=progress,
                                      desc="selection 1/1"):
            for i, by_c in by_expert.items():
                share.submit(lambda g=g, i=i, by_c=by_c: _expert_windows(g, i, by_c), 1)
            share.results()
            del g
    finally:
        share.close()


def _expert_windows(g, i: int, by_c: dict) -> None:
    """Expert ``i``'s window counts of one tensor, for each criterion's plans."""
    if _both_criteria(g, i, by_c):
        return
    for c, ps in by_c.items():
        v = g.moments[i] if c == "fisher" else None
        src = ScoreSource.of(g.base, g.experts[i], v, c)
        if src is not None:
            nw, lo, hi, counts, above = _window_args(ps)
            native.lib().cl_score_windows(*src.args(), nw, lo.ctypes.data, hi.ctypes.data, counts,
                                          above.data_ptr())
            for p, a in zip(ps, above.tolist()):
                p[4][0] += a
            continue
        bits = _scores(g.base, g.experts[i], v, c).reshape(-1).view(torch.int32) & 0x7FFFFFFF
        for k, lo_b, hi_b, counts, above in ps:
            above[0] += int(torch.count_nonzero(bits > hi_b))
            inside = bits[(bits >= lo_b) & (bits <= hi_b)] - lo_b
            counts += torch.bincount(inside.long(), minlength=counts.numel()).cpu()


def _window_args(ps) -> tuple:
    """A group of window plans as the C kernels take them: (count, lo, hi, counter
    pointers, above)."""
    lo = np.array([p[1] for p in ps], dtype=np.uint32)
    hi = np.array([p[2] for p in ps], dtype=np.uint32)
    above = torch.zeros(len(ps), dtype=torch.int64)
    return (len(ps), lo, hi, native.ptr_array([p[3] for p in ps]), above)


def _both_criteria(g, i: int, by_c: dict) -> bool:
    """Whether one C sweep served expert ``i``'s fisher and magnitude windows
    (sharing the loads of base, expert and task vector)."""
    if "fisher" not in by_c or "magnitude" not in by_c:
        return False
    src = ScoreSource.of(g.base, g.experts[i], g.moments[i], "fisher")
    if src is None:
        return False
    ps, pm = by_c["fisher"], by_c["magnitude"]
    f, m = _window_args(ps), _window_args(pm)
    native.lib().cl_score_windows_both(*src.args(), f[0], f[1].ctypes.data, f[2].ctypes.data, f[3],
                                       f[4].data_ptr(), m[0], m[1].ctypes.data, m[2].ctypes.data, m[3],
                                       m[4].data_ptr())
    for group, (*_, above) in ((ps, f), (pm, m)):
        for p, a in zip(group, above.tolist()):
            p[4][0] += a
    return True


def _resolve(expert: str, c: str, d: float, k: int, total: int, lo_b: int, counts: torch.Tensor,
             above_hi: int) -> Selection | None:
    """The selection from the counts above and inside the bracket; None when the
    ``k``-th largest score is outside it."""
    r = k - above_hi  # rank of the answer inside the window, from the top
    inside = int(counts.sum())
    if r < 1 or r > inside:
        return None
    from_top = counts.flip(0).cumsum(0)
    j = int(torch.searchsorted(from_top, torch.tensor(r)))
    offset = counts.numel() - 1 - j
    before = int(from_top[j - 1]) if j > 0 else 0
    tied, keep = int(counts[offset]), r - before
    t_bits = lo_b + offset
    if t_bits < _SMALLEST_NORMAL_BITS:  # as model_selections: entries scored (about) 0 kept by position
        nonzero = above_hi + int(counts[max(0, _SMALLEST_NORMAL_BITS - lo_b):].sum())
        warnings.warn(f"{c} selection of expert {expert!r} at density {d}: only {nonzero} of {total} entries "
                      f"({nonzero / total:.3f}) have a non-zero score, so {k - nonzero} entries scored 0 are kept "
                      "by position (model order), not by merit", stacklevel=3)
    ledger = None if keep == tied else TieLedger(keep)
    return Selection(expert, c, d, _value(t_bits), k, total, tied, None, ledger)

