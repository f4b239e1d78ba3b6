"""Does the curvature prediction rank merges as their measured scores do, family by family?

Merges each seed's demo zoo with one or two merges of every method family
(``curvlens.demo.FAMILY_GRID``: dense averages, magnitude trims, random
drop-and-rescale, curvature masks), scores every merge on every capability, and
sets the predicted loss against the measured gain kept
(``prediction_agreement``: Spearman, p-value, 95% interval over merges and
evaluation items), over all merges and over each family and its complement, for
the diagonal prediction and for its coherent part (``split_merges``). The
prediction is taken over every tensor and without the ``--heads`` (on the Llama
zoo the shared ``lm_head`` and embeddings). Also prints, per seed, claim (d)'s
comparison of OTA+FFG and TIES.

    python benchmarks/predicted_ranking.py --zoo quick --seeds 0 1 2 --out /tmp/ranking

The real-model tier (tests/real) runs the same study on MiniLM experts with
per-task classifier heads: ``python -m tests.real.study``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

import curvlens as cl
from curvlens.demo import FAMILY_GRID
from curvlens.studies.gain import merge_gain
from curvlens.studies.prediction import agreement_by_family, split_merges

SHOW = ["predicted_loss_increase", "relative_loss", "relative_coherent_loss", "relative_coherent_plus_unit"]


def run_seed(zoo_name: str, seed: int, heads, progress: bool = False) -> dict:
    zoo = cl.zoo.build(zoo_name, seed=seed, progress=progress)
    experts = zoo.experts()
    merges = {label: cl.merge(experts, method, progress=False, **p) for label, (method, p, _) in FAMILY_GRID.items()}
    scores = zoo.score(merges)
    caps = dict(zoo.capabilities)
    families = {label: fam for label, (_, _, fam) in FAMILY_GRID.items()}
    out = {"scores": scores, "gain": merge_gain(scores, caps)}
    for variant, ex in (("all tensors", experts), ("without heads", experts.without(heads))):
        pred = split_merges(ex, merges, progress=progress)
        agree = agreement_by_family(pred, scores, caps, families)
        out[variant] = (pred.assign(seed=seed, variant=variant), agree.assign(seed=seed, variant=variant))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default="quick", choices=["quick", "default"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--heads", nargs="+", default=["role:lm_head", "role:embed"])
    ap.add_argument("--out", type=Path, default=Path("predicted_ranking"))
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    preds, agrees, gains = [], [], []
    for seed in a.seeds:
        t0 = time.perf_counter()
        r = run_seed(a.zoo, seed, a.heads)
        r["scores"].assign(seed=seed).to_csv(a.out / f"scores_seed{seed}.csv", index=False)
        gains.append(r["gain"].assign(seed=seed))
        for variant in ("all tensors", "without heads"):
            preds.append(r[variant][0])
            agrees.append(r[variant][1])
        g = r["gain"].set_index(["model", "capability"])["gain_kept"].unstack("capability")
        print(f"\n== seed {seed} ({time.perf_counter() - t0:.0f} s): gain kept per merge")
        print(g.loc[[m for m in FAMILY_GRID if m in g.index]].round(3).to_string())
    pred, agree, gain = (pd.concat(x, ignore_index=True) for x in (preds, agrees, gains))
    pred.to_csv(a.out / "predicted.csv", index=False)
    agree.to_csv(a.out / "agreement.csv", index=False)
    gain.to_csv(a.out / "gain.csv", index=False)
    shown = agree[agree["predictor"].isin(SHOW)]
    for variant, g in shown.groupby("variant", sort=False):
        print(f"\n== agreement ({variant}): Spearman [95% interval] (p) per seed")
        cell = g.assign(cell=g.apply(lambda r: f"{r.spearman:+.2f} [{r.low:+.2f},{r.high:+.2f}] ({r.p_value:.2g})",
                                     axis=1))
        print(cell.pivot_table(index=["merges", "seed"], columns="predictor", values="cell", aggfunc="first",
                               sort=False)[SHOW].to_string())
        print(g.groupby(["merges", "predictor"], sort=False)["spearman"].agg(["mean", "min", "max"]).unstack(
            "predictor")[[(s, p) for s in ("mean", "min", "max") for p in SHOW]].round(2).to_string())


if __name__ == "__main__":
    main()
