"""CPU kernels in C, compiled at first use with the system's C compiler.

The analyses' statistics are sums over entries of a few inputs. Written as torch
operations each costs one pass over memory, and on this project's 2-core CPU one
in-cache torch operation costs about as much as reading the same entries from
DRAM (``benchmarks/bench_kernels.py``), so a pass that needs thirty of them runs
thirty times the read floor. ``kernels.c`` does each statistic (``merges.c`` each merge of the common
methods' usual options, ``sparse.c`` the rank sketches' products over a mask's kept entries) in one sweep over
the stored dtypes (bf16 and fp16 widened exactly, products and sums in the IEEE order
torch uses, accumulations in float64).

No toolchain is downloaded: the C files are compiled once by ``cc`` (or ``$CC``)
into ``$CURVLENS_CACHE/native`` (default ``~/.cache/curvlens/native``), keyed by
the source, the flags and the CPU, and loaded with :mod:`ctypes` (which releases
the GIL, so the stream's read-ahead thread keeps reading). On an x86 CPU with
AVX2 (every AVX-512 CPU has it) they are built with ``-mavx2 -mfma`` (contraction
stays off, so no FMA changes a result), and a few loops that the compiler leaves
scalar use AVX2 intrinsics (the mask sweep, the scout's window gathering, the
magnitude bracket's compaction); their plain C loops give the same bits, which
``tests/math/test_native_builds.py`` checks by building both. Without a compiler,
or with ``CURVLENS_NATIVE=0``, :func:`available` is False and every caller uses
its torch implementation (also the GPU path); tests check the two agree.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from curvlens.runtime import cpu_has_avx2

__all__ = ["available", "lib", "ptr", "dtype_code", "reason"]

_HERE = Path(__file__).parent
#: compiled together into one library; common.h is included by each
_SOURCES = [_HERE / "kernels.c", _HERE / "merges.c", _HERE / "sparse.c"]
_HEADERS = [_HERE / "common.h"]
_LOCK = threading.Lock()
_STATE: dict = {}

I64, I32, F32, F64, U32 = ctypes.c_int64, ctypes.c_int32, ctypes.c_float, ctypes.c_double, ctypes.c_uint32
P = ctypes.c_void_p

#: argument and result types of every exported function
_SIGNATURES = {
    "cl_moment_sweep": ([P, I64, P, P, P, I32, U32, P, P], None),
    "cl_collect_bins": ([P, I64, P, P, P, I64], I64),
    "cl_overlap_sweep": ([P, I32, I64, F32, P, P, P, I32, I32, P, P, P], None),
    "cl_overlap_sweep_range": ([P, I32, I64, I64, F32, P, P, P, I32, I32, P, P, P, P], None),
    "cl_add_in_order": ([P, P, I64, I64], None),
    "cl_tv_sweep": ([P, I32, P, P, I32, I32, P, I64, P, P, P, P, I32, P], None),
    "cl_wsq_diff": ([P, P, I32, P, I32, I64], F64),
    "cl_score_hist": ([P, I32, P, I32, P, I64, I32, P], I64),
    "cl_score_bincount": ([P, I32, P, I32, P, I64, U32, U32, P], None),
    "cl_score_windows": ([P, I32, P, I32, P, I64, I32, P, P, P, P], None),
    "cl_score_windows_both": ([P, I32, P, I32, P, I64, I32, P, P, P, P, I32, P, P, P, P], None),
    "cl_scores_at": ([P, I32, P, I32, P, P, I64, P], None),
    "cl_mask_sweep": ([P, I32, P, I32, P, I32, I64, I64, I32, P, P, P, P, P, P, P], None),
    "cl_and_count": ([P, P, I64], I64),
    "cl_widen": ([P, I32, I64, P, P], None),
    "cl_sub_widened": ([P, I32, P, I32, I64, P], None),
    "cl_ota_merge": ([P, I32, P, P, P, P, P, I32, I64, P, F32, P, P, P, F32, I32, P, P, P, P], None),
    "cl_mag_bracket": ([P, I32, P, I32, I64, U32, U32, P, P, I64, P], I64),
    "cl_ties_merge": ([P, I32, P, P, I32, I64, P, P, P, P, I32, F32, P, P, P, P], None),
    "cl_sp_index": ([P, I64, I64, I64, P, P, P, I32, P, P], I64),
    "cl_sp_mm_f32": ([P, P, P, I64, P, I64, P], None),
    "cl_sp_tmm_f32": ([P, P, P, I64, I64, P, I64, P], None),
    "cl_sp_mm_pat": ([P, P, I64, P, I64, P], None),
    "cl_sp_tmm_pat": ([P, P, I64, I64, P, I64, P], None),
}


def _flags() -> list[str]:
    flags = ["-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-std=c99"]
    # the CPU's AVX2, not torch's capability string: that reads "AVX512" on an
    # AVX-512 machine, which a test for "AVX2" in it missed, so such machines
    # built every kernel for plain SSE2 (the mask sweep ran 2-3x slower)
    if platform.machine() in ("x86_64", "AMD64") and cpu_has_avx2():
        flags += ["-mavx2", "-mfma"]
    return flags


def _cache_dir() -> Path:
    root = os.environ.get("CURVLENS_CACHE")
    return Path(root).expanduser() / "native" if root else Path.home() / ".cache" / "curvlens" / "native"


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise OSError("no C compiler (cc/gcc) on PATH")
    source = b"".join(f.read_bytes() for f in _SOURCES + _HEADERS)
    flags = _flags()
    key = hashlib.sha256(source + " ".join([cc, *flags, platform.machine(), platform.system()]).encode())
    out = _cache_dir() / key.hexdigest()[:16] / "libcurvlens_kernels.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        try:
            res = subprocess.run([cc, *flags, *map(str, _SOURCES), "-o", tmp, "-lm"], capture_output=True,
                                 text=True)
            if res.returncode != 0:
                raise OSError(f"{cc} failed: {res.stderr.strip()[:400]}")
            os.replace(tmp, out)  # atomic: a concurrent build never loads half a file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(out))
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return lib


def lib() -> ctypes.CDLL | None:
    """The loaded kernels, or None (no compiler, a failed build, CURVLENS_NATIVE=0)."""
    if os.environ.get("CURVLENS_NATIVE", "1") == "0":
        return None
    with _LOCK:
        if "lib" not in _STATE:
            try:
                _STATE["lib"], _STATE["reason"] = _build(), None
            except OSError as err:
                _STATE["lib"], _STATE["reason"] = None, str(err)
    return _STATE["lib"]


def available(*tensors: torch.Tensor) -> bool:
    """Whether the C kernels can take these tensors: loaded, and every tensor on
    the CPU, contiguous, fp32, bf16 or fp16."""
    if lib() is None:
        return False
    return all(t.device.type == "cpu" and t.is_contiguous() and t.dtype in _CODES for t in tensors)


def reason() -> str | None:
    """Why :func:`lib` is None (None when the kernels loaded or were not tried)."""
    return _STATE.get("reason")


_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def dtype_code(t: torch.Tensor) -> int:
    return _CODES[t.dtype]


def ptr(t: torch.Tensor | None) -> int | None:
    """The data pointer of a contiguous CPU tensor (None for None)."""
    return None if t is None else t.data_ptr()


def ptr_array(tensors) -> ctypes.Array:
    """A C array of data pointers."""
    arr = (ctypes.c_void_p * max(1, len(tensors)))()
    for i, t in enumerate(tensors):
        arr[i] = t.data_ptr()
    return arr
