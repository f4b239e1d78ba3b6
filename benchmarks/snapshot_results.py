"""Dump every merge output and analysis frame of the quick zoo, to compare two versions.

usage: python benchmarks/snapshot_results.py OUT_DIR             # dump
       python benchmarks/snapshot_results.py --compare DIR_A DIR_B [--rtol 1e-12]  # equal?

A refactoring must not change a result: run the dump on the old and the new code
(``PYTHONPATH=<old checkout>``) and compare. Merged tensors are compared bit for
bit (SHA-256 of their bytes), frames exactly (``DataFrame.equals`` after a CSV
round trip, NaN equal to NaN). The graft sweep and the scores re-evaluate models,
so they are compared too. A frame that differs is listed with, per column, the
largest absolute and relative difference (and how many values differ), so a
change of summation order (~1e-16) reads apart from a change of result;
``--rtol`` counts frames equal within that relative tolerance as "close".
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


def column_diffs(x, y) -> list[str]:
    """Per differing column: how many values differ, the largest absolute and
    relative difference (numeric columns; NaN equal to NaN)."""
    import numpy as np
    import pandas as pd

    out = []
    if list(x.columns) != list(y.columns) or len(x) != len(y):
        return [f"shape/columns differ: {list(x.columns)} x {len(x)} vs {list(y.columns)} x {len(y)}"]
    for c in x.columns:
        if x[c].equals(y[c]):
            continue
        if pd.api.types.is_numeric_dtype(x[c]) and pd.api.types.is_numeric_dtype(y[c]):
            u, v = x[c].to_numpy(dtype="float64"), y[c].to_numpy(dtype="float64")
            same = (u == v) | (np.isnan(u) & np.isnan(v))
            d = np.abs(u - v)[~same]
            scale = np.maximum(np.abs(u), np.abs(v))[~same]
            rel = np.where(scale > 0, d / np.where(scale > 0, scale, 1), np.inf)
            out.append(f"{c}: {int((~same).sum())} of {len(u)} differ, max abs {np.nanmax(d):.3g}, "
                       f"max rel {np.nanmax(rel):.3g}")
        else:
            out.append(f"{c}: {int((x[c].astype(str) != y[c].astype(str)).sum())} values differ")
    return out


def compare(a: Path, b: Path, rtol: float = 0.0) -> int:
    import pandas as pd

    bad, close = [], []
    names = sorted({p.name for p in a.iterdir()} | {p.name for p in b.iterdir()})
    for n in names:
        if not (a / n).is_file() or not (b / n).is_file():
            bad.append(f"{n}: only in one dump")
        elif n.endswith(".json"):
            ha, hb = json.loads((a / n).read_text()), json.loads((b / n).read_text())
            diff = sorted(k for k in ha.keys() | hb.keys() if ha.get(k) != hb.get(k))
            if diff:
                bad.append(f"{n}: {len(diff)} tensors differ, e.g. {diff[:3]}")
        else:
            x, y = pd.read_csv(a / n), pd.read_csv(b / n)
            if x.equals(y):
                continue
            diffs = column_diffs(x, y)
            rels = [float(d.split("max rel ")[1]) for d in diffs if "max rel " in d]
            within = rtol > 0 and len(rels) == len(diffs) and all(r <= rtol for r in rels)
            (close if within else bad).append(f"{n}: " + "; ".join(diffs))
    if close:
        print(f"equal within rtol {rtol:g}:\n  " + "\n  ".join(close))
    print("\n".join(bad) if bad else f"identical{' or close' if close else ''}: {len(names)} files")
    return 1 if bad else 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--compare", action="store_true")
    ap.add_argument("--rtol", type=float, default=0.0,
                    help="with --compare: frames whose every difference is within this relative tolerance are "
                         "reported as close, not different")
    a = ap.parse_args()
    sys.exit(compare(*a.dirs, rtol=a.rtol) if a.compare else dump(a.dirs[0]))
