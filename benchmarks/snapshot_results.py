"""Dump every merge output and analysis frame of the quick zoo, to compare two versions.

usage: python benchmarks/snapshot_results.py OUT_DIR             # dump
       python benchmarks/snapshot_results.py --compare DIR_A DIR_B  # equal?

A refactoring must not change a result: run the dump on the old and the new code
(``PYTHONPATH=<old checkout>``) and compare. Merged tensors are compared bit for
bit (SHA-256 of their bytes), frames exactly (``DataFrame.equals`` after a CSV
round trip, NaN equal to NaN). The graft sweep and the scores re-evaluate models,
so they are compared too.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path


def dump(out: Path) -> None:
    import torch

    torch.set_num_threads(1)  # the same reductions in the same order on every run
    from curvlens import zoo as zoo_mod
    from curvlens.demo import analysis_frames, evaluate_and_merge

    zoo = zoo_mod.build("quick", progress=False)
    experts = zoo.experts()
    table, merges = evaluate_and_merge(zoo, experts, device="cpu", progress=False)
    frames = analysis_frames(zoo, experts, merges, table, device="cpu", progress=False)
    out.mkdir(parents=True, exist_ok=True)
    for key, df in frames.items():
        df.to_csv(out / f"{key}.csv", index=False)
    hashes = {}
    for label, res in merges.items():
        res.report.to_csv(out / f"report_{label.replace(' ', '_').replace('/', '_')}.csv", index=False)
        for name in res.checkpoint:
            t = res.checkpoint[name].contiguous()
            hashes[f"{label}/{name}"] = hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()
    (out / "merged_tensors.json").write_text(json.dumps(hashes, indent=1, sort_keys=True))
    print(f"{len(frames)} frames, {len(hashes)} merged tensors -> {out}")


def compare(a: Path, b: Path) -> int:
    import pandas as pd

    bad = []
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    for n in names:
        if not (a / n).is_file() or not (b / n).is_file():
            bad.append(f"{n}: only in one dump")
        elif n.endswith(".json"):
            ha, hb = json.loads((a / n).read_text()), json.loads((b / n).read_text())
            diff = sorted(k for k in ha.keys() | hb.keys() if ha.get(k) != hb.get(k))
            if diff:
                bad.append(f"{n}: {len(diff)} tensors differ, e.g. {diff[:3]}")
        elif not pd.read_csv(a / n).equals(pd.read_csv(b / n)):
            bad.append(f"{n}: frames differ")
    print("\n".join(bad) if bad else f"identical: {len(names)} files")
    return 1 if bad else 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--compare", action="store_true")
    a = ap.parse_args()
    sys.exit(compare(*a.dirs) if a.compare else dump(a.dirs[0]))
