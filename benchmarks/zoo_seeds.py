"""The demo's numbers and verdicts as ranges over seeds (what docs/zoo.md and the README quote).

Runs the demo (``curvlens.demo.run_demo``, every analysis) on one zoo per seed,
then prints per seed and as a range over seeds: the base's, the experts' and each
merge's scores, each merge's gain kept (pooled over capabilities and its worst
capability), and each seed's verdicts beside the verdicts pooled over all seeds
(with their 95% intervals over evaluation items and seeds).

    python benchmarks/zoo_seeds.py --zoo quick --seeds 0 1 2 --out /tmp/zoo_seeds
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from curvlens.demo import run_demo
from curvlens.studies.gain import merge_gain


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default="quick", choices=["quick", "default"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=Path("zoo_seeds"))
    a = ap.parse_args()
    t0 = time.perf_counter()
    res = run_demo(a.out, config=a.zoo, device="cpu", overwrite=True, progress=False, seeds=a.seeds)
    frames = res["frames"]
    table = frames.get("merge_table_all_seeds", frames["merge_table"])
    caps = dict(res["zoo"].capabilities)
    per_seed = []
    for seed, t in table.groupby("seed", sort=False) if "seed" in table else [(a.seeds[0], table)]:
        g = merge_gain(t, caps)
        wide = g.pivot_table(index="model", columns="capability", values="accuracy", sort=False)
        wide["gain kept"] = g[g.capability == "pooled"].set_index("model")["gain_kept"]
        wide["worst gain kept"] = g[g.capability == "worst"].set_index("model")["gain_kept"]
        wide["retention (secondary)"] = g[g.capability == "pooled"].set_index("model")["retention"]
        per_seed.append(wide.assign(seed=seed))
        print(f"\n== seed {seed}\n{wide.drop(columns='pooled', errors='ignore').round(3).to_string()}")
    allseeds = pd.concat(per_seed)
    rng = allseeds.groupby(level=0, sort=False).agg(["min", "max"])
    print(f"\n== range over seeds {a.seeds}")
    cols = [c for c in rng.columns.levels[0] if c != "seed"]
    cells = pd.DataFrame({c: rng[c]["min"].round(3).astype(str) + "-" + rng[c]["max"].round(3).astype(str)
                          for c in cols})
    print(cells.to_string())
    if "findings_by_seed" in frames:
        by = frames["findings_by_seed"].pivot_table(index="claim", columns="seed", values="verdict",
                                                    aggfunc="first")
        by["pooled"] = frames["findings"].set_index("claim")["verdict"]
        print("\n== verdicts per seed and pooled over the seeds")
        print(by.to_string())
    with pd.option_context("display.max_colwidth", 400, "display.width", 250):
        print("\n== pooled findings")
        for r in frames["findings"].itertuples():
            print(f"({r.claim}) {r.verdict}: {r.evidence}")
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
