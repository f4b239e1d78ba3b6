"""Re-measure every number of benchmarks/README.md in one run, one command.

usage: python benchmarks/remeasure.py ZOO_DIR --scratch DIR [--repeat 2] [--modes warm cold] [--no-mergekit]
           [--methods ties ota_ffg ...] [--analyses ...] [--paired N] [--unpinned] [--json OUT.json]
           [--markdown OUT.md]

bigger than RAM (``benchmarks/make_big_zoo.py``; warm is cold there):
       python benchmarks/remeasure.py BIG_ZOO --scratch DIR --repeat 1 --modes cold --analyses
           --methods ota_ffg --no-mergekit

ZOO_DIR: a ``make_zoo.py`` zoo (``../shared/bench/make_zoo.py``, or
``benchmarks/make_big_zoo.py``). Every row is its own process
(``benchmarks/jobs.py``) under ``/usr/bin/time`` (wall time, max RSS), one torch
thread (``OMP_NUM_THREADS=1`` for curvlens and mergekit alike; ``--unpinned``
leaves the thread variables out, as a notebook has them: curvlens then holds torch
and the BLAS libraries to its own count, ``curvlens.runtime``), fastest of
``--repeat`` runs:

- warm: the zoo's files in the page cache (a full read just before);
- cold: every input file dropped from the page cache first
  (``posix_fadvise(DONTNEED)``, which any reader may ask; outputs are written
  to ``--scratch``, not the zoo).

Rows: the read floor (every input byte once), the naive merge floor (read base
and experts, mean of task vectors in fp32, write bf16), each analysis alone,
``cl.analyze`` (all of them in one pass), and every merge method by curvlens and
by mergekit 0.1.5 on the same YAML (``dtype: float32``, ``out_dtype:
bfloat16``). Ratios are against the floors measured in the same run.

``--paired N`` then runs N more rounds, each the naive floor followed by every
curvlens row (each mode), and reports each row's time over the floor of its own
round: min, median and max. The naive floor is mostly the kernel zeroing fresh
pages, and its time swings up to 2x over a day on a shared VM; a ratio to a
floor taken seconds before moves far less than one to a floor of another hour.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from jobs import ANALYSES, input_files  # noqa: E402


def method_configs(zoo: Path) -> dict[str, dict]:
    """label -> mergekit / curvlens YAML (as a dict) for every method both have."""
    base = str(zoo / "base")
    ex = [str(p) for p in sorted(zoo.iterdir()) if p.name.startswith("expert")]

    def cfg(method, models, with_base=True, params=None, per_model=None):
        c = {"merge_method": method, "dtype": "float32", "out_dtype": "bfloat16",
             "models": [{"model": m, **({"parameters": per_model} if per_model else {})} for m in models]}
        if with_base:
            c["base_model"] = base
        if params:
            c["parameters"] = params
        return c

    w1 = {"weight": 1.0}
    return {
        "linear": cfg("linear", ex, False, None, w1),
        "task_arithmetic": cfg("task_arithmetic", ex, True, None, {"weight": 0.5}),
        "ties": cfg("ties", ex, True, None, {"weight": 1.0, "density": 0.5}),
        "dare_ties": cfg("dare_ties", ex, True, None, {"weight": 1.0, "density": 0.5}),
        "dare_linear": cfg("dare_linear", ex, True, None, {"weight": 1.0, "density": 0.5}),
        "breadcrumbs": cfg("breadcrumbs", ex, True, None, {"weight": 1.0, "density": 0.9, "gamma": 0.01}),
        "breadcrumbs_ties": cfg("breadcrumbs_ties", ex, True, None,
                                {"weight": 1.0, "density": 0.9, "gamma": 0.01}),
        "della": cfg("della", ex, True, None, {"weight": 1.0, "density": 0.5, "epsilon": 0.1}),
        "della_linear": cfg("della_linear", ex, True, None, {"weight": 1.0, "density": 0.5, "epsilon": 0.1}),
        "model_stock": cfg("model_stock", ex, True),
        "slerp": cfg("slerp", [base, ex[0]], True, {"t": 0.5}),
        "nuslerp": cfg("nuslerp", ex[:2], False, None, w1),
        "multislerp": cfg("multislerp", ex, True, None, w1),
        "karcher": cfg("karcher", ex, False),
        "sce": cfg("sce", ex, True, {"select_topk": 0.1}, w1),
        "arcee_fusion": cfg("arcee_fusion", [base, ex[0]], True),
        # curvlens only: the OTA paper's method (mergekit has no OTA)
        "ota_ffg": {"merge_method": "ota", "base_model": base, "models": [{"model": m} for m in ex],
                    "parameters": {"ffg_density": 0.3, "epsilon": 1e-26, "fallback_to_base": True},
                    "dtype": "float32", "out_dtype": "bfloat16"},
    }


def drop_cache(zoo: Path) -> None:
    """Ask the kernel to drop the zoo's files from the page cache (clean pages)."""
    for f in input_files(zoo):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(cmd: list[str], env: dict) -> tuple[float, float, str]:
    """(wall seconds, max RSS in MiB, stdout) of one process."""
    t = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-f", "TIME %e %M", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    line = [x for x in res.stderr.splitlines() if x.startswith("TIME ")][-1]
    _, _, rss_kb = line.split()
    return wall, int(rss_kb) / 1024, res.stdout


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("zoo", type=Path)
    ap.add_argument("--scratch", type=Path, required=True)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["warm", "cold"], choices=["warm", "cold"])
    ap.add_argument("--no-cold", action="store_true", help="the same as --modes warm")
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--methods", nargs="*")
    ap.add_argument("--analyses", nargs="*", default=list(ANALYSES))
    ap.add_argument("--paired", type=int, default=0, metavar="N",
                    help="N more rounds of (naive floor, every curvlens row): per-round ratios")
    ap.add_argument("--unpinned", action="store_true",
                    help="no OMP/MKL/OPENBLAS_NUM_THREADS in the jobs' environment, as in a notebook")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    a = ap.parse_args(argv)
    zoo, scratch = a.zoo.resolve(), a.scratch.resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    if a.unpinned:  # what a notebook has: every library picks its own thread count
        env = {k: v for k, v in env.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    py = [sys.executable, str(HERE / "jobs.py")]
    configs = method_configs(zoo)
    methods = a.methods or list(configs)
    import yaml

    for label in methods:
        (scratch / f"{label}.yml").write_text(yaml.safe_dump(configs[label], sort_keys=False))
    rows: list[dict] = []
    modes = ["warm"] if a.no_cold else list(a.modes)

    jobs: list[tuple[str, str, list[str], Path | None]] = []

    def once(mode: str, cmd: list[str], out: Path | None) -> tuple[float, float]:
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)
        if mode == "cold":
            drop_cache(zoo)
        else:
            timed(py + ["read", str(zoo)], env)  # fill the page cache
        t, r, _ = timed(cmd, env)
        if out is not None:
            shutil.rmtree(out, ignore_errors=True)
        return t, r

    def run(label: str, kind: str, cmd: list[str], out: Path | None = None):
        jobs.append((label, kind, cmd, out))
        rec = {"row": label, "kind": kind}
        for mode in modes:
            times, rss = [], 0.0
            for _ in range(a.repeat):
                t, r = once(mode, cmd, out)
                times.append(t)
                rss = max(rss, r)
            rec[f"{mode}_s"], rec[f"{mode}_rss_mb"] = min(times), rss
        rows.append(rec)
        print(json.dumps(rec), flush=True)

    out = scratch / "out"
    run("read every input byte", "floor", py + ["read", str(zoo)])
    run("naive merge (mean of task vectors, fp32, bf16 out)", "floor", py + ["naive", str(zoo), str(out)], out)
    for name in a.analyses:
        run(f"{name}", "analysis", py + [f"analysis:{name}", str(zoo)])
    run("cl.analyze (all of the above, one pass)", "analysis", py + ["analyze", str(zoo)])
    run("cl.analyze, ranks=False", "analysis", py + ["analyze_noranks", str(zoo)])
    for label in methods:
        cfg = scratch / f"{label}.yml"
        run(f"curvlens {label}", "method", py + [f"merge:{label}", str(zoo), str(out), "--config", str(cfg)], out)
        if not a.no_mergekit and label != "ota_ffg":
            mk = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
            run(f"mergekit {label}", "mergekit",
                [mk, str(cfg), str(out), "--no-copy-tokenizer", "--no-write-model-card", "--quiet",
                 "--out-shard-size", "500M"], out)
    result = {"zoo": str(zoo), "bytes": sum(f.stat().st_size for f in input_files(zoo)), "rows": rows}
    if a.paired > 0:
        naive = next(j for j in jobs if j[0].startswith("naive"))
        ours = [j for j in jobs if j[1] in ("analysis", "method")]
        rounds = []
        for i in range(a.paired):
            for mode in modes:
                floor_s, _ = once(mode, naive[2], naive[3])
                rec = {"round": i, "mode": mode, "naive_s": floor_s,
                       "rows": {label: once(mode, cmd, out)[0] for label, _, cmd, out in ours}}
                rounds.append(rec)
                print(json.dumps(rec), flush=True)
        result["paired"] = rounds
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    md = table(result, modes)
    if result.get("paired"):
        md += "\n\n" + paired_table(result["paired"], modes)
    print(md)
    if a.markdown:
        a.markdown.write_text(md)


