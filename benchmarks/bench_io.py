"""Peak RSS while streaming every tensor of base, experts and moments.

usage: python benchmarks/bench_io.py ZOO_DIR   (a ../shared/bench/make_zoo.py zoo)

Reports the interpreter's RSS with torch imported, the peak RSS during a full
``Experts.iter_tensors`` pass that reads base + every expert + every moments file
for every name, and the pass's wall time. The issue's bound: peak within ~1.5 GB
of the baseline.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402  (baseline RSS includes torch)

from _common import peak_rss, rss_mb  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("zoo", type=Path)
    a = ap.parse_args(argv)
    baseline = rss_mb()
    from curvlens import Experts

    dirs = sorted(p for p in a.zoo.iterdir() if p.name.startswith("expert"))
    ex = Experts.from_dirs(a.zoo / "base", dirs)
    n_bytes = ex.reference.nbytes + sum(e.checkpoint.nbytes for e in ex.experts) + \
        sum(sum(e.moments.shape(n).numel() * 4 for n in e.moments) for e in ex.experts)
    checksum = 0.0
    with peak_rss() as r:
        # fp32 on the device, as every analysis and merge receives them; every
        # tensor is summed so every page is really read
        for g in ex.iter_tensors(device="cpu", progress=False):
            checksum += sum(float(t.sum()) for t in [g.base, *g.experts, *g.moments])
    largest = max(ex.reference.shape(n).numel() for n in ex.tensor_names())
    print(f"params per model: {ex.reference.numel / 1e6:.1f}M; experts: {len(ex)}; "
          f"bytes read: {n_bytes / 2**30:.2f} GiB; largest tensor: {largest / 1e6:.1f}M entries")
    print(f"baseline RSS (python + torch + curvlens): {baseline:.0f} MiB")
    print(f"peak RSS during full pass: {r['peak_mb']:.0f} MiB  (+{r['peak_mb'] - baseline:.0f} MiB)")
    print(f"wall time: {r['seconds']:.1f} s ({n_bytes / 2**20 / r['seconds']:.0f} MiB/s)  torch {torch.__version__}")
    return r


if __name__ == "__main__":
    main()
