"""Per-entry cost of every hot kernel against a memory-bandwidth floor, in one process.

usage: python benchmarks/bench_kernels.py [--log2n 24] [--repeat 5] [--json OUT.json]

Each kernel runs on synthetic inputs shaped like one tensor of a Llama-style zoo
(``2**log2n`` entries, a 1024-column matrix; bf16 weights, fp32 moments, three
experts), in its C implementation (:mod:`curvlens.math.native`) and its torch
one (``CURVLENS_NATIVE=0`` semantics: what a GPU or a machine without a compiler
runs), and is reported in ns per entry and as a multiple of the floors measured
in the same run on the same bytes:

- ``floor: sum``: ``torch.sum`` of one fp32 tensor of ``n`` entries (4 bytes
  per entry read: the memory bandwidth floor of one input);
- ``floor: read inputs``: reading every input the kernel reads once (a
  ``torch.sum`` of each), the floor of the kernel itself.

Timings are the fastest of ``--repeat`` runs (a shared machine only adds time).
The implementation each analysis uses on a CPU is the C one wherever it is
faster, which is what this table is for.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from curvlens.math import moment_sweep as M  # noqa: E402
from curvlens.math import native, pair_sweep as P  # noqa: E402
from curvlens.math.quantile import ScoreSource, TopKSketch  # noqa: E402


def best(fn, repeat: int) -> float:
    fn()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def torch_only(fn):
    """Run ``fn`` with the C kernels switched off (the torch implementation)."""
    def run():
        saved = native._STATE.get("lib")
        native._STATE["lib"] = None
        try:
            return fn()
        finally:
            native._STATE["lib"] = saved
    return run


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--log2n", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    if native.lib() is None:
        sys.exit(f"the C kernels did not build: {native.reason()}")
    n = 1 << a.log2n
    cols = 1024
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    xs = [(base.float() + torch.randn(n, generator=g) * 1e-3).to(torch.bfloat16) for _ in range(3)]
    vs = [torch.exp(torch.randn(n, generator=g) * 2 - 18) for _ in range(3)]
    # floors
    floor_sum = best(lambda: vs[0].sum(), a.repeat)
    rows = []

    def row(name, fn, reads, per=n, c_impl=True):
        """``reads``: the input tensors the kernel reads (its own floor)."""
        read_floor = best(lambda: [t.sum() for t in reads], a.repeat)
        t_c = best(fn, a.repeat) if c_impl else float("nan")
        t_t = best(torch_only(fn), a.repeat)
        rows.append({"kernel": name, "c_ns": t_c / per * 1e9, "torch_ns": t_t / per * 1e9,
                     "c_x_sum_floor": t_c / floor_sum, "c_x_read_floor": t_c / read_floor,
                     "torch_x_read_floor": t_t / read_floor, "read_floor_ns": read_floor / per * 1e9})
        r = rows[-1]
        print(f"{name:44s} C {r['c_ns']:7.2f} ns  torch {r['torch_ns']:7.2f} ns  "
              f"C/read-floor {r['c_x_read_floor']:6.1f}  torch/read-floor {r['torch_x_read_floor']:6.1f}", flush=True)

    ub = M.user_bins(np.linspace(-30, 0, 121))
    s0 = M.moment_sweep(vs[0])
    sums = [M.moment_sweep(v) for v in vs]
    tops = [M.order_selections(v, s, (), [n // 100, n // 10])[1] for v, s in zip(vs, sums)]
    row("moment sweep (hist, log10 sums, 120 user bins)", lambda: M.moment_sweep(vs[0], ub), [vs[0]])
    row("order selections (6 quantiles + 2 top sets)",
        lambda: M.order_selections(vs[0], s0, (0.5, 0.01, 0.1, 0.9, 0.99), [n // 100, n // 10]), [vs[0]])
    row("overlap sums (3 experts, 3 pairs)",
        lambda: P.overlap_sums(vs, [(0, 1), (0, 2), (1, 2)], 1e-30, [s.vmax for s in sums], tops), vs)
    row("task-vector sums (edit norms + 3 pairs)",
        lambda: P.tv_sums(base, xs, 3, vs, [(0, 1, 0, 1), (0, 2, 0, 2), (1, 2, 1, 2)]), [base, *xs, *vs])
    row("predicted loss sum (1 expert)", lambda: P.weighted_sq_diff(vs[0], xs[1], xs[0]), [vs[0], xs[0], xs[1]])

    def sketch():
        sk = TopKSketch()
        src = ScoreSource.of(base, xs[0], vs[0], "fisher")
        sk.update(src if src is not None and native.lib() is not None else
                  torch.mul(vs[0], (xs[0].float() - base.float()).square()))
    row("selection sketch, fisher scores (1 expert)", sketch, [base, xs[0], vs[0]])
    from curvlens.passes.analyze_masks import mask_sweep
    from curvlens.passes.thresholds import Selection

    sels = [Selection("e", "fisher", d, float(torch.quantile(vs[0][:1 << 20] * 1e-6, 1 - d)), 0, n, 0)
            for d in (0.1, 0.3)]
    b2, x2, v2 = base.reshape(-1, cols), xs[0].reshape(-1, cols), vs[0].reshape(-1, cols)
    row("mask sweep, 2 densities (1 expert)", lambda: mask_sweep(b2, x2, v2, "fisher", sels, "t"),
        [base, xs[0], vs[0]])
    from curvlens.math.methods import get_method

    ota = get_method("ota")
    shape = (n // cols, cols)
    bb, xx, vv = base.reshape(shape), [x.reshape(shape) for x in xs], [v.reshape(shape) for v in vs]
    row("OTA+FFG merge kernel (3 experts, torch)",
        lambda: ota(bb, xx, vv, ffg_threshold=[1e-14] * 3, fallback_to_base=True, epsilon=1e-26),
        [base, *xs, *vs], c_impl=False)
    row("naive merge kernel (mean of task vectors, torch)",
        lambda: (bb.float() + sum(x.float() - bb.float() for x in xx) / 3).to(torch.bfloat16),
        [base, *xs], c_impl=False)
    print(f"\nfloor: torch.sum of {n} fp32 entries: {floor_sum / n * 1e9:.2f} ns/entry")
    print("\n| kernel | C ns/entry | torch ns/entry | C x read floor | torch x read floor |\n|---|---|---|---|---|")
    for r in rows:
        c = "—" if np.isnan(r["c_ns"]) else f"{r['c_ns']:.2f}"
        cx = "—" if np.isnan(r["c_ns"]) else f"{r['c_x_read_floor']:.1f}"
        print(f"| {r['kernel']} | {c} | {r['torch_ns']:.2f} | {cx} | {r['torch_x_read_floor']:.1f} |")
    if a.json:
        a.json.write_text(json.dumps({"n": n, "floor_sum_ns": floor_sum / n * 1e9, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
