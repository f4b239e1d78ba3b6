"""The mask sweep (:func:`curvlens.passes.analyze_masks.mask_sweep`): its C kernel
against its torch twin, and the kernel's AVX2 build against its plain C build,
on ties that a quota splits inside and across chunks, rows longer than a chunk,
tails shorter than a vector, vectors, and every input dtype."""
import math

import pytest
import torch

from curvlens.math import native
from curvlens.passes.analyze_masks import mask_sweep
from curvlens.passes.thresholds import Selection
from curvlens.runtime import cpu_has_avx2

needs_c = pytest.mark.skipif(native.lib() is None, reason=f"no C kernels: {native.reason()}")

# (shape, dtype): a row of 2 chunks and a tail, odd sizes, a vector, one column
SHAPES = [((3, 4099), torch.bfloat16), ((37, 13), torch.float16), ((10007,), torch.float32),
          ((513, 1), torch.bfloat16), ((64, 256), torch.float32)]


def _case(shape, dtype, seed, criterion, no_moments=False):
    """Base, expert, moments and selections whose thresholds sit on tied scores,
    with every tie kept, none, or a quota that cuts them where it runs out."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    # half the task vector a few values (ties), half spread over decades, as are
    # the moments: float64 sums that depend on their order, so a lane mixed up
    # in the kernel changes bits
    step = torch.randint(-3, 4, shape, generator=g).float() * 0.25
    wide = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 3)
    step = torch.where(torch.rand(shape, generator=g) < 0.5, step, wide)
    expert = (base.float() + step).to(dtype)
    v = torch.where(torch.rand(shape, generator=g) < 0.4, torch.full(shape, 0.5),
                    torch.exp(torch.randn(shape, generator=g) * 4))
    tau = expert.float() - base.float()
    scores = tau.abs() if criterion == "magnitude" else v * tau.square()
    flat = scores.reshape(-1).sort(descending=True).values
    n = flat.numel()
    sels = []
    for i, d in enumerate((0.1, 0.25, 0.5, 0.95, 0.3, 0.7, 0.05, 0.6, 0.45)):  # nine: the C sweep takes 8 at once
        k = max(1, int(d * n))
        th = float(flat[k - 1])
        above, tied = int((scores > th).sum()), int((scores == th).sum())
        # every tie kept, none, or the quota that makes exactly k (cutting the ties mid-chunk)
        quota = None if i % 3 == 0 else {"t": 0} if i == 4 else {"t": k - above}
        kept = above + (tied if quota is None else quota["t"])
        sels.append(Selection("e", criterion, d, th, kept, n, tied, quota))
    assert any(s.quota and 0 < s.quota["t"] < s.tied for s in sels)  # a quota cuts some ties
    return base, expert, (None if no_moments else v), sels


def _run(base, expert, v, criterion, sels, keep):
    res, total = mask_sweep(base, expert, v, criterion, sels, "t", keep)
    return [(r.kept, r.saliency_kept, r.fro2, r.rows, r.cols, r.mask) for r in res], total


@needs_c
@pytest.mark.parametrize("twin", ["torch", "plain C"])
@pytest.mark.parametrize("criterion,no_moments", [("fisher", False), ("magnitude", False), ("magnitude", True)])
@pytest.mark.parametrize("shape,dtype", SHAPES)
def test_the_c_sweep_agrees_with_its_twins(shape, dtype, criterion, no_moments, twin, request, monkeypatch):
    """Against the torch sweep: the same masks and counts, sums within rounding
    (the C sweep squares tau in fp32, torch in float64). Against the plain C
    build of the kernel (the AVX2 build's twin on a CPU without AVX2): the same
    bits, sums included."""
    lib = None if twin == "torch" else request.getfixturevalue("plain_c_build")
    base, expert, v, sels = _case(shape, dtype, 3 if twin == "torch" else 4, criterion, no_moments)
    for keep in (True, False):
        got, total = _run(base, expert, v, criterion, sels, keep)
        with monkeypatch.context() as m:
            m.setitem(native._STATE, "lib", lib)
            want, want_total = _run(base, expert, v, criterion, sels, keep or twin == "torch")
        rtol = (1e-12, 1e-6) if twin == "torch" else (0.0, 0.0)
        assert math.isclose(total, want_total, rel_tol=rtol[0]) or math.isnan(total) and math.isnan(want_total)
        for sel, (k, sk, f2, rows, cols, mask), (wk, wsk, wf2, wrows, wcols, wmask) in zip(sels, got, want):
            assert k == wk == sel.k
            assert math.isclose(sk, wsk, rel_tol=rtol[0]) or math.isnan(sk) and math.isnan(wsk)
            assert math.isclose(f2, wf2, rel_tol=rtol[1])
            if len(shape) >= 2:
                assert torch.equal(rows, wrows) and torch.equal(cols, wcols)
            else:
                assert rows is None and wrows is None
            if keep:
                assert torch.equal(mask, wmask)
            else:
                assert mask is None


def test_an_avx512_machine_builds_the_avx2_kernels(monkeypatch):
    """torch names an AVX-512 CPU's capability "AVX512", which contains no
    "AVX2": the build must ask the CPU, not look for the substring."""
    import platform

    monkeypatch.delattr(torch.cpu, "_is_avx2_supported", raising=False)
    for cap, want in (("AVX512", True), ("AVX2", True), ("DEFAULT", False)):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=cap: c)
        assert cpu_has_avx2() is want
        if platform.machine() in ("x86_64", "AMD64"):
            assert ("-mavx2" in native._flags()) is want
