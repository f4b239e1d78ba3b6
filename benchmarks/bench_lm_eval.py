"""Time per evaluation: lm-evaluation-harness vs the zoo's own evaluator, and one
model kept loaded across a sweep vs each model loaded afresh.

usage: python benchmarks/bench_lm_eval.py [--config quick] [--jobs 6] [--repeat 3] [--limit N]
       python benchmarks/bench_lm_eval.py --big DIR [--hidden 768] [--layers 12] [--models 3]

On the demo zoo (built or taken from the cache), every evaluator scores the same
models on the zoo's four capabilities:

* per evaluation: the base and each expert, scored ``--repeat`` times in turn by
  the zoo evaluator, the harness with the model kept loaded (weights swapped in),
  the harness loading each model afresh; the median seconds of each;
* per sweep: a serial :func:`curvlens.sweep` of ``--jobs`` task-arithmetic merges
  (scaling 0.3..1.0) with each evaluator; the sweep's wall time and the mean
  ``eval_s`` of its jobs. Each harness sweep checks its scores equal the zoo's.

With ``--big DIR``, only the load cost at a larger size: ``--models`` random
Llama models of ``--hidden`` x ``--layers`` (the zoo's tokenizer and vocabulary)
are written under DIR and scored in turn on 4 items per capability, kept loaded
and reloaded, so that loading, not decoding, is what differs.

One torch thread (curvlens's CPU default). Times are wall seconds: on a shared
machine, compare the ratios within one run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="quick")
    p.add_argument("--jobs", type=int, default=6)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--limit", type=int, default=None, help="items per capability (default: all)")
    p.add_argument("--big", help="scratch dir for the larger models (then only the load-cost comparison runs)")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--models", type=int, default=3)
    a = p.parse_args()
    if a.big:
        return big(a)

    import curvlens as cl
    from curvlens.studies.scores import wide_scores

    zoo = cl.zoo.load(a.config, progress=False)
    caps = list(zoo.capabilities.values())
    tasks = cl.evaluators.zoo_tasks(zoo)
    evaluators = {
        "zoo evaluator": zoo.evaluator(),
        "harness, kept loaded": cl.evaluators.lm_eval(caps, include_path=tasks, device="cpu", limit=a.limit),
        "harness, reloaded": cl.evaluators.lm_eval(caps, include_path=tasks, device="cpu", limit=a.limit,
                                                   keep_loaded=False),
    }
    models = [zoo.base_dir, *zoo.expert_dirs.values()]
    for ev in evaluators.values():  # warm-up: imports, first load, datasets' cache of the task files
        ev(str(models[0]))
    per_eval = {k: [] for k in evaluators}
    for _ in range(a.repeat):
        for m in models:
            for k, ev in evaluators.items():
                t = time.perf_counter()
                ev(str(m))
                per_eval[k].append(time.perf_counter() - t)
    print(f"per evaluation ({a.config} zoo, {len(caps)} capabilities, {len(models)} models x {a.repeat}):")
    base = statistics.median(per_eval["zoo evaluator"])
    for k, ts in per_eval.items():
        print(f"  {k:22s} median {statistics.median(ts):6.2f} s  ({statistics.median(ts) / base:4.1f}x the zoo's)")

    grid = [{"method": "task_arithmetic", "lambda": float(x)} for x in np.linspace(0.3, 1.0, a.jobs)]
    experts = zoo.experts()
    print(f"serial sweep of {a.jobs} task-arithmetic merges:")
    frames = {}
    for k, ev in evaluators.items():
        if k != "zoo evaluator":
            ev.release()  # each harness sweep starts with no model loaded
        df = cl.sweep(experts, grid, ev, progress=False)
        frames[k] = df
        jobs = df.drop_duplicates("job")
        print(f"  {k:22s} wall {df.attrs['wall_s']:6.1f} s  mean eval_s {jobs['eval_s'].mean():5.2f}  "
              f"mean merge_s {jobs['merge_s'].mean():5.2f}")
    if a.limit is None:
        ref = wide_scores(frames["zoo evaluator"]).set_index("label")[caps]
        for k in evaluators:
            assert wide_scores(frames[k]).set_index("label")[caps].equals(ref), k
        print("  the harness's scores equal the zoo evaluator's in every job")


def big(a) -> None:
    import shutil
    from pathlib import Path

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import curvlens as cl

    zoo = cl.zoo.load("quick", progress=False)
    cfg = LlamaConfig.from_pretrained(zoo.base_dir)
    cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size = a.hidden, a.layers, 4 * a.hidden
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = a.hidden // 64, a.hidden // 128, 64
    root = Path(a.big)
    dirs = []
    for i in range(a.models):
        d = root / f"model{i}"
        if not d.exists():
            torch.manual_seed(i)
            LlamaForCausalLM(cfg).save_pretrained(d)
            for f in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(zoo.base_dir / f, d / f)
        dirs.append(d)
    n = sum(t.numel() for t in cl.Checkpoint.open(dirs[0]).values())
    tasks, caps = cl.evaluators.zoo_tasks(zoo), list(zoo.capabilities.values())
    kept = cl.evaluators.lm_eval(caps, include_path=tasks, device="cpu", limit=4)
    fresh = cl.evaluators.lm_eval(caps, include_path=tasks, device="cpu", limit=4, keep_loaded=False)
    fresh(str(dirs[0]))  # warm-up: imports, page cache
    times = {"kept loaded": [], "reloaded": []}
    for _ in range(2):
        for d in dirs:
            for k, ev in (("kept loaded", kept), ("reloaded", fresh)):
                t = time.perf_counter()
                df = ev.scores(d)
                times[k].append((time.perf_counter() - t, df["load"].iloc[0]))
    print(f"{n / 1e6:.0f}M-parameter Llama (hidden {a.hidden}, {a.layers} layers), 4 items x {len(caps)} tasks:")
    for k, ts in times.items():
        secs = [t for t, _ in ts]
        print(f"  {k:12s} median {statistics.median(secs):6.2f} s per evaluation ({sorted(set(h for _, h in ts))})")


if __name__ == "__main__":
    main()
