"""The C merge kernels (curvlens/math/native/merges.c) give the torch code's bits.

Each case runs a method twice on the same tensors, once with the kernels and once
with them switched off, and compares the merged values bit for bit and the mask
counts exactly, over dtypes, sizes (not multiples of a block or a vector), ties at
the thresholds, zero task-vector entries, -0.0 in the base, and every option the
kernels take; options they do not take, and bad inputs, must reach the torch code.
"""
import math

import pytest
import torch

from curvlens.errors import CurvlensError
from curvlens.math import native
from curvlens.math.methods import get_method
from curvlens.math.methods.registry import MaskCounts
from curvlens.math.native import merges as native_merges

pytestmark = pytest.mark.skipif(native.lib() is None, reason=f"no C kernels: {native.reason()}")


def _inputs(n, ne, seed, *, xdt=torch.bfloat16, vdt=torch.float32, shape=None):
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=g) * 0.05).to(xdt)
    base[::97] = -0.0
    experts = []
    for i in range(ne):
        x = base.float() + torch.randn(n, generator=g) * 0.01 * (i + 1)
        x[i::13] = base[i::13].float()  # zero task-vector entries
        if n > 50:
            x[40:50] = base[40:50].float() + 0.0078125  # equal |tau| (ties in magnitude)
        experts.append(x.to(xdt))
    moments = []
    for i in range(ne):
        v = torch.exp(torch.randn(n, generator=g) * 2 - 14)
        v[5::31] = 0.0
        if n > 60:
            v[50:60] = 1e-6  # with the equal tau above: tied saliencies
        moments.append(v.to(vdt))
    if shape is not None:
        base, experts, moments = base.reshape(shape), [x.reshape(shape) for x in experts], [
            v.reshape(shape) for v in moments]
    return base, experts, moments


def _twice(monkeypatch, fn):
    """fn() with the C kernels, then without them: (result, counts) each."""
    c_counts = MaskCounts(8)
    with_c = fn(c_counts)
    monkeypatch.setitem(native._STATE, "lib", None)
    t_counts = MaskCounts(8)
    without = fn(t_counts)
    monkeypatch.undo()
    return (with_c, c_counts), (without, t_counts)


def _same_bits(a, b):
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    assert torch.equal(a.view(torch.int32), b.view(torch.int32)), \
        f"{int((a.view(torch.int32) != b.view(torch.int32)).sum())} of {a.numel()} entries differ"


def _thresholds(base, experts, moments, density):
    """Each expert's exact top-density saliency threshold and the ties to keep."""
    out = []
    for x, v in zip(experts, moments):
        s = (v.float() * (x.float() - base.float()).square()).reshape(-1)
        k = max(1, int(density * s.numel()))
        kth = float(torch.topk(s, k).values[-1])
        out.append((kth, k - int((s > kth).sum())))
    return out


@pytest.mark.parametrize("n,ne,xdt,vdt,seed", [
    (20011, 3, torch.bfloat16, torch.float32, 0), (4096, 2, torch.float32, torch.float32, 1),
    (2049, 5, torch.bfloat16, torch.bfloat16, 2), (7, 1, torch.float32, torch.float32, 3),
    (65537, 3, torch.float32, torch.bfloat16, 4), (30011, 3, torch.float16, torch.float32, 5),
    (4099, 2, torch.float16, torch.float16, 6),
])
@pytest.mark.parametrize("power", [0.5, 1.0, 2.0, 0.7])
@pytest.mark.parametrize("fallback,eps", [(True, 1e-26), (False, 1e-8), (True, 0.0)])
def test_ota_model_wide_masks_same_bits(monkeypatch, n, ne, xdt, vdt, seed, power, fallback, eps):
    base, experts, moments = _inputs(n, ne, seed, xdt=xdt, vdt=vdt)
    sel = _thresholds(base, experts, moments, 0.3)
    kw = dict(power=power, epsilon=eps, fallback_to_base=fallback, ffg_threshold=[t for t, _ in sel],
              ffg_ties=[q for _, q in sel], scaling_factor=[1.0 + 0.5 * i for i in range(ne)])
    (a, ca), (b, cb) = _twice(monkeypatch, lambda c: get_method("ota")(base, experts, moments, counts=c, **kw))
    _same_bits(a, b)
    assert (ca.kept, ca.any_kept, ca.used) == (cb.kept, cb.any_kept, cb.used)
    assert ca.kept[:ne] == [math.floor(0.3 * n) or 1] * ne or n < 10


