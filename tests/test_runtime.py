"""The thread policy: CPU passes run with the default (1) thread count and restore
the caller's afterwards; merge(threads=) and --threads override it."""
import pytest
import torch

import curvlens as cl
from curvlens.cli import main
from curvlens.runtime import get_threads, torch_threads, use_threads
from tests.conftest import make_tiny_zoo


@pytest.fixture
def experts(tmp_path):
    base, dirs, *_ = make_tiny_zoo(tmp_path, n_experts=2)
    return cl.Experts.from_dirs(base, dirs)


def test_a_pass_runs_with_the_default_and_restores(experts):
    with torch_threads(3):
        seen = [torch.get_num_threads() for _ in experts.iter_tensors(device="cpu", progress=False)]
        assert torch.get_num_threads() == 3
    assert set(seen) == {1} and get_threads() == 1
    seen = [torch.get_num_threads() for _ in experts.iter_tensors(device="cpu", progress=False, threads=2)]
    assert set(seen) == {2}


def test_merge_threads_reach_every_pass(experts, monkeypatch):
    seen = []
    real = cl.Experts.iter_tensors

    def spy(self, *a, **k):
        for g in real(self, *a, **k):
            seen.append(torch.get_num_threads())
            yield g

    monkeypatch.setattr(cl.Experts, "iter_tensors", spy)
    cl.merge(experts, "ota", ffg_density=0.5, device="cpu", progress=False, threads=2)
    assert seen and set(seen) == {2}  # the two selection passes and the merge pass
    assert get_threads() == 1
    with use_threads(2):
        assert get_threads() == 2
    assert get_threads() == 1


def test_bad_thread_counts(capsys, tmp_path):
    with pytest.raises(cl.CurvlensError, match="threads must be an int >= 1"):
        cl.set_threads(0)
    assert main(["merge", str(tmp_path / "c.yml"), str(tmp_path / "o"), "--threads", "0"]) == 2
    assert "threads must be an int >= 1" in capsys.readouterr().err


def test_keep_freed_memory_is_once_per_process_and_can_be_turned_off(monkeypatch):
    """glibc's thresholds are set once (the answer memoised); CURVLENS_MALLOC=0 or a
    non-Linux platform leaves malloc alone."""
    import sys

    from curvlens import runtime

    monkeypatch.setattr(runtime, "_ALLOCATOR", {})
    monkeypatch.setenv("CURVLENS_MALLOC", "0")
    assert runtime.keep_freed_memory() is False
    assert runtime.keep_freed_memory() is False  # memoised
    monkeypatch.setattr(runtime, "_ALLOCATOR", {})
    monkeypatch.setenv("CURVLENS_MALLOC", "1")
    on = runtime.keep_freed_memory()
    assert on is (sys.platform.startswith("linux") and runtime._ALLOCATOR["on"])
    assert runtime.keep_freed_memory() is on


def _blas_counts() -> dict:
    from threadpoolctl import threadpool_info

    return {d["filepath"]: d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"}


def test_numpy_and_scipy_blas_run_with_the_pass_threads(experts, monkeypatch):
    """torch.set_num_threads does not reach the OpenBLAS numpy and scipy ship: the
    mask ranks' scipy eigen-solves ran with one BLAS thread per core inside a
    one-thread pass (and in its helper thread) until the pass capped them too."""
    import scipy.linalg  # noqa: F401  (its own OpenBLAS, loaded before the limits below)
    from threadpoolctl import threadpool_limits

    import curvlens.math.mask_structure as ms

    from curvlens.runtime import blas_threads

    seen, real = [], ms.top_eigenvalue

    def recording(g):
        seen.append(set(_blas_counts().values()))
        return real(g)

    monkeypatch.setattr(ms, "top_eigenvalue", recording)
    with threadpool_limits(limits=2, user_api="blas"):
        outside = _blas_counts()
        assert len(outside) >= 2  # numpy's and scipy's
        cl.mask_stats(experts, densities=[0.5], device="cpu", progress=False)
        assert seen and all(s == {1} for s in seen), seen
        assert _blas_counts() == outside  # restored after the pass
        with blas_threads(None):
            assert _blas_counts() == outside
        seen.clear()
        with use_threads(2):
            cl.mask_stats(experts, densities=[0.5], device="cpu", progress=False)
        assert seen and all(s == set(outside.values()) for s in seen)


def test_a_fresh_process_holds_scipys_blas_too(tmp_path):
    """scipy is loaded lazily; the mask ranks' pass loads it before it starts, so
    its OpenBLAS (not loaded when the pass's limit would otherwise be taken) is
    held to the pass's one thread as well."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    code = f"""
import json, sys
import curvlens as cl
import curvlens.math.mask_structure as ms
from threadpoolctl import threadpool_info
from tests.conftest import make_tiny_zoo
assert "scipy.linalg" not in sys.modules
base, dirs, *_ = make_tiny_zoo(__import__("pathlib").Path({str(tmp_path)!r}), n_experts=2)
seen, real = [], ms.top_eigenvalue
def recording(g):
    seen.append(sorted({{d["num_threads"] for d in threadpool_info() if d["user_api"] == "blas"}}))
    return real(g)
ms.top_eigenvalue = recording
cl.mask_stats(cl.Experts.from_dirs(base, dirs), densities=[0.5], device="cpu", progress=False)
print(json.dumps(seen))
"""
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen and all(s == [1] for s in seen), seen


def test_overlapping_passes_share_one_blas_limit_until_the_last_ends():
    """Passes in two threads of one process (a many-threaded dask worker): the
    first to end must not lift the limit under the other."""
    import threading

    import scipy.linalg  # noqa: F401

    from curvlens.runtime import _BLAS, blas_threads

    inside, main_done, seen = threading.Event(), threading.Event(), {}

    def second():
        with blas_threads(1):
            inside.set()
            main_done.wait(30)
            seen["after_first_ended"] = set(_blas_counts().values())

    with blas_threads(1):
        t = threading.Thread(target=second)
        t.start()
        assert inside.wait(30)
        assert _BLAS["depth"] == 2
    main_done.set()
    t.join(30)
    assert seen["after_first_ended"] == {1}
    assert _BLAS["depth"] == 0 and _BLAS["held"] is None
