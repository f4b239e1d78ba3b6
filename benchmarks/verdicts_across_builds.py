"""Do the demo's four verdicts survive a differently built zoo? Measured on zoos built elsewhere.

Takes zoo dirs built from the same config and seed under different CPU settings
(``benchmarks/zoo_determinism.py`` leaves one per setting under
``OUT/<setting>/cache/``), runs the demo's merges and analyses on each, and prints
each zoo's verdicts with the intervals they rest on, side by side: the verdicts
should agree, or be undecided with overlapping intervals.

    python benchmarks/verdicts_across_builds.py /tmp/det/base/cache/zoo-quick-* /tmp/det/threads2/cache/zoo-quick-*
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from curvlens.demo import analysis_frames, evaluate_and_merge
from curvlens.zoo.build import Zoo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("zoos", nargs="+", type=Path)
    ap.add_argument("--names", nargs="+", default=None)
    ap.add_argument("--out", type=Path, default=None, help="write verdicts.csv and intervals.csv here")
    a = ap.parse_args()
    names = a.names or [p.parent.parent.name for p in a.zoos]
    verdicts, intervals = [], []
    for name, root in zip(names, a.zoos):
        t0 = time.perf_counter()
        zoo = Zoo.from_dir(root)
        experts = zoo.experts()
        table, merges = evaluate_and_merge(zoo, experts, device="cpu", progress=False)
        frames = analysis_frames(zoo, experts, merges, table, device="cpu", progress=False)
        verdicts.append(frames["findings"].assign(build=name))
        intervals.append(frames["finding_intervals"].assign(build=name))
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    v, iv = pd.concat(verdicts), pd.concat(intervals)
    print(v.pivot_table(index="claim", columns="build", values="verdict", aggfunc="first")[names].to_string())
    iv["cell"] = iv.apply(lambda r: f"{r.estimate:.3g} [{r.low:.3g}, {r.high:.3g}] {r.outcome}", axis=1)
    with pd.option_context("display.width", 250, "display.max_colwidth", 60):
        print(iv.pivot_table(index=["claim", "subject", "metric"], columns="build", values="cell", aggfunc="first",
                             sort=False)[names].to_string())
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        v.to_csv(a.out / "verdicts.csv", index=False)
        iv.to_csv(a.out / "intervals.csv", index=False)


if __name__ == "__main__":
    main()
