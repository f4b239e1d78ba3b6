"""Wall time and peak RSS of the streaming analyses against the I/O floor.

usage: python benchmarks/bench_analysis.py ZOO_DIR [--device auto] [--density 0.3] [--threads N] [--profile N]
       [--repeat N]

ZOO_DIR is a ``../shared/bench/make_zoo.py`` zoo (the issue's: ``--hidden 1024
--layers 16 --inter 2816 --vocab 32000 --experts 3``, ~250M params x 3 experts).

Timed, in one process, after one untimed warm-up read (so every run sees a warm
page cache):

- ``floor``: read every input tensor once (base, experts, moments) through
  ``Experts.iter_tensors`` exactly as the analyses receive them (fp32 on the
  device) and touch each one; no math.
- ``curvature_overlap``: all pairs, every tensor (reads the moments).
- ``mask_stats``: one density, the fisher criterion (a threshold pass, then a
  statistics pass over base, experts and moments).

The target is ``curvature_overlap + mask_stats <= 4 x floor``, peak RSS within
~2 GB of the interpreter's. ``--profile N`` also prints the N most expensive
functions of each analysis (cProfile, cumulative time).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402  (baseline RSS includes torch)

from _common import drop_page_cache_hint, peak_rss, rss_mb  # noqa: E402


def io_floor(experts, device) -> float:
    """Read every input once, as the analyses receive it; touch every tensor."""
    total = 0.0
    for g in experts.iter_tensors(device=device, progress=False):
        for t in [g.base, *g.experts, *(g.moments or [])]:
            total += float(t.reshape(-1)[:: max(1, t.numel() // 4096)].sum())
    return total


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("zoo", type=Path)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--density", type=float, default=0.3)
    ap.add_argument("--profile", type=int, default=0, metavar="N")
    ap.add_argument("--repeat", type=int, default=2,
                    help="runs per row; the table reports the fastest (a shared machine adds noise, never speed)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's). On a CPU shared with other jobs, "
                         "1 avoids OpenMP threads waiting on descheduled siblings (a 5x slowdown seen)")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    baseline = rss_mb()
    from curvlens import Experts
    from curvlens.passes.analysis import curvature_overlap, mask_stats
    from curvlens.runtime import resolve_device

    dev = resolve_device(a.device)
    dirs = sorted(p for p in a.zoo.iterdir() if p.name.startswith("expert"))
    ex = Experts.from_dirs(a.zoo / "base", dirs)
    print(f"zoo: {a.zoo} ({ex.reference.numel / 1e6:.0f}M params x {len(ex)} experts), device {dev}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {drop_page_cache_hint()}, "
          f"baseline RSS {baseline:.0f} MiB", flush=True)
    io_floor(ex, dev)  # warm-up: fill the page cache

    runs = {
        "floor": lambda: io_floor(ex, dev),
        "curvature_overlap": lambda: curvature_overlap(ex, device=dev, progress=False),
        f"mask_stats(fisher, {a.density})": lambda: mask_stats(ex, densities=(a.density,), criteria=("fisher",),
                                                                device=dev, progress=False),
    }
    rows, outputs = [], {}
    for label, fn in runs.items():
        times, peak = [], 0.0
        for rep in range(max(1, a.repeat)):
            prof = cProfile.Profile() if a.profile and label != "floor" and rep == 0 else None
            with peak_rss() as r:
                if prof is not None:
                    prof.enable()
                outputs[label] = fn()
                if prof is not None:
                    prof.disable()
            times.append(r["seconds"])
            peak = max(peak, r["peak_mb"] - baseline)
        rows.append((label, min(times), peak))
        print(f"  {label:<28} {' '.join(f'{t:6.1f}' for t in times)} s   peak RSS +{peak:6.0f} MiB", flush=True)
        if prof is not None:
            s = io.StringIO()
            pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(a.profile)
            print(s.getvalue())
    floor = rows[0][1]
    analysis = sum(r[1] for r in rows[1:])
    print(f"\n| run | fastest of {a.repeat} (s) | x floor | peak RSS above baseline (MiB) |\n|---|---|---|---|")
    for label, sec, mb in rows:
        print(f"| {label} | {sec:.1f} | {sec / floor:.2f} | {mb:.0f} |")
    print(f"| overlap + mask_stats | {analysis:.1f} | {analysis / floor:.2f} | "
          f"{max(r[2] for r in rows[1:]):.0f} |")
    ov = outputs["curvature_overlap"]
    print(f"\noverlap rows {len(ov)}, spearman sampled on {int(ov['spearman_sampled'].sum())}; "
          f"mask_stats rows {len(outputs[list(runs)[2]])}")
    return rows


if __name__ == "__main__":
    main()
