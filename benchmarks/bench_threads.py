"""Torch intra-op threads for curvlens's CPU passes: 1 vs 2 (or more), quiet and busy.

usage: python benchmarks/bench_threads.py ZOO_DIR [--threads 1 2] [--layers 4]

ZOO_DIR is a ``../shared/bench/make_zoo.py`` zoo. Each setting runs two passes,
``curvature_overlap`` over the tensors of the first ``--layers`` layers and an
OTA+FFG merge (in memory) of the whole zoo, first on a quiet machine, then with
one busy process per core but one (``while True: pass``), which is what a shared
2-core machine looks like. Times are wall seconds; the table gives the ratio to
one thread in the same condition. One untimed warm-up run first puts the zoo in
the page cache; each setting then runs ``--repeat`` times and the fastest counts.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


def run(zoo: Path, threads: int, layers: int) -> dict[str, float]:
    import curvlens as cl

    dirs = sorted(p for p in zoo.iterdir() if p.name != "base")
    ex = cl.Experts.from_dirs(zoo / "base", dirs)
    names = [n for n in ex.tensor_names(floating_only=True)
             if any(f".layers.{i}." in n for i in range(layers))]
    out = {}
    cl.set_threads(threads)
    t = time.perf_counter()
    cl.curvature_overlap(ex, names=names, device="cpu", progress=False)
    out["curvature_overlap"] = time.perf_counter() - t
    t = time.perf_counter()
    cl.merge(ex, "ota", device="cpu", progress=False, ffg_density=0.3, epsilon=1e-26, fallback_to_base=True)
    out["ota+ffg merge"] = time.perf_counter() - t
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("zoo", type=Path)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2, help="runs per setting; the fastest counts")
    a = ap.parse_args()
    run(a.zoo, a.threads[0], a.layers)  # warm-up: the zoo's files into the page cache
    rows = []
    for condition in ("quiet", "busy"):
        hogs = []
        if condition == "busy":
            hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    for _ in range(max(1, (os.cpu_count() or 2) - 1))]
        try:
            for n in a.threads:
                runs = [run(a.zoo, n, a.layers) for _ in range(a.repeat)]
                times = {k: min(r[k] for r in runs) for k in runs[0]}
                rows += [(condition, task, n, s) for task, s in times.items()]
                print(condition, n, {k: round(v, 1) for k, v in times.items()}, flush=True)
        finally:
            for h in hogs:
                h.kill()
    base = {(c, task): s for c, task, n, s in rows if n == a.threads[0]}
    print(f"\n| condition | pass | threads | seconds | x {a.threads[0]} thread(s) |\n|---|---|---|---|---|")
    for c, task, n, s in rows:
        print(f"| {c} | {task} | {n} | {s:.1f} | {s / base[c, task]:.2f} |")


if __name__ == "__main__":
    main()
