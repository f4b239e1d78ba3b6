"""Per-tensor work a pass hands to a second thread, within a memory budget.

The mask statistics' singular values (:func:`curvlens.math.mask_structure.mask_structure`,
twelve masks per matrix in a default ``mask_stats``) are half of a default
``cl.analyze`` on a CPU, and nothing the pass does next depends on them. On a
machine with two cores they run here, beside the read and the sweeps of the
tensors that follow. This is not the intra-op threading that
:mod:`curvlens.runtime` turns off by default (threads that meet at every torch
op, which a busy core made 6-12x slower): the two threads meet only at the
pass's end, and when the worker is a budget behind the caller takes the next
job itself instead of waiting, so the work is shared and a busy core costs the
time of the work, not more.

Results come back in the order the jobs were handed in, so a frame does not
depend on which thread ran what; each job uses the pass's torch thread count
(torch keeps it per OS thread). ``CURVLENS_BACKGROUND=0`` runs every job in the
caller's thread, as does a pass on a GPU (its kernels are already queued
asynchronously) or a machine with one core.
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch

__all__ = ["Background", "BUDGET"]

#: Bytes the queued and running jobs may hold (their inputs) before the caller
#: waits. One job is always admitted when nothing is pending, however large.
BUDGET = 512 << 20


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def background_enabled(device: torch.device) -> bool:
    """Whether jobs for a pass on ``device`` go to a second thread."""
    return device.type == "cpu" and _cores() >= 2 and os.environ.get("CURVLENS_BACKGROUND", "1") != "0"


class _Done:
    """A finished inline job, answering as a Future does."""

    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


class Background:
    """One worker thread, first in first out, holding at most ``budget`` bytes of
    jobs' inputs; a job that would go over it runs at once in the caller (which
    would otherwise wait), as does every job when not ``enabled``.

    ``submit(fn, nbytes)`` hands in a job; :meth:`results` waits for every job
    and returns their results in submission order (re-raising the first error);
    :meth:`close` cancels what has not started and stops the thread (a pass calls
    it however it ends).
    """

    def __init__(self, enabled: bool, budget: int | None = None):
        self.enabled, self.budget = bool(enabled), int(BUDGET if budget is None else budget)
        self.jobs: list = []
        self.pending = 0
        self.cond = threading.Condition()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="curvlens-bg") if self.enabled else None

    def submit(self, fn: Callable[[], object], nbytes: int) -> None:
        if not self.enabled:
            self.jobs.append(_Done(fn()))
            return
        self._raise_failed()
        nbytes = max(0, int(nbytes))
        with self.cond:
            full = self.pending and self.pending + nbytes > self.budget
            if not full:
                self.pending += nbytes
        if full:
            # The worker is behind: the caller does this job itself instead of
            # waiting, so both cores share the work and memory stays in budget.
            self.jobs.append(_Done(fn()))
            return
        threads = torch.get_num_threads()
        fut = self.pool.submit(self._run, fn, threads)
        fut.add_done_callback(lambda _f, n=nbytes: self._release(n))
        self.jobs.append(fut)

    def wait_room(self, nbytes: int) -> None:
        """Before making a job's inputs: a job larger than the budget waits until
        nothing is pending, so two such jobs (a large vocabulary's embedding) are
        never held at once; smaller ones never wait."""
        if not self.enabled or int(nbytes) <= self.budget:
            return
        with self.cond:
            while self.pending:
                self.cond.wait()

    @staticmethod
    def _run(fn, threads: int):
        # torch's intra-op thread count is per OS thread: use the caller's
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        return fn()

    def _release(self, nbytes: int) -> None:
        with self.cond:
            self.pending -= nbytes
            self.cond.notify_all()

    def _raise_failed(self) -> None:
        # fail fast: a job's error stops the pass at its next submission
        for f in self.jobs:
            if isinstance(f, Future) and f.done() and f.exception() is not None:
                raise f.exception()

    def results(self) -> list:
        """Every job's result, in submission order (waits for the running ones)."""
        out = [f.result() for f in self.jobs]
        self.jobs = []
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        self.jobs = []
