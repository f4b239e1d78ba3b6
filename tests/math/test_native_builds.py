"""The C kernels' AVX2 build (what an x86 machine with AVX2 runs) against their
plain C build (what one without runs): the same bits from every analysis of the
fused pass and every merge whose kernels are compiled, in every input dtype.

The kernels promise one summation order whatever the machine (8 float64 lanes,
no reassociation); the AVX2 build adds intrinsics (the mask sweep, the
magnitude bracket's compaction) that must keep that promise."""
import pandas as pd
import pytest
import torch

import curvlens as cl
from curvlens import Experts
from curvlens.config.merge import merge
from curvlens.math import native
from tests.conftest import make_tiny_zoo

KW = dict(device="cpu", progress=False)
# the methods that call a compiled kernel: OTA (cl_ota_merge, with the FFG
# selection's score sketches), TIES and its trims (cl_ties_merge, cl_mag_bracket)
METHODS = {"ota": dict(ffg_density=0.3), "ties": dict(density=0.5), "breadcrumbs_ties": dict(density=0.6),
           "dare_ties": dict(density=0.5), "task_arithmetic": {}}


def _run(ex):
    merges = {m: merge(ex, m, **KW, **p) for m, p in METHODS.items()}
    frames = cl.analyze(ex, merges={"ties": merges["ties"]}, **KW)
    frames.update(cl.analyze(ex, ["mask_stats"], selection="exact", **KW))
    return merges, frames


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_avx2_build_computes_the_plain_builds_bits(tmp_path, dtype, plain_c_build, monkeypatch):
    base, dirs, *_ = make_tiny_zoo(tmp_path / "z", dtype=dtype)
    ex = Experts.from_dirs(base, dirs)
    avx2_merges, avx2_frames = _run(ex)
    monkeypatch.setitem(native._STATE, "lib", plain_c_build)
    plain_merges, plain_frames = _run(ex)
    for m in METHODS:
        a, b = avx2_merges[m], plain_merges[m]
        pd.testing.assert_frame_equal(a.report, b.report, check_exact=True, obj=m)
        names = list(a.checkpoint)
        assert names == list(b.checkpoint) and names
        for n in names:
            assert torch.equal(a.checkpoint[n].view(torch.uint8), b.checkpoint[n].view(torch.uint8)), (m, n)
    assert set(avx2_frames) == set(plain_frames)
    for key, df in avx2_frames.items():
        pd.testing.assert_frame_equal(df, plain_frames[key], check_exact=True, obj=key)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_magnitude_bracket_of_both_builds_is_the_same(dtype, plain_c_build, monkeypatch):
    """Tensors above BRACKET_MIN (the tiny zoo's are below it): the bracket
    kernel's AVX2 compaction against the plain loop, ties included."""
    from curvlens.math.native.merges import BRACKET_MIN, kth_largest_magnitude

    g = torch.Generator().manual_seed(7)
    n = 4 * BRACKET_MIN + 13
    base = torch.randn(n, generator=g).to(dtype)
    expert = (base.float() + torch.randn(n, generator=g) * 0.01).to(dtype)
    expert[::5] = base[::5] + 0.0078125  # a value many entries share
    ks = [1, 97, n // 5, n // 3, n - 1]
    avx2 = [kth_largest_magnitude(base, expert, k) for k in ks]
    monkeypatch.setitem(native._STATE, "lib", plain_c_build)
    plain = [kth_largest_magnitude(base, expert, k) for k in ks]
    assert avx2 == plain and all(r is not None for r in avx2)
    s = (expert.float() - base.float()).abs()
    for k, (kth, above, tied) in zip(ks, avx2):  # and the answer is torch's
        assert kth == float(torch.topk(s, k).values[-1]) and above == int((s > kth).sum())


def _windows(lib, base, expert, v, wins_f, wins_m):
    """cl_score_windows_both's counts above and inside each window."""
    import numpy as np

    out = []
    args = []
    for wins in (wins_f, wins_m):
        lo = np.array([w[0] for w in wins], dtype=np.uint32)
        hi = np.array([w[1] for w in wins], dtype=np.uint32)
        counts = [torch.zeros(h - l + 1, dtype=torch.int64) for l, h in wins]
        above = torch.zeros(len(wins), dtype=torch.int64)
        args += [len(wins), lo.ctypes.data, hi.ctypes.data, native.ptr_array(counts), above.data_ptr()]
        out.append((lo, hi, counts, above))
    lib.cl_score_windows_both(base.data_ptr(), native.dtype_code(base), expert.data_ptr(), native.dtype_code(expert),
                              v.data_ptr(), base.numel(), *args)
    return [(c, a) for _, _, c, a in out]


@pytest.mark.parametrize("n", [8, 2048 * 3 + 5, 100_003])
def test_the_scouts_window_counts_of_both_builds_are_exact(n, plain_c_build):
    """Counts above and inside windows of score bit patterns (the one-read
    selection's bracket): both builds against numpy, for windows at the top, at
    zero (a third of the scores), one pattern wide, at the top and above it."""
    import numpy as np

    g = torch.Generator().manual_seed(n)
    base = torch.randn(n, generator=g).bfloat16()
    expert = (base.float() + torch.randn(n, generator=g) * 0.01).bfloat16()
    expert[::3] = base[::3]  # zero scores
    v = torch.exp(torch.randn(n, generator=g) * 3) * 1e-3
    tau = expert.float() - base.float()
    bits = {"f": (v * (tau * tau)).numpy().view(np.uint32) & 0x7FFFFFFF, "m": tau.abs().numpy().view(np.uint32)}

    def wins(b):
        s = np.sort(b)
        mid = int(s[len(s) // 2])
        top = int(s[-1])  # windows a few patterns wide: their counters are int64 per pattern
        return [(mid - 40000, mid + 40000), (0, 0), (mid, mid), (0, 1 << 16), (top - 5000, top), (top, top + 1000)]

    wf, wm = wins(bits["f"]), wins(bits["m"])
    got = _windows(native.lib(), base, expert, v, wf, wm)
    plain = _windows(plain_c_build, base, expert, v, wf, wm)
    for (c, a), (pc, pa), b, ws in zip(got, plain, (bits["f"], bits["m"]), (wf, wm)):
        assert torch.equal(a, pa) and all(torch.equal(x, y) for x, y in zip(c, pc))
        for k, (lo, hi) in enumerate(ws):
            assert int(a[k]) == int(np.count_nonzero(b > hi))
            inside = b[(b >= lo) & (b <= hi)] - lo
            assert torch.equal(c[k], torch.from_numpy(np.bincount(inside, minlength=hi - lo + 1).astype(np.int64)))
