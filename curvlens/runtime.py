"""Where and how curvlens's passes run: the device, how many torch threads they use
on a CPU (and a block that sets it), the progress bar.

Measured on the 2-core machine this project runs on (issue 13): with one other
busy process, torch's default two intra-op threads made ``curvlens analyze``
6-12x slower than one thread (254-471 s vs 39 s), ``curvature_overlap`` 16x and an
OTA+FFG merge 2.7x, while on a quiet machine two threads gained 9 %. Threads that
wait on each other cost far more than a second core gains, so every streaming pass
runs with ONE intra-op thread on a CPU by default (reading the next tensor still
overlaps the math, in the stream's prefetch thread). ``set_threads`` or a pass's
``threads=`` changes it; ``benchmarks/bench_threads.py`` measures both settings.

The second core is still used, by threads that do not meet at every op: the
mask statistics' singular values and the selections' per-expert sweeps
(:mod:`curvlens.passes.background`: the caller takes a job itself when the
helper is behind, so nobody waits on a busy core) and a merge's writes
(:class:`curvlens.io.writer.ModelWriter` with ``background=True``).
``CURVLENS_BACKGROUND=0`` keeps the passes' work in the caller's thread.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Iterator

import torch

from curvlens.errors import CurvlensError

__all__ = ["set_threads", "get_threads", "use_threads", "torch_threads", "threads_for", "resolve_device",
           "progress_bar", "keep_freed_memory"]

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
    glibc is told to keep freed blocks (:func:`keep_freed_memory`)."""
    n = _check(n)
    keep_freed_memory()
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


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
