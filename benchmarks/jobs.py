"""One benchmark job per process, so each gets its own wall time and max RSS.

usage: python benchmarks/jobs.py JOB ZOO_DIR [OUT_DIR] [options]

Jobs (what ``benchmarks/remeasure.py`` runs, each under ``/usr/bin/time``):

- ``read``: read every byte of every input file once (16 MB reads): the read floor;
- ``naive``: the naive merge floor of the issue: read base and experts, mean of
  the task vectors in fp32, write bf16 safetensors (torch + safetensors only,
  tensor by tensor, no curvlens);
- ``analysis:NAME``: one curvlens analysis alone (``curvature_stats``,
  ``mask_stats`` (densities 0.1, 0.3), ...), as a user calls it;
- ``analyze``: ``cl.analyze`` with its defaults (every analysis in one pass);
  ``analyze_noranks``: the same with ``ranks=False`` (no mask singular values);
- ``merge:LABEL``: ``curvlens merge CONFIG OUT`` of a config written by
  ``remeasure.py`` (passed as ``--config``).

Every job runs with one torch thread unless ``--threads`` says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ANALYSES = ("curvature_stats", "moment_levels", "curvature_overlap", "log10_histogram", "edit_norms",
            "interference", "mask_stats", "mask_stats_noranks", "mask_overlap")


def input_files(zoo: Path) -> list[Path]:
    return sorted(p for p in zoo.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json"))


def read_floor(zoo: Path) -> int:
    n = 0
    for f in input_files(zoo):
        with open(f, "rb", buffering=0) as fh:
            while True:
                b = fh.read(1 << 24)
                if not b:
                    break
                n += len(b)
    return n


def naive_merge(zoo: Path, out: Path) -> None:
    """Mean of the task vectors, fp32, written bf16: the floor every method beats or not."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    def index(d: Path) -> dict:
        return json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]

    base = zoo / "base"
    experts = sorted(p for p in zoo.iterdir() if p.name.startswith("expert"))
    wmap = index(base)
    out.mkdir(parents=True, exist_ok=True)
    shard, size, k = {}, 0, 0
    for name, file in wmap.items():
        with safe_open(str(base / file), "pt") as f:
            b = f.get_tensor(name).float()
        acc = torch.zeros_like(b)
        for e in experts:
            with safe_open(str(e / index(e)[name]), "pt") as f:
                acc += f.get_tensor(name).float() - b
        shard[name] = (b + acc / len(experts)).to(torch.bfloat16)
        size += shard[name].numel() * 2
        if size > 1 << 30:
            save_file(shard, str(out / f"model-{k:05d}.safetensors"))
            shard, size, k = {}, 0, k + 1
    if shard:
        save_file(shard, str(out / f"model-{k:05d}.safetensors"))


def experts_of(zoo: Path):
    import curvlens as cl

    dirs = sorted(p for p in zoo.iterdir() if p.name.startswith("expert"))
    return cl.Experts.from_dirs(zoo / "base", dirs)


def run_analysis(zoo: Path, name: str) -> dict:
    from curvlens.passes import analysis as A
    from curvlens.studies.regime import edit_norms

    ex = experts_of(zoo)
    kw = {"device": "cpu", "progress": False}
    fns = {
        "curvature_stats": lambda: A.curvature_stats(ex, **kw),
        "moment_levels": lambda: A.moment_levels(ex, **kw),
        "curvature_overlap": lambda: A.curvature_overlap(ex, **kw),
        "log10_histogram": lambda: A.log10_histogram(ex, **kw),
        "edit_norms": lambda: edit_norms(ex, **kw),
        "interference": lambda: A.interference(ex, **kw),
        "mask_stats": lambda: A.mask_stats(ex, densities=(0.1, 0.3), **kw),
        "mask_stats_noranks": lambda: A.mask_stats(ex, densities=(0.1, 0.3), ranks=False, **kw),
        "mask_overlap": lambda: A.mask_overlap(ex, 0.3, **kw),
    }
    df = fns[name]()
    return {"rows": len(df), "reads": df.attrs.get("reads")}


def run_analyze(zoo: Path, ranks: bool = True) -> dict:
    import curvlens as cl

    out = cl.analyze(experts_of(zoo), device="cpu", progress=False, ranks=ranks)
    return {k: {"rows": len(v), "reads": v.attrs.get("reads")} for k, v in out.items()}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("job")
    ap.add_argument("zoo", type=Path)
    ap.add_argument("out", type=Path, nargs="?")
    ap.add_argument("--config", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    if a.job != "read":  # the read floor measures reading, not importing torch
        import torch

        torch.set_num_threads(a.threads)
    t = time.perf_counter()
    info: dict = {}
    if a.job == "read":
        info["bytes"] = read_floor(a.zoo)
    elif a.job == "naive":
        naive_merge(a.zoo, a.out)
    elif a.job in ("analyze", "analyze_noranks"):
        info = run_analyze(a.zoo, ranks=a.job == "analyze")
    elif a.job.startswith("analysis:"):
        info = run_analysis(a.zoo, a.job.split(":", 1)[1])
    elif a.job.startswith("merge:"):
        from curvlens.cli import main as cli

        rc = cli(["merge", str(a.config), str(a.out), "--quiet", "--overwrite", "--device", "cpu",
                  "--threads", str(a.threads)])
        if rc:
            sys.exit(rc)
    else:
        sys.exit(f"unknown job {a.job!r}")
    info["seconds_inside"] = time.perf_counter() - t
    print("JOB " + json.dumps(info), flush=True)
    os._exit(0)  # skip interpreter teardown: the timing is the job's


if __name__ == "__main__":
    main()