def table(result: dict, modes) -> str:
    rows = result["rows"]
    floor = {m: next(r[f"{m}_s"] for r in rows if r["row"].startswith("naive")) for m in modes}
    read = {m: next(r[f"{m}_s"] for r in rows if r["row"].startswith("read")) for m in modes}
    mk = {r["row"].split(" ", 1)[1]: r for r in rows if r["kind"] == "mergekit"}
    head = "| job | " + " | ".join(f"{m} s | x naive floor ({m}) | x read ({m})" for m in modes)
    head += " | max RSS MiB | mergekit " + " | mergekit ".join(f"{m} s" for m in modes) + " | mergekit RSS MiB |"
    lines = [head, "|" + "---|" * (1 + 3 * len(modes) + 1 + len(modes) + 1)]
    for r in rows:
        if r["kind"] == "mergekit":
            continue
        cells = []
        for m in modes:
            cells += [f"{r[f'{m}_s']:.1f}", f"{r[f'{m}_s'] / floor[m]:.2f}", f"{r[f'{m}_s'] / read[m]:.2f}"]
        rss = max(r.get(f"{m}_rss_mb", 0) for m in modes)
        other = mk.get(r["row"].split(" ", 1)[1]) if r["kind"] == "method" else None
        extra = ([f"{other[f'{m}_s']:.1f}" for m in modes] + [f"{max(other[f'{m}_rss_mb'] for m in modes):.0f}"]
                 if other else ["—"] * (len(modes) + 1))
        lines.append(f"| {r['row']} | " + " | ".join(cells) + f" | {rss:.0f} | " + " | ".join(extra) + " |")
    return "\n".join(lines)


def paired_table(rounds: list[dict], modes) -> str:
    """Each row's time over the naive floor of its own round: min, median, max."""
    import statistics

    labels = list(rounds[0]["rows"])
    head = "| job | " + " | ".join(f"{m}: x floor of the round (min / median / max)" for m in modes) + " |"
    lines = [f"{len(rounds) // len(modes)} paired rounds; naive floor "
             + ", ".join(f"{m} {min(r['naive_s'] for r in rounds if r['mode'] == m):.1f}"
                         f"-{max(r['naive_s'] for r in rounds if r['mode'] == m):.1f} s" for m in modes),
             "", head, "|" + "---|" * (1 + len(modes))]
    for label in labels:
        cells = []
        for m in modes:
            x = [r["rows"][label] / r["naive_s"] for r in rounds if r["mode"] == m]
            cells.append(f"{min(x):.2f} / {statistics.median(x):.2f} / {max(x):.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
