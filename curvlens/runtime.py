"""Where and how curvlens's passes run: the device, how many torch threads they use
on a CPU (and a block that sets it), the progress bar.

Measured on the 2-core machine this project runs on (issue 13): with one other
busy process, torch's default two intra-op threads made ``curvlens analyze``
6-12x slower than one thread (254-471 s vs 39 s), ``curvature_overlap`` 16x and an
OTA+FFG merge 2.7x, while on a quiet machine two threads gained 9 %. Threads that
wait on each other cost far more than a second core gains, so every streaming pass
runs with ONE intra-op thread on a CPU by default (reading the next tensor still
overlaps the math, in the stream's prefetch thread), and numpy's and scipy's own
BLAS libraries are held to the same count while it runs (:func:`blas_threads`).
``set_threads`` or a pass's ``threads=`` changes it; ``benchmarks/bench_threads.py``
measures both settings.

The second core is still used, by a helper thread that meets the caller only
between whole jobs (:class:`Background`): the mask statistics' singular values
and the selections' per-expert sweeps, the second half of each tensor's OTA merge
(:func:`curvlens.math.native.merges.ota_merge`) (the caller takes a job itself when the
helper is behind, so nobody waits on a busy core, and at the end of a pass it
takes the jobs the helper has not started), and a merge's writes
(:class:`curvlens.io.writer.ModelWriter` with ``background=True``: in order, the
caller waits when 64 MB are queued). ``CURVLENS_BACKGROUND=0`` keeps the passes'
work in the caller's thread.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from curvlens.errors import CurvlensError

__all__ = ["set_threads", "get_threads", "use_threads", "torch_threads", "threads_for", "resolve_device",
           "progress_bar", "keep_freed_memory", "Background", "background_enabled", "side_by_side", "BUDGET",
           "cpu_has_avx2", "blas_threads"]

_DEFAULT = {"cpu": 1}


def set_threads(n: int | None) -> None:
    """Torch intra-op threads for curvlens's CPU passes from now on (``None``:
    leave torch's own setting alone).

    Examples
    --------
    >>> set_threads(2); get_threads()
    2
    >>> set_threads(1)
    """
    _DEFAULT["cpu"] = _check(n)


def get_threads() -> int | None:
    """The current default (``None``: torch's own setting)."""
    return _DEFAULT["cpu"]


def _check(n) -> int | None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise CurvlensError(f"threads must be an int >= 1 or None; got {n!r}")
    return n


@contextlib.contextmanager
def use_threads(n: int | None) -> Iterator[None]:
    """Within the block, every pass uses ``n`` threads on a CPU (``None``: keep the
    current default); the default is restored after."""
    before = _DEFAULT["cpu"]
    if n is not None:
        _DEFAULT["cpu"] = _check(n)
    try:
        yield
    finally:
        _DEFAULT["cpu"] = before


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (``None``: unchanged), then
    restore the caller's count. Every pass runs in one, so this is also where
    glibc is told to keep freed blocks (:func:`keep_freed_memory`) and where the
    BLAS libraries numpy and scipy bring get the same count (:func:`blas_threads`)."""
    n = _check(n)
    keep_freed_memory()
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        with blas_threads(n):
            yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


_BLAS: dict = {"depth": 0, "held": None}
_BLAS_LOCK = threading.Lock()


@contextlib.contextmanager
def blas_threads(n: int | None) -> Iterator[None]:
    """Run the block with at most ``n`` threads in numpy's and scipy's BLAS/LAPACK
    (``None``: unchanged), then restore their counts.

    ``torch.set_num_threads`` does not reach them: each wheel ships its own
    OpenBLAS, which starts one thread per core unless ``OMP_NUM_THREADS`` or
    ``OPENBLAS_NUM_THREADS`` was set before it loaded. The mask ranks call scipy's
    ``syevr`` in the pass's helper thread while the caller computes on the other
    core, so those extra threads only contend: on this project's 2-core VM,
    ``mask_stats`` on a 250M x 3 zoo took 23.6 s and 35 CPU-s without the
    variables against 18.2 s and 25 CPU-s with ``OPENBLAS_NUM_THREADS=1``.

    The setting is process-wide (OpenBLAS has one pool), so blocks that overlap
    (passes in several threads of one process, a dask worker with many threads)
    share one limit, the first block's, restored when the last one ends.
    """
    if n is None:
        yield
        return
    with _BLAS_LOCK:
        if _BLAS["depth"] == 0:
            held = _blas_controller().limit(limits=n, user_api="blas")
            held.__enter__()
            _BLAS["held"] = held
        _BLAS["depth"] += 1
    try:
        yield
    finally:
        with _BLAS_LOCK:
            _BLAS["depth"] -= 1
            if _BLAS["depth"] == 0:
                held, _BLAS["held"] = _BLAS["held"], None
                held.__exit__(None, None, None)


def _blas_controller():
    """threadpoolctl's view of the BLAS libraries loaded now. It sees only those, so
    it is made again once scipy's LAPACK has been loaded since (a pass that calls
    scipy imports it before the pass starts, :class:`curvlens.passes.analyze_masks.MaskStats`);
    scipy is not imported here: a merge never needs it (0.1 s)."""
    key = tuple(m in sys.modules for m in ("numpy", "scipy.linalg"))
    if _BLAS.get("key") != key:
        from threadpoolctl import ThreadpoolController

        _BLAS["controller"], _BLAS["key"] = ThreadpoolController(), key
    return _BLAS["controller"]


#: glibc's mallopt parameters (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_ALLOCATOR: dict = {}


def keep_freed_memory() -> bool:
    """Let glibc reuse freed blocks up to 32 MB instead of returning them to the
    system (once per process; Linux with glibc only; ``CURVLENS_MALLOC=0`` turns
    it off). Returns whether it is in effect.

    A pass allocates every tensor's blocks afresh; by default glibc maps each
    block above 128 kB-32 MB (its adaptive threshold) from the kernel and unmaps
    it on free, so every page of every block is faulted in and zeroed again: on
    this project's VM that made a fresh torch result cost 2.6 ns per fp32 entry
    against 0.45 ns written into memory already held (a TIES merge of a 250M x 3
    zoo 11.5 s -> 10.1 s with the same peak RSS). Blocks above 32 MB (a large
    embedding) are still mapped and unmapped; up to 256 MB freed at the top of
    the heap is kept before trimming.
    """
    if "on" in _ALLOCATOR:
        return _ALLOCATOR["on"]
    on = False
    if sys.platform.startswith("linux") and os.environ.get("CURVLENS_MALLOC", "1") != "0":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            on = bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 256 << 20))
        except (OSError, AttributeError):  # not glibc (musl has no mallopt)
            on = False
    _ALLOCATOR["on"] = on
    return on


def threads_for(device: torch.device, threads: int | None = None) -> int | None:
    """The thread count a pass on ``device`` uses: ``threads`` if given, else the
    default on a CPU; GPU passes leave torch's CPU threads alone."""
    if threads is not None:
        return _check(threads)
    return _DEFAULT["cpu"] if device.type == "cpu" else None


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as torch reads it.

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise CurvlensError(f"device={device!r} is not a torch device ('auto', 'cpu', 'cuda', 'cuda:1')") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CurvlensError(f"device={device!r} requested but CUDA is not available; use 'auto' or 'cpu'")
    return dev


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar over ``total`` tensors (off when ``enabled`` is False or
    ``TQDM_DISABLE`` is set)."""
    from tqdm.auto import tqdm

    # TQDM_DISABLE is honoured although disable= is passed explicitly
    off = not enabled or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    return tqdm(total=total, desc=desc, unit="tensor", disable=off, leave=False)


# -- a helper thread for whole jobs ---------------------------------------------
#: Bytes the queued and running jobs of a pass's :class:`Background` may hold
#: (their inputs) before a new job runs in the caller. One job is always
#: admitted when nothing is pending, however large.
BUDGET = 512 << 20


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def side_by_side(first: Callable[[], object], second: Callable[[], object]) -> tuple:
    """``(first(), second())`` with ``second`` handed to a helper thread while the
    caller runs ``first`` (the caller runs ``second`` too if the helper has not
    started it by then): the two halves of one job, e.g. a tensor's entries split
    at a block boundary."""
    share = Background(True, budget=None)
    try:
        share.submit(second, 0)
        a = first()
        b = share.results()[0]
    finally:
        share.close()
    return a, b


def cpu_has_avx2() -> bool:
    """Whether the CPU itself has AVX2 (or better), whatever ``ATEN_CPU_CAPABILITY``
    this process runs under: torch's cpuinfo probe, else the capability torch runs
    at ("AVX2" or "AVX512"; a check for the substring "AVX2" misses the latter)."""
    probe = getattr(torch.cpu, "_is_avx2_supported", None)  # hardware, not the env-limited capability
    if probe is not None:
        return bool(probe())
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


def background_enabled(device: torch.device) -> bool:
    """Whether a pass on ``device`` hands jobs to a helper thread: on a CPU with
    two cores or more, unless ``CURVLENS_BACKGROUND=0`` (a GPU's kernels are
    queued asynchronously already)."""
    return device.type == "cpu" and _cores() >= 2 and os.environ.get("CURVLENS_BACKGROUND", "1") != "0"


class _Done:
    """A job finished in the caller, answering as a Future does."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class _Queued:
    """A job handed to the helper: its future, and the job itself (until it is
    done: it holds the job's inputs) for the caller to run if the helper has not
    started it when the results are wanted."""

    def __init__(self, future, fn):
        self.future, self.fn = future, fn

    def result(self):
        return self.future.result()


