"""Shared helpers for the benchmarks: peak-RSS sampling and the I/O floor."""
from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


@contextmanager
def peak_rss():
    """Sample RSS every 5 ms in a thread; yields a dict filled with 'peak_mb' on exit."""
    out = {"start_mb": rss_mb(), "peak_mb": rss_mb()}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            out["peak_mb"] = max(out["peak_mb"], rss_mb())
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        stop.set()
        t.join()
        out["seconds"] = time.perf_counter() - t0
        out["peak_mb"] = max(out["peak_mb"], rss_mb())


def drop_page_cache_hint() -> str:
    """Benchmarks run warm (page cache holds the files after the first pass); say so."""
    return "warm page cache" if os.environ.get("CURVLENS_BENCH_COLD") is None else "cold"
