"""Sweeps, greedy soups and Pareto fronts on the demo zoo: the numbers in docs/soups_and_fronts.md.

    python benchmarks/soups_and_fronts.py --zoo quick --out /tmp/soups_and_fronts [--parts sweep soup front]

``sweep``: the same 10 merge + evaluate jobs serially and on a 2-worker
LocalCluster (wall times, with the load average before and after: the machine
may be shared). ``soup``: the greedy soup's path (mean and worst objective).
``front``: the curvature-predicted front (zero evaluations) checked against
``--samples`` evaluated c, and MAP's surrogate front from its own samples; their
agreement (Spearman of predicted against measured, front distance in c).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pandas as pd

import curvlens as cl
from curvlens.math.fronts import front_distance

GRID = (cl.sweep_grid("task_arithmetic", **{"lambda": [0.3, 0.5, 0.7, 1.0]})
        + cl.sweep_grid("ties", density=[0.3, 0.7])
        + [{"method": "linear"}, {"method": "fisher"}, {"method": "ota", "epsilon": 1e-26},
           {"method": "dare_ties", "density": 0.5, "seed": 0}])


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def part_sweep(zoo, experts, ev, out: Path, n_workers: int) -> dict:
    res = {"jobs": len(GRID), "load_before_serial": load()}
    t0 = time.perf_counter()
    serial = cl.sweep(experts, GRID, ev, progress=False)
    res["serial_s"] = time.perf_counter() - t0
    res["load_before_cluster"] = load()
    t0 = time.perf_counter()
    par = cl.sweep(experts, GRID, ev, client="local", n_workers=n_workers, progress=False)
    res["cluster_s"] = time.perf_counter() - t0  # starting and closing the cluster included
    # the same on a cluster started beforehand: cold workers (first imports), then warm
    from curvlens.studies.sweep import local_client

    t0 = time.perf_counter()
    client = local_client(n_workers)
    res["cluster_start_s"] = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        cl.sweep(experts, GRID, ev, client=client, progress=False)
        res["cluster_cold_sweep_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        cl.sweep(experts, GRID, ev, client=client, progress=False)
        res["cluster_warm_sweep_s"] = time.perf_counter() - t0
    finally:
        cluster = client.cluster
        client.close()
        cluster.close()
    res["load_after"] = load()
    res["n_workers"] = n_workers
    res["same_values"] = bool((serial["value"].round(9).tolist() == par["value"].round(9).tolist()))
    res["errors"] = int((serial["status"] != "ok").sum())
    serial.to_csv(out / "sweep_serial.csv", index=False)
    par.to_csv(out / "sweep_cluster.csv", index=False)
    return res


def part_soup(zoo, experts, ev, out: Path) -> dict:
    res = {}
    for objective in ("mean", "worst"):
        t0 = time.perf_counter()
        soup = cl.greedy_soup(experts, ev, objective, progress=False)
        res[objective] = {"ingredients": soup.ingredients, "seconds": time.perf_counter() - t0}
        soup.curve.to_csv(out / f"soup_{objective}.csv", index=False)
        print(soup.curve.round(3).to_string())
    return res


def part_front(zoo, experts, ev, out: Path, n_samples: int, n_checks: int) -> dict:
    caps = dict(zoo.capabilities)
    res = {}
    t0 = time.perf_counter()
    pred = cl.pareto_front(experts, progress=False)
    res["curvature_zero_eval_s"] = time.perf_counter() - t0
    res["curvature_front_points"] = int(pred.dense["on_front"].sum())
    t0 = time.perf_counter()
    cur = cl.pareto_front(experts, ev, predictor="curvature", capabilities=caps, n_samples=n_samples,
                          n_checks=n_checks, progress=False)
    res["curvature_checked_s"] = time.perf_counter() - t0
    res["curvature_agreement"] = cur.agreement.to_dict("records")
    res["curvature_summary"] = cur.summary
    t0 = time.perf_counter()
    mp = cl.pareto_front(experts, ev, n_checks=n_checks, progress=False)
    res["map_s"] = time.perf_counter() - t0
    res["map_agreement"] = mp.agreement.to_dict("records")
    res["map_summary"] = mp.summary
    coef = cur.coefficient_columns
    res["distance_curvature_front_to_map_front"] = front_distance(cur.front[coef].to_numpy(),
                                                                  mp.front[coef].to_numpy())
    for name, r in (("curvature", cur), ("map", mp)):
        r.dense.to_csv(out / f"front_{name}_dense.csv", index=False)
        r.evaluated.to_csv(out / f"front_{name}_evaluated.csv", index=False)
    print(cur.agreement.round(3).to_string())
    print(mp.agreement.round(3).to_string())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default="quick", choices=["quick", "default"])
    ap.add_argument("--out", type=Path, default=Path("soups_and_fronts"))
    ap.add_argument("--parts", nargs="+", default=["sweep", "soup", "front"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--checks", type=int, default=4)
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    zoo = cl.zoo.build(a.zoo, progress=False)
    experts = zoo.experts()
    ev = zoo.evaluator()
    results = {"zoo": a.zoo, "cpus": os.cpu_count()}
    if "sweep" in a.parts:
        results["sweep"] = part_sweep(zoo, experts, ev, a.out, a.workers)
        print(json.dumps(results["sweep"], indent=1))
    if "soup" in a.parts:
        results["soup"] = part_soup(zoo, experts, ev, a.out)
    if "front" in a.parts:
        results["front"] = part_front(zoo, experts, ev, a.out, a.samples, a.checks)
    (a.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(json.dumps(results, indent=1, default=str))
    pd.set_option("display.width", 200)


if __name__ == "__main__":
    main()