class Background:
    """Whole jobs run by one helper thread, first in first out, holding at most
    ``budget`` bytes of jobs' inputs; every job in the caller when not ``enabled``.

    When a job would go over the budget, ``when_full="caller"`` runs it at once in
    the caller (which would otherwise wait: both cores share the work, and a pass's
    results come back in order anyway), ``"wait"`` waits for room (jobs whose
    order matters: a file's writes). Results come back in submission order, so
    they do not depend on which thread ran what; each job uses the caller's torch
    thread count (torch keeps it per OS thread). The first error is raised by the
    next ``submit`` or by :meth:`results`, and the queued jobs after it do not run;
    :meth:`close` drops what has not started and stops the thread (call it
    however the work ends).

    Parameters
    ----------
    enabled : bool
        A helper thread (see :func:`background_enabled`), or none.
    budget : int, optional
        Bytes of inputs the pending jobs may hold (default :data:`BUDGET`).
    when_full : {"caller", "wait"}
    name : str
        The helper thread's name prefix.
    """

    def __init__(self, enabled: bool, budget: int | None = None, *, when_full: str = "caller",
                 name: str = "curvlens-bg"):
        if when_full not in ("caller", "wait"):
            raise CurvlensError(f"when_full must be 'caller' or 'wait'; got {when_full!r}")
        self.enabled, self.budget = bool(enabled), int(BUDGET if budget is None else budget)
        self.when_full = when_full
        self.jobs: list = []
        self.pending = 0
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name) if self.enabled else None

    def submit(self, fn: Callable[[], object], nbytes: int) -> None:
        if not self.enabled:
            self.jobs.append(_Done(fn()))
            return
        self._raise_failed()
        nbytes = max(0, int(nbytes))
        with self.cond:
            if self.when_full == "wait":
                while self.pending and self.pending + nbytes > self.budget and self.error is None:
                    self.cond.wait()
            full = self.pending and self.pending + nbytes > self.budget
            if not full:
                self.pending += nbytes
        self._raise_failed()
        if full:
            # the helper is a budget behind: the caller does this job itself
            self.jobs.append(_Done(fn()))
            return
        fut = self.pool.submit(self._run, fn, torch.get_num_threads())
        job = _Queued(fut, fn)
        fut.add_done_callback(lambda _f, n=nbytes: self._release(n, job))  # cancelled too
        self.jobs.append(job)

    def wait_room(self, nbytes: int) -> None:
        """Before making a job's inputs: a job larger than the budget waits until
        nothing is pending, so two such jobs (a large vocabulary's embedding) are
        never held at once; smaller ones never wait."""
        if not self.enabled or int(nbytes) <= self.budget:
            return
        with self.cond:
            while self.pending:
                self.cond.wait()

    def _run(self, fn, threads: int):
        if self.error is not None:  # an earlier job failed: the work is abandoned
            return None
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        try:
            return fn()
        except BaseException as err:
            if self.error is None:
                self.error = err
            raise

    def _release(self, nbytes: int, job: _Queued) -> None:
        job.fn = None  # a finished job's inputs are freed now, not with the results
        with self.cond:
            self.pending -= nbytes
            self.cond.notify_all()

    def _raise_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def results(self) -> list:
        """Every job's result, in submission order. In ``"caller"`` mode the caller
        first takes the jobs the helper has not started, from the last one back
        (the helper works from the first): at the end of a pass both cores drain
        the queue, where the caller used to wait for the helper alone (1.5 s of
        a 23 s ``mask_stats`` on the benchmark zoo)."""
        if self.when_full == "caller":
            for i in range(len(self.jobs) - 1, -1, -1):
                job = self.jobs[i]
                if not isinstance(job, _Queued):
                    continue
                self._raise_failed()
                fn = job.fn
                if fn is not None and job.future.cancel():  # not started: the caller runs it now
                    self.jobs[i] = _Done(fn())
                del fn
        self._raise_failed()
        out = [f.result() for f in self.jobs]
        self.jobs = []
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        self.jobs = []
