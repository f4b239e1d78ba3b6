"""Wall time and peak RSS of each merge method against the I/O floor.

usage: python benchmarks/bench_merge.py ZOO_DIR [--out SCRATCH_DIR] [--methods linear ties ...]
       [--repeat N] [--threads N]

ZOO_DIR is a ``../shared/bench/make_zoo.py`` zoo (the issue's: ``--hidden 1024
--layers 16 --inter 2816 --vocab 32000 --experts 3``, ~250M params x 3 experts).

The I/O floor is measured in the same run with the same reader and writer: read
every input tensor once and write an output of the same size, no math. There are
two floors, because methods read different inputs: ``floor(weights)`` reads base +
experts (linear, task arithmetic, TIES, DARE) and ``floor(weights+moments)`` also
reads every moments file (Fisher, OTA). Each method's ratio is against its floor.
A third reference row, ``floor(weights) + fp32 cast``, also casts every input to
fp32 as the methods must (whole tensors at once, as the pre-block code did).
Runs are warm (the files sit in the page cache after the first pass), so the floor
is mostly deserialisation, casting and writing, the part curvlens controls. Each
row is run ``--repeat`` times (default 3) and the table reports the fastest and the
median: on a machine shared with other jobs, noise only ever adds time.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import peak_rss, rss_mb  # noqa: E402

METHODS = {
    "linear": ("linear", {}),
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.5}),
    "ties": ("ties", {"density": 0.5}),
    "dare_ties": ("dare_ties", {"density": 0.5}),
    "fisher": ("fisher", {}),
    "ota": ("ota", {"epsilon": 1e-26}),
    "ota+ffg": ("ota", {"epsilon": 1e-26, "ffg_density": 0.3, "fallback_to_base": True}),
}
NEEDS_MOMENTS = {"fisher", "ota", "ota+ffg"}


def io_floor(experts, out: Path, with_moments: bool, cast: bool = False):
    """Read every input tensor once, write one output tensor per name: no math.

    ``cast``: also cast every input to fp32, the one step every method needs (the
    reference row ``floor(weights) + fp32 cast``, not used for the ratios).
    """
    from curvlens.io.writer import ModelWriter

    names = experts.tensor_names()
    plan = [(n, experts.reference.shape(n), experts.reference.dtype(n)) for n in names]
    biggest = max(experts.reference.shape(n).numel() for n in names) * 4
    buf = None if cast else torch.empty(biggest, dtype=torch.uint8)
    with ModelWriter(out, overwrite=True, plan=plan) as w:
        for g in experts.iter_tensors(device="cpu", dtype=torch.float32 if cast else None,
                                      moments=with_moments, progress=False):
            if buf is not None:
                # safetensors maps files lazily: copy every byte of every input once
                # (a memcpy into a reused buffer), so the floor really reads the data
                for t in [g.base, *g.experts, *(g.moments or [])]:
                    raw = t.contiguous().view(-1).view(torch.uint8)
                    buf[: raw.numel()].copy_(raw)
            w.add(g.name, g.experts[0].to(experts.reference.dtype(g.name)))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("zoo", type=Path)
    ap.add_argument("--out", type=Path, default=Path("/tmp/curvlens-bench"))
    ap.add_argument("--methods", nargs="*", default=list(METHODS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs per row; the table reports the fastest (a shared machine adds noise, never speed)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (on a busy shared machine 1 can beat 2)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    baseline = rss_mb()
    from curvlens import Experts
    from curvlens.config.merge import merge

    dirs = sorted(p for p in a.zoo.iterdir() if p.name.startswith("expert"))
    ex = Experts.from_dirs(a.zoo / "base", dirs)
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []

    def record(label, fn, floor_key=None):
        out = a.out / label.replace("+", "_")
        times, peak = [], 0.0
        for _ in range(a.repeat):
            shutil.rmtree(out, ignore_errors=True)
            with peak_rss() as r:
                fn(out)
            times.append(r["seconds"])
            peak = max(peak, r["peak_mb"] - baseline)
            shutil.rmtree(out, ignore_errors=True)
        rows.append({"run": label, "seconds": min(times), "median": sorted(times)[len(times) // 2],
                     "peak_rss_mb": peak, "floor": floor_key})
        print(f"  {label:<28} {' '.join(f'{t:6.1f}' for t in times)} s   peak RSS +{peak:6.0f} MiB", flush=True)

    print(f"zoo: {a.zoo} ({ex.reference.numel / 1e6:.0f}M params x {len(ex)} experts), "
          f"device {a.device}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"baseline RSS {baseline:.0f} MiB")
    io_floor(ex, a.out / "warmup", True)  # fill the page cache so every run sees the same state
    record("floor(weights)", lambda o: io_floor(ex, o, False))
    record("floor(weights+moments)", lambda o: io_floor(ex, o, True))
    record("floor(weights) + fp32 cast", lambda o: io_floor(ex, o, False, cast=True), "floor(weights)")
    floors = {r["run"]: r["seconds"] for r in rows}
    for label in a.methods:
        method, params = METHODS[label]
        key = "floor(weights+moments)" if label in NEEDS_MOMENTS else "floor(weights)"
        record(label, lambda o: merge(ex, method, o, device=a.device, progress=False, **params), key)
    print(f"\n| run | fastest of {a.repeat} (s) | median (s) | x floor (fastest) | peak RSS above baseline (MiB) |"
          "\n|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['seconds'] / floors[r['floor']]:.2f}" if r["floor"] else "1.00"
        print(f"| {r['run']} | {r['seconds']:.1f} | {r['median']:.1f} | {ratio} | {r['peak_rss_mb']:.0f} |")
    shutil.rmtree(a.out / "warmup", ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
