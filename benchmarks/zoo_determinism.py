"""Does the zoo build give the same models under other CPU settings? Measured.

Builds one zoo config and seed under several settings, each in a fresh process
(``ATEN_CPU_CAPABILITY`` and ``MKL_CBWR`` are read when torch loads), into its own
fresh cache, and compares: are the weights bit for bit identical, how far apart
are they, how far apart are the scores of the base, the experts and the demo's
merges. The settings stand in for "another machine": a CPU without AVX2 runs
ATen's ``default`` kernels, one with AVX-512 may run other MKL kernels, and a
thread count other than the build's own changes the order of float sums.

    python benchmarks/zoo_determinism.py --config quick --seed 0 --out /tmp/det
    python benchmarks/zoo_determinism.py --settings threads2 aten-default --config quick

Setting names: ``base`` (this process's environment), ``threads2`` (the build
forced to two torch threads), ``aten-default`` / ``aten-avx2`` / ``aten-avx512``
(``ATEN_CPU_CAPABILITY``), ``mkl-compatible`` / ``mkl-avx2`` (``MKL_CBWR``),
``pinned`` (the build as ``curvlens.zoo.build`` runs it: in a fresh process under
:func:`curvlens.zoo.pinning.build_environment`), and ``pinned+...`` (that build
from a caller with the named setting). The unpinned settings build in the
measuring process (``isolated=False``), as builds before code version 4 did.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

#: name -> (environment of the building process, forced torch threads, build in a pinned process)
SETTINGS = {
    "base": ({}, None, False),
    "threads2": ({}, 2, False),
    "aten-default": ({"ATEN_CPU_CAPABILITY": "default"}, None, False),
    "aten-avx2": ({"ATEN_CPU_CAPABILITY": "avx2"}, None, False),
    "aten-avx512": ({"ATEN_CPU_CAPABILITY": "avx512"}, None, False),
    "mkl-compatible": ({"MKL_CBWR": "COMPATIBLE"}, None, False),
    "mkl-avx2": ({"MKL_CBWR": "AVX2"}, None, False),
    "pinned": ({}, None, True),
    "pinned+threads2": ({"OMP_NUM_THREADS": "2"}, 2, True),
    "pinned+aten-default": ({"ATEN_CPU_CAPABILITY": "default"}, None, True),
    "pinned+mkl-compatible": ({"MKL_CBWR": "COMPATIBLE"}, None, True),
    # no build: the ``pinned`` setting's zoo evaluated under other kernels (what moves in evaluation alone)
    "eval-only+aten-default": ({"ATEN_CPU_CAPABILITY": "default"}, None, None),
    "eval-only+mkl-compatible": ({"MKL_CBWR": "COMPATIBLE"}, None, None),
}


def worker(config: str, seed: int, out: Path, threads: int | None, merges: bool, isolated: bool) -> None:
    """Build (in this process, with this environment) and write ``result.json``."""
    import torch

    import importlib

    import curvlens as cl

    build_mod = importlib.import_module("curvlens.zoo.build")  # the module (curvlens.zoo.build is also a function)

    if threads is not None:  # stand-in for a build that did not pin its threads
        real = build_mod.torch_threads
        build_mod.torch_threads = lambda n: real(threads)
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if isolated is None:  # evaluate the pinned setting's zoo, no build
        zoo = cl.zoo.build(config, seed=seed, cache_dir=out.parent / "pinned" / "cache", progress=False)
        stored = list(zoo.root.glob("scores-*.csv"))
        for p in stored:  # evaluated afresh in this process
            p.rename(p.with_suffix(".moved"))
    else:
        zoo = cl.zoo.build(config, seed=seed, cache_dir=out / "cache", progress=False, isolated=isolated)
    seconds = time.perf_counter() - t0
    hashes, tensors = {}, {}
    models = {"base": zoo.base_dir, **{e: d for e, d in zoo.expert_dirs.items()}}
    for label, d in models.items():
        ck = cl.Checkpoint.open(d)
        h = hashlib.sha256()
        for n in sorted(ck.keys()):
            t = ck[n].contiguous()
            h.update(n.encode())
            h.update(t.numpy().tobytes())
            tensors[f"{label}/{n}"] = t.float()
        hashes[label] = h.hexdigest()
    torch.save(tensors, out / "weights.pt")
    table = zoo.reference_scores(device="cpu")
    if merges:
        from curvlens.demo import evaluate_and_merge

        table, _ = evaluate_and_merge(zoo, zoo.experts(), device="cpu", progress=False)
    if isolated is None:
        for p in zoo.root.glob("scores-*.csv"):
            p.unlink()
        for p in stored:
            p.with_suffix(".moved").rename(p)
    (out / "result.json").write_text(json.dumps({
        "seconds": seconds, "hashes": hashes, "capability": torch.backends.cpu.get_cpu_capability(),
        "env": {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "OMP_NUM_THREADS")},
        "table": table[["model", "capability", "accuracy"]].to_dict("records"),
        "manifest_seconds": json.loads((zoo.root / "zoo.json").read_text()).get("build_seconds"),
    }))


def compare(results: dict[str, Path]) -> None:
    import pandas as pd
    import torch

    names = list(results)
    res = {k: json.loads((p / "result.json").read_text()) for k, p in results.items()}
    ref = names[0]
    w_ref = torch.load(results[ref] / "weights.pt")
    print(f"reference setting: {ref}")
    rows = []
    for k in names:
        r = res[k]
        same = {m: r["hashes"][m] == res[ref]["hashes"][m] for m in r["hashes"]}
        w = torch.load(results[k] / "weights.pt")
        # relative distance of each model from the reference's, over all its tensors
        dist = {}
        for m in r["hashes"]:
            keys = [n for n in w if n.startswith(m + "/")]
            num = sum(float((w[n] - w_ref[n]).double().square().sum()) for n in keys)
            den = sum(float(w_ref[n].double().square().sum()) for n in keys)
            dist[m] = (num / den) ** 0.5
        rows.append({"setting": k, "capability": r["capability"], "build_s": round(r["seconds"], 1),
                     "identical": all(same.values()),
                     "identical_models": ",".join(m for m, s in same.items() if s) or "-",
                     "max_rel_weight_dist": max(dist.values())})
    print(pd.DataFrame(rows).to_string(index=False))
    t = pd.concat([pd.DataFrame(res[k]["table"]).assign(setting=k) for k in names])
    wide = t.pivot_table(index=["model", "capability"], columns="setting", values="accuracy", sort=False)[names]
    wide["spread"] = wide.max(axis=1) - wide.min(axis=1)
    print(wide.round(3).to_string())
    means = t.groupby(["setting", "model"], sort=False)["accuracy"].mean().unstack("setting")[names]
    means["spread"] = means.max(axis=1) - means.min(axis=1)
    print("\nmean accuracy over capabilities:")
    print(means.round(3).to_string())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="quick")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--settings", nargs="+", default=["pinned", "base", "threads2", "aten-default", "mkl-compatible",
                                                      "pinned+threads2", "pinned+aten-default",
                                                      "eval-only+aten-default"])
    ap.add_argument("--out", type=Path, default=Path("zoo_determinism"))
    ap.add_argument("--merges", action="store_true", help="also score the demo's merges")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker is not None:
        env, threads, isolated = SETTINGS[a.worker]
        worker(a.config, a.seed, a.out / a.worker, threads, a.merges, isolated)
        return
    results = {}
    for s in a.settings:
        if s not in SETTINGS:
            raise SystemExit(f"unknown setting {s!r}; known: {sorted(SETTINGS)}")
        d = a.out / s
        if not (d / "result.json").is_file():
            d.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, **SETTINGS[s][0]}
            cmd = [sys.executable, __file__, "--worker", s, "--config", a.config, "--seed", str(a.seed),
                   "--out", str(a.out)] + (["--merges"] if a.merges else [])
            t0 = time.perf_counter()
            subprocess.run(cmd, env=env, check=True)
            print(f"{s}: {time.perf_counter() - t0:.0f} s", flush=True)
        results[s] = d
    compare(results)


if __name__ == "__main__":
    main()