@pytest.mark.parametrize("case", ["threshold_only", "precond", "unmasked", "mixed", "density_one", "zero_eps"])
def test_ota_other_mask_forms_same_bits(monkeypatch, case):
    base, experts, moments = _inputs(29997, 3, 7, shape=(101, 297))
    sel = _thresholds(base, experts, moments, 0.2)
    kw = {"threshold_only": dict(ffg_threshold=[t for t, _ in sel]),
          "precond": dict(precond_threshold=[t for t, _ in sel]),
          "unmasked": dict(),
          "mixed": dict(ffg_threshold=[sel[0][0], None, sel[2][0]], ffg_ties=[sel[0][1], None, None]),
          "density_one": dict(ffg_density=1.0, fallback_to_base=True),
          "zero_eps": dict(epsilon=0.0)}[case]
    if case == "zero_eps":  # every v zero on a stretch: 0/0 takes the experts' mean
        for v in moments:
            v[:5] = 0.0
    (a, ca), (b, cb) = _twice(monkeypatch, lambda c: get_method("ota")(base, experts, moments, counts=c, **kw))
    _same_bits(a, b)
    assert (ca.kept, ca.any_kept, ca.used) == (cb.kept, cb.any_kept, cb.used)


def test_ota_kernel_runs_for_the_drivers_options(monkeypatch):
    """The driver's OTA+FFG (thresholds and tie quotas) takes the C path, and a
    negative or non-finite moment the torch one (its error)."""
    base, experts, moments = _inputs(5000, 3, 9)
    sel = _thresholds(base, experts, moments, 0.3)
    kw = dict(ffg_threshold=[t for t, _ in sel], ffg_ties=[q for _, q in sel], fallback_to_base=True)
    calls = []
    real = native_merges.ota_merge

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr("curvlens.math.methods.native_paths.ota_merge", spy)
    get_method("ota")(base, experts, moments, **kw)
    assert calls
    assert real(base, experts, [moments[0], -moments[1], moments[2]], power=0.5, scaling=[1.0] * 3, eps=1e-8,
                masks=[None] * 3, cut=0.0, fallback_to_base=True) is None
    with pytest.raises(CurvlensError, match="nonnegative"):
        get_method("ota")(base, experts, [moments[0], -moments[1], moments[2]], **kw)
    bad = moments[2].clone()
    bad[17] = float("nan")
    for lib in (True, False):  # a NaN weight a mask drops would vanish: refused either way
        if not lib:
            monkeypatch.setitem(native._STATE, "lib", None)
        with pytest.raises(CurvlensError, match="must be finite"):
            get_method("ota")(base, experts, [moments[0], moments[1], bad], **kw)


def test_ota_tie_quota_mismatch_is_refused_both_ways(monkeypatch):
    base, experts, moments = _inputs(3000, 2, 11)
    sel = _thresholds(base, experts, moments, 0.3)
    kw = dict(ffg_threshold=[t for t, _ in sel], ffg_ties=[q + 5 for _, q in sel])
    with pytest.raises(CurvlensError, match="tied at the threshold"):
        get_method("ota")(base, experts, moments, **kw)
    monkeypatch.setitem(native._STATE, "lib", None)
    with pytest.raises(CurvlensError, match="tied at the threshold"):
        get_method("ota")(base, experts, moments, **kw)


@pytest.mark.parametrize("n,ne,xdt,seed", [(20011, 3, torch.bfloat16, 0), (4096, 2, torch.float32, 1),
                                           (2049, 5, torch.bfloat16, 2), (9, 1, torch.float32, 3),
                                           (10007, 3, torch.float16, 4)])
