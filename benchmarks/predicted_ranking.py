"""Does the curvature prediction rank merges as their measured scores do?

Merges the demo zoo's experts with a grid of methods, scores every merge on every
capability, and sets the predicted loss (``compare_merges``) against the measured
retention (``prediction_agreement``), with the prediction taken over every tensor
and without the heads (``--heads`` patterns: on the Llama zoo the shared
``lm_head`` and embeddings). Writes the per-merge table and the agreement.

    python benchmarks/predicted_ranking.py --zoo quick --out /tmp/ranking

The real-model tier (tests/real) runs the same study on MiniLM experts with
per-task classifier heads: ``python -m tests.real.study``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


import curvlens as cl
from curvlens.demo import RANKING_GRID
from curvlens.studies.prediction import prediction_study

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default="quick", choices=["quick", "default"])
    ap.add_argument("--heads", nargs="+", default=["role:lm_head", "role:embed"])
    ap.add_argument("--out", type=Path, default=Path("predicted_ranking"))
    a = ap.parse_args()
    t0 = time.perf_counter()
    zoo = cl.zoo.build(a.zoo, progress=False)
    experts = zoo.experts()
    merges = {label: cl.merge(experts, method, progress=False, **p) for label, method, p in RANKING_GRID}
    scores = zoo.score(merges)
    per, agree = prediction_study(experts, merges, scores, dict(zoo.capabilities), a.heads)
    a.out.mkdir(parents=True, exist_ok=True)
    ret = cl.merge_retention(scores, dict(zoo.capabilities))
    ret.to_csv(a.out / "retention.csv", index=False)
    per.to_csv(a.out / "predicted.csv", index=False)
    agree.to_csv(a.out / "agreement.csv", index=False)
    measured = ret[ret.capability == "mean"].set_index("model")["retention"]
    table = per.pivot_table(index="method", columns="variant", values="relative_loss", aggfunc="mean", sort=False)
    table["measured retention"] = measured.reindex(table.index)
    print(table.round(4).to_string())
    print(agree.round(3).to_string(index=False))
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
