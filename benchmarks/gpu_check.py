"""The prepared GPU check (issue 25): one script, one run, every number in one table.

usage (on the GPU machine; ``bash benchmarks/gpu_check.sh`` sets it up):
    python benchmarks/gpu_check.py --device cuda --out "$OUT"
usage (rehearsal here, on a CPU):
    python benchmarks/gpu_check.py --device cpu --small --out /tmp/gpu_check

What it does, in order, each step within the time budget (``--budget-s``; a step
that would not fit is recorded as skipped, never silently dropped):

1. runs the test suite's CUDA tests (``-m cuda``: every test that skips without CUDA);
2. generates on the device a synthetic zoo with Llama-3.1-8B layer shapes (hidden
   4096, intermediate 14336, GQA with 8 kv heads, vocab 128256; ``benchmarks/gpu_zoo.py``)
   with as many layers as fit ``--max-gb`` of disk: base + 3 experts, bf16 weights as
   HF sharded safetensors, fp32 moments in the paper's layout;
3. times, from a cold page cache each (``drop_caches`` when root, else
   ``posix_fadvise(DONTNEED)`` on every input file): reading the inputs (weights; weights
   + moments), then linear, TIES 0.5, OTA+FFG 0.3 and the full analysis pass
   (``cl.analyze``) on the device, the same on the CPU cores, and mergekit (``--cuda``)
   on the same TIES config when mergekit is installed;
4. records peak GPU memory (``torch.cuda.max_memory_allocated``) and peak host RSS per
   job, checks peak GPU memory does not grow with the number of layers (the analysis
   pass over 1 layer vs all layers, embeddings left out so the layers decide the peak),
   and checks the device's merges against the CPU's: bitwise in fp32 for the
   deterministic methods (linear, TIES) on one layer, and the written bf16 models of
   every method entry by entry (count and largest difference); analysis frames by the
   largest relative difference per frame;
5. writes ``gpu_check.json`` and ``gpu_check.md`` under ``--out``.

Ratios are against the cold read of the same inputs measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import peak_rss  # noqa: E402
from gpu_zoo import LLAMA31_8B, SMALL, llama_shapes, make_zoo, zoo_bytes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MERGES = {  # name -> (method, params); the TIES config is also run through mergekit
    "linear": ("linear", {}),
    "ties": ("ties", {"density": 0.5}),
    "ota_ffg": ("ota", {"epsilon": 1e-26, "ffg_density": 0.3, "fallback_to_base": True}),
}
DETERMINISTIC = ("linear", "ties")


class Budget:
    """Wall-clock budget: a step runs only if its estimate fits what is left."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)

    def allows(self, estimate: float) -> bool:
        return self.left() > estimate


def files_of(dirs) -> list[Path]:
    return sorted(p for d in dirs for p in Path(d).rglob("*") if p.is_file())


def evict(paths) -> str:
    """Drop ``paths`` from the page cache; returns how (for the report)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        pass
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "posix_fadvise(DONTNEED)"


def read_files(paths, chunk: int = 64 << 20) -> int:
    """Read every byte (the floor every job is measured against)."""
    n, buf = 0, bytearray(chunk)
    view = memoryview(buf)
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while True:
                k = fh.readinto(view)
                if not k:
                    break
                n += k
    return n


def timed(fn, device: str) -> dict:
    """Run ``fn``; wall seconds, peak host RSS, peak GPU memory (when on CUDA)."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with peak_rss() as r:
        value = fn()
        if cuda:
            torch.cuda.synchronize()
    row = {"seconds": r["seconds"], "peak_rss_mb": r["peak_mb"]}
    if cuda:
        row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return {**row, "value": value}


def run_pytest_cuda(timeout: float) -> dict:
    """The suite's CUDA tests (marker ``cuda``); their pass/skip/fail counts."""
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("test_*.py")
                   if "requires_cuda" in p.read_text() or "mark.cuda" in p.read_text())
    if not files:
        return {"status": "no CUDA tests found"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "-rs", *files]
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {timeout:.0f} s", "files": files}
    tail = (p.stdout + p.stderr).strip().splitlines()
    return {"status": "ok" if p.returncode in (0, 5) else f"exit {p.returncode}", "files": files,
            "summary": tail[-1] if tail else "", "output_tail": "\n".join(tail[-30:])}