@pytest.mark.parametrize("density", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("weights,normalize,lam", [(None, True, 1.0), ("mixed", True, 1.0), ("mixed", False, 0.7),
                                                   (None, False, 1.3), ("negative", True, 1.0)])
def test_ties_same_bits(monkeypatch, n, ne, xdt, seed, density, weights, normalize, lam):
    base, experts, _ = _inputs(n, ne, seed, xdt=xdt)
    kw = dict(density=density, normalize=normalize, **{"lambda": lam})
    if weights == "mixed":
        kw["weight"] = [0.3 + 0.45 * i for i in range(ne)]
    elif weights == "negative":  # a subtracted expert: agreeing weights may sum to <= 0
        kw["weight"] = [(-0.5 if i == 0 else 0.3 + 0.45 * i) for i in range(ne)]
    (a, ca), (b, cb) = _twice(monkeypatch, lambda c: get_method("ties")(base, experts, counts=c, **kw))
    _same_bits(a, b)
    assert (ca.kept, ca.any_kept, ca.used) == (cb.kept, cb.any_kept, cb.used)


def test_ties_per_expert_density_and_rescale(monkeypatch):
    base, experts, _ = _inputs(10007, 3, 5, shape=(10007,))
    for kw in (dict(density=[0.2, 1.0, 0.6]), dict(density=0.4, rescale=True)):
        (a, ca), (b, cb) = _twice(monkeypatch, lambda c: get_method("ties")(base, experts, counts=c, **kw))
        _same_bits(a, b)
        assert (ca.kept, ca.any_kept) == (cb.kept, cb.any_kept)


@pytest.mark.parametrize("n", [50021, 300007])
@pytest.mark.parametrize("xdt", [torch.bfloat16, torch.float32, torch.float16])
def test_kth_largest_magnitude_is_exact(xdt, n):
    """Every route (torch's top-k for small tensors, the sample-bracketed sweep,
    the two-sweep histogram) gives the exact k-th value and its counts."""
    base, experts, _ = _inputs(n, 1, 13, xdt=xdt)
    x = experts[0]
    if n > 1000:
        x = x.clone()
        x[1000:1000 + n // 5] = base[1000:1000 + n // 5]  # a long stretch of zeros: ties at 0 for large k
    s = (x.float() - base.float()).abs()
    routes = [native_merges.kth_largest_magnitude, native_merges._by_histogram]
    if n >= native_merges.BRACKET_MIN:
        routes.append(native_merges._bracketed)
    for k in (1, 7, 1000, n // 2, n - n // 5 + 3, n):
        want = float(torch.topk(s, k).values[-1])
        for route in routes:
            got = route(base, x, k)
            if got is None and route is native_merges._bracketed:
                continue  # a missed bracket: the caller falls back
            kth, above, equal = got
            assert (kth, above, equal) == (want, int((s > want).sum()), int((s == want).sum())), route
    if n >= native_merges.BRACKET_MIN:  # the sample's bracket holds a middle rank
        assert native_merges._bracketed(base, x, n // 2) is not None
    bad = x.clone()
    bad[3] = float("inf")
    assert native_merges.kth_largest_magnitude(base, bad, 10) is None


@pytest.mark.parametrize("tied_share", [0.02, 0.05, 0.3])
def test_the_bracket_holds_a_heavily_tied_answer(monkeypatch, tied_share):
    """bf16 task vectors tie heavily (5% of a real embedding's magnitudes equal
    its median): the bracketed sweep must still find the answer, exactly, without
    the two-sweep histogram; when its first buffer is too small it sweeps once more."""
    n = 400_003
    g = torch.Generator().manual_seed(5)
    tied = torch.rand(n, generator=g) < tied_share
    # tied entries: a base in [1, 2) moved by one bf16 step there (2**-7), exactly
    base = torch.where(tied, 1 + torch.rand(n, generator=g), torch.randn(n, generator=g)).to(torch.bfloat16)
    step = torch.where(tied, torch.full((n,), 2.0**-7), torch.randn(n, generator=g) * 1e-2)
    x = (base.float() + step).to(torch.bfloat16)
    s = (x.float() - base.float()).abs()
    k = int((s > 2.0**-7).sum()) + 10  # the answer is the tied value
    want = float(torch.topk(s, k).values[-1])
    expected = (want, int((s > want).sum()), int((s == want).sum()))
    assert want == 2.0**-7 and expected[2] >= tied_share * n * 0.9
    monkeypatch.setattr(native_merges, "_by_histogram", lambda *a: pytest.fail("histogram used"))
    assert native_merges.kth_largest_magnitude(base, x, k) == expected
    sweeps = []
    real = native_merges.native.lib().cl_mag_bracket

    class Lib:  # counts the bracket's sweeps
        def __getattr__(self, name):
            return getattr(native_merges.native.lib(), name)

        def cl_mag_bracket(self, *args):
            sweeps.append(args[9])
            return real(*args)

    monkeypatch.setattr(native_merges.native, "lib", lambda lib=Lib(): lib)
    monkeypatch.setattr(native_merges, "_room", lambda *a: 16)  # a first buffer far too small
    assert native_merges._bracketed(base, x, k) == expected and len(sweeps) == 2


@pytest.mark.parametrize("method", ["ota", "ties"])
def test_mixed_dtypes_same_bits(monkeypatch, method):
    """A base, experts and moments each in their own dtype (fp32 base with bf16
    experts, one fp32 expert among bf16 ones, bf16 moments) take the kernels with
    per-input dtypes and give the torch code's bits."""
    base, experts, moments = _inputs(12345, 3, 21)
    base = base.float()
    experts = [experts[0], experts[1].float(), experts[2]]
    moments = [moments[0], moments[1].bfloat16(), moments[2]]
    if method == "ota":
        sel = _thresholds(base, experts, moments, 0.3)
        kw = dict(ffg_threshold=[t for t, _ in sel], ffg_ties=[q for _, q in sel], fallback_to_base=True)

        def run(c):
            return get_method("ota")(base, experts, moments, counts=c, **kw)
    else:
        def run(c):
            return get_method("ties")(base, experts, counts=c, density=0.4)
    (a, ca), (b, cb) = _twice(monkeypatch, run)
    _same_bits(a, b)
    assert (ca.kept, ca.any_kept) == (cb.kept, cb.any_kept)


def test_fp64_and_strided_inputs_take_the_torch_code(monkeypatch):
    """Inputs the kernels do not take (fp64, a non-contiguous view) are merged by
    the torch code: the kernel entry points say None. fp16 (mixed with bf16 here)
    is taken, and gives the torch code's bits."""
    base, experts, moments = _inputs(4096, 2, 23, shape=(64, 64))
    wide = [x.double() for x in experts]
    assert native_merges.ties_merge(base, wide, masks=[None, None], weights=None, normalize=True, lam=1.0) is None
    strided = [x.t() for x in experts]
    assert native_merges.ota_merge(base.t(), strided, [v.t() for v in moments], power=0.5, scaling=[1.0, 1.0],
                                   eps=1e-8, masks=[None, None], cut=0.0, fallback_to_base=True) is None
    half = [x.half() for x in experts]
    got = native_merges.ties_merge(base, half, masks=[None, None], weights=None, normalize=True, lam=1.0)
    assert got is not None
    monkeypatch.setitem(native._STATE, "lib", None)
    _same_bits(got.out, get_method("ties")(base, half, density=1.0))
    monkeypatch.undo()
    out = get_method("ties")(base, wide, density=0.5)
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("quota", ["all", 0, "first_half", "across", "second_half"])
@pytest.mark.parametrize("xdt", [torch.bfloat16, torch.float32])
def test_ota_split_over_two_threads_same_bits_and_tie_quotas(monkeypatch, quota, xdt):
    """The merge's second half on a helper thread: every value, mask count and
    quota left as the one-thread run, with ties at the threshold in both halves
    and a quota that runs out before, at or after the split."""
    chunk = native_merges.POW_BLOCK
    monkeypatch.setattr(native_merges, "OTA_CHUNK", chunk)  # several chunks without a large test
    n = 5 * chunk + 777
    base, experts, moments = _inputs(n, 3, 11, xdt=xdt)
    tied = torch.arange(3, n, 101)  # one saliency value, everywhere
    for x, v in zip(experts, moments):
        x[tied] = (base[tied].float() + 0.0078125).to(xdt)
        v[tied] = 1e-6
    t = float(torch.tensor(1e-6) * (experts[0][tied[:1]].float() - base[tied[:1]].float()).square())
    mid = 3 * chunk  # where ota_merge splits these n entries
    in_first = int(((moments[0].float() * (experts[0].float() - base.float()).square())[:mid] == t).sum())
    q = {"all": -1, 0: 0, "first_half": in_first // 2, "across": in_first + 7,
         "second_half": n}[quota]
    masks = [(t, q), (t, -1 if q == -1 else max(q - 3, 0)), None]
    kw = dict(power=0.5, scaling=[1.0, 2.0, 1.0], eps=1e-26, masks=masks, cut=0.0, fallback_to_base=True)
    one = native_merges.ota_merge(base, experts, moments, split=False, **kw)
    runs = []
    real_run = native_merges._OtaJob.run
    monkeypatch.setattr(native_merges._OtaJob, "run", lambda self, *a: runs.append(a[:2]) or real_run(self, *a))
    two = native_merges.ota_merge(base, experts, moments, split=True, **kw)
    # the second half again, after the first, only where the first took ties the second assumed left
    assert sorted(runs) == sorted([(0, mid), (mid, n)] + ([(mid, n)] if quota in ("first_half", "across") else []))
    _same_bits(one.out, two.out)
    assert (one.kept, one.any_kept, one.remaining) == (two.kept, two.any_kept, two.remaining)
    ties = int(((moments[0].float() * (experts[0].float() - base.float()).square()) == t).sum())
    assert ties > 1000
    if q >= 0:  # the quota is handed out in flat order: what is left is what no tie took
        assert one.remaining[0] == max(0, q - ties)