def compare_models(a: Path, b: Path) -> dict:
    """Entry-by-entry difference of two written models, tensor by tensor."""
    import curvlens as cl

    ca, cb = cl.Checkpoint.open(a), cl.Checkpoint.open(b)
    differ = total = 0
    worst = 0.0
    for name in ca.keys():
        x, y = ca[name], cb[name]
        if x.shape != y.shape or x.dtype != y.dtype:
            return {"error": f"{name}: {x.shape}/{x.dtype} vs {y.shape}/{y.dtype}"}
        ne = x != y
        differ += int(ne.sum())
        total += x.numel()
        if ne.any():
            worst = max(worst, float((x.float() - y.float()).abs().max()))
    return {"entries": total, "differing": differ, "max_abs_diff": worst, "bitwise": differ == 0}


def compare_frames(fa: dict, fb: dict) -> dict:
    """Largest relative difference of the numeric columns, per analysis frame."""
    import numpy as np
    import pandas as pd

    out = {}
    for key, a in fa.items():
        b = fb.get(key)
        if b is None or a.shape != b.shape:
            out[key] = "shape differs"
            continue
        num = [c for c in a.columns if pd.api.types.is_numeric_dtype(a[c]) and c in b.columns]
        x, y = a[num].to_numpy(float), b[num].to_numpy(float)
        both_nan = np.isnan(x) & np.isnan(y)
        rel = np.abs(x - y) / np.maximum(np.maximum(np.abs(x), np.abs(y)), 1e-30)
        rel[both_nan] = 0.0
        out[key] = float(np.nanmax(rel)) if rel.size else 0.0
    return out


def one_layer(experts):
    """The experts restricted to layer 0's tensors (no embeddings, head or final norm)."""
    return experts.without("role:embed").without("role:lm_head").without("model.norm.weight") \
        .without("model.layers.[1-9]*")


def layer_subset(experts):
    """Every decoder layer, no embeddings/head: the layers alone decide the peak."""
    return experts.without("role:embed").without("role:lm_head")


def ties_yaml(zoo: Path) -> str:
    models = "\n".join(f"  - model: {zoo / f'expert{i}'}\n    parameters: {{density: 0.5, weight: 1.0}}"
                       for i in range(3))
    return (f"merge_method: ties\nbase_model: {zoo / 'base'}\nmodels:\n{models}\n"
            "parameters: {normalize: true}\ndtype: bfloat16\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="small Llama-shaped zoo (hidden 256) for a CPU rehearsal")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    ap.add_argument("--scratch", type=Path, default=None, help="zoo and outputs (default: a dir under /tmp)")
    ap.add_argument("--layers", type=int, default=None, help="default: as many as fit --max-gb")
    ap.add_argument("--max-gb", type=float, default=None,
                    help="zoo size on disk (default: 30 GB, at most 40%% of the free disk; --small: 0.2)")
    ap.add_argument("--budget-s", type=float, default=500, help="stop starting new steps after this")
    ap.add_argument("--cpu-threads", type=int, default=os.cpu_count())
    ap.add_argument("--skip-tests", action="store_true")
    a = ap.parse_args(argv)

    import curvlens as cl

    budget = Budget(a.budget_s)
    dev = a.device
    cuda = dev.startswith("cuda")
    a.out.mkdir(parents=True, exist_ok=True)
    scratch = a.scratch or Path("/tmp") / f"curvlens_gpu_check_{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "device": dev, "small": a.small,
                    "torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "cpu_threads": a.cpu_threads, "steps": {}, "skipped": {}}
    if cuda:
        report["gpu"] = torch.cuda.get_device_name(0)
        report["gpu_memory_gb"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    try:
        import psutil

        report["host_ram_gb"] = psutil.virtual_memory().total / 2**30
    except ImportError:
        pass

    def save():
        (a.out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
        (a.out / "gpu_check.md").write_text(markdown(report))

    try:
        # 1. the CUDA tests
        if not a.skip_tests:
            report["steps"]["cuda_tests"] = run_pytest_cuda(timeout=min(180, max(30, budget.left() / 4)))
            print("cuda tests:", report["steps"]["cuda_tests"].get("summary", report["steps"]["cuda_tests"]))
            save()

        # 2. the zoo, generated on the device
        shapes_of = SMALL if a.small else LLAMA31_8B
        free = shutil.disk_usage(scratch).free
        max_bytes = (a.max_gb if a.max_gb is not None else (0.2 if a.small else min(30.0, 0.4 * free / 2**30))) * 2**30
        layers = a.layers
        if layers is None:
            layers = 1
            while zoo_bytes(llama_shapes(**shapes_of, layers=layers + 1), 3) <= max_bytes:
                layers += 1
        zoo = scratch / "zoo"
        if zoo.exists():
            shutil.rmtree(zoo)
        gen = timed(lambda: make_zoo(zoo, layers=layers, shapes_of=shapes_of, device=dev), dev)
        report["zoo"] = {**gen.pop("value"), **gen}
        print(f"zoo: {layers} layers, {report['zoo']['bytes'] / 2**30:.1f} GiB in {gen['seconds']:.0f} s")
        save()

        experts = cl.Experts.from_dirs(zoo / "base", [zoo / f"expert{i}" for i in range(3)])
        weights = files_of([zoo / "base", *(zoo / f"expert{i}" for i in range(3))])
        weights = [p for p in weights if "export" not in p.parts]
        everything = files_of([zoo])

        # 3. the read floors, cold and warm
        rows = report["steps"]["jobs"] = []
        for label, paths in (("read weights", weights), ("read weights+moments", everything)):
            how = evict(everything)
            r = timed(lambda: read_files(paths), "cpu")
            nbytes = r.pop("value")
            rows.append({"job": label, "device": "disk", "cache": how, **r, "gb": nbytes / 1e9,
                         "gb_per_s": nbytes / 1e9 / r["seconds"]})
            w = timed(lambda: read_files(paths), "cpu")
            w.pop("value")
            rows.append({"job": label, "device": "disk", "cache": "warm", **w})
        floor = {"weights": rows[0]["seconds"], "all": rows[2]["seconds"]}
        report["floor_cold_s"] = floor
        save()

        # 4. the jobs, on the device and on the CPU cores
        outs: dict = {}
        frames: dict = {}
        devices = [dev] + (["cpu"] if cuda else [])
        for d in devices:
            threads = a.cpu_threads if d == "cpu" else None
            for job in ("ota_ffg", "analyze", "ties", "linear"):
                reads = "weights" if job in ("ties", "linear") else "all"
                estimate = floor[reads] * (6 if d == "cpu" else 2) + 5
                if not budget.allows(estimate):
                    report["skipped"][f"{job}@{d}"] = f"budget: {budget.left():.0f} s left, estimate {estimate:.0f} s"
                    continue
                how = evict(everything)
                if job == "analyze":
                    fn = (lambda d=d, threads=threads:
                          cl.analyze(experts, device=d, progress=False, threads=threads))
                else:
                    method, params = MERGES[job]
                    out = scratch / f"out_{job}_{d.replace(':', '')}"
                    fn = (lambda method=method, params=params, out=out, d=d, threads=threads:
                          cl.merge(experts, method, out, device=d, progress=False, overwrite=True,
                                   threads=threads, **params).path)
                r = timed(fn, d)
                value = r.pop("value")
                if job == "analyze":
                    frames[d] = value
                else:
                    outs[job, d] = value
                rows.append({"job": job, "device": d, "cache": how, **r,
                             "x_cold_read": r["seconds"] / floor[reads]})
                print(f"{job:8s} {d:6s} {r['seconds']:7.1f} s  x{r['seconds'] / floor[reads]:.2f} of the cold read")
                save()

        # mergekit on the same TIES config
        mk = shutil.which("mergekit-yaml")
        if mk is None:
            report["skipped"]["mergekit"] = "mergekit-yaml not installed (carry the wheel: benchmarks/gpu_check.sh)"
        elif not budget.allows(floor["weights"] * 8 + 10):
            report["skipped"]["mergekit"] = f"budget: {budget.left():.0f} s left"
        else:
            cfg = scratch / "ties.yml"
            cfg.write_text(ties_yaml(zoo))
            out = scratch / "out_mergekit_ties"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [mk, str(cfg), str(out)] + (["--cuda"] if cuda else [])
            how = evict(everything)
            r = timed(lambda: subprocess.run(cmd, capture_output=True, text=True), "cpu")
            proc = r.pop("value")
            row = {"job": "mergekit ties", "device": dev if cuda else "cpu", "cache": how, **r,
                   "x_cold_read": r["seconds"] / floor["weights"], "exit": proc.returncode}
            if proc.returncode:
                row["error"] = (proc.stderr or proc.stdout)[-800:]
            rows.append(row)
            # curvlens on the very same YAML, for the side-by-side
            cfgd = cl.load_merge_config(cfg)
            how = evict(everything)
            r = timed(lambda: cl.merge(cfgd.experts(), cfgd.method, scratch / "out_curvlens_yaml_ties", device=dev,
                                       progress=False, overwrite=True, **cfgd.merge_kwargs()).path, dev)
            r.pop("value")
            rows.append({"job": "curvlens ties (same YAML)", "device": dev, "cache": how, **r,
                         "x_cold_read": r["seconds"] / floor["weights"]})
            save()

        # 5. the device against the CPU
        checks = report["steps"]["checks"] = {}
        if cuda:
            for job in MERGES:
                if (job, dev) in outs and (job, "cpu") in outs:
                    checks[f"{job} written bf16, {dev} vs cpu"] = compare_models(outs[job, dev], outs[job, "cpu"])
            sub = one_layer(experts)
            for job in DETERMINISTIC:
                method, params = MERGES[job]
                if not budget.allows(20):
                    report["skipped"][f"fp32 bitwise {job}"] = "budget"
                    continue
                m = [cl.merge(sub, method, None, device=d, dtype="float32", progress=False, **params).checkpoint
                     for d in (dev, "cpu")]
                differ = sum(int((m[0][n] != m[1][n]).sum()) for n in m[0].keys())
                checks[f"{job} fp32 one layer, {dev} vs cpu"] = {"differing": differ, "bitwise": differ == 0}
            if dev in frames and "cpu" in frames:
                checks["analysis frames: max relative difference"] = compare_frames(frames[dev], frames["cpu"])
            # peak GPU memory against the number of layers
            if budget.allows(floor["all"] * 3):
                peaks = {}
                for label, ex in (("1 layer", one_layer(experts)), (f"{layers} layers", layer_subset(experts))):
                    r = timed(lambda ex=ex: cl.analyze(ex, device=dev, progress=False), dev)
                    peaks[label] = r["peak_gpu_mb"]
                checks["peak GPU MB of the analysis pass, by layers (no embeddings)"] = peaks
            else:
                report["skipped"]["gpu memory vs layers"] = "budget"
        for p in scratch.glob("out_*"):
            shutil.rmtree(p, ignore_errors=True)
    except Exception as err:  # the table so far is still worth having
        report["error"] = f"{type(err).__name__}: {err}"
        raise
    finally:
        report["wall_s"] = budget.seconds - budget.left()
        save()
        if a.scratch is None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


def markdown(report: dict) -> str:
    """The report as the table docs/gpu.md quotes."""
    z = report.get("zoo", {})
    lines = [f"# curvlens GPU check, {report['date']}", "",
             f"- device: {report.get('gpu', report['device'])} ({report.get('gpu_memory_gb', 0):.0f} GiB); "
             f"{report['cpu_count']} CPU cores (jobs on the CPU use {report['cpu_threads']} threads); "
             f"host RAM {report.get('host_ram_gb', 0):.0f} GiB; torch {report['torch']}",
             f"- zoo: {z.get('layers')} layers of {'a small stand-in' if report['small'] else 'Llama-3.1-8B'} "
             f"shapes, base + {z.get('experts')} experts, {z.get('bytes', 0) / 2**30:.1f} GiB "
             f"(generated in {z.get('seconds', 0):.0f} s)", ""]
    tests = report["steps"].get("cuda_tests")
    if tests:
        lines += [f"- CUDA tests: {tests.get('summary') or tests.get('status')}", ""]
    lines += ["| job | device | cache | seconds | x cold read | peak RSS MB | peak GPU MB |",
              "|---|---|---|---|---|---|---|"]
    for r in report["steps"].get("jobs", []):
        x = f"{r['x_cold_read']:.2f}" if "x_cold_read" in r else (f"{r.get('gb_per_s', 0):.2f} GB/s"
                                                                  if "gb_per_s" in r else "")
        gpu = f"{r['peak_gpu_mb']:.0f}" if "peak_gpu_mb" in r else ""
        lines.append(f"| {r['job']} | {r['device']} | {r['cache']} | {r['seconds']:.1f} | {x} | "
                     f"{r['peak_rss_mb']:.0f} | {gpu} |")
    checks = report["steps"].get("checks") or {}
    if checks:
        lines += ["", "## device vs CPU", ""] + [f"- {k}: {v}" for k, v in checks.items()]
    if report["skipped"]:
        lines += ["", "## skipped", ""] + [f"- {k}: {v}" for k, v in report["skipped"].items()]
    if "error" in report:
        lines += ["", f"**stopped by an error:** {report['error']}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
