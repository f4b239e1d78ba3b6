"""How well the predicted loss ranks merges of real experts, with and without heads.

Run from the repository root (builds the real tier first, about 1.5 minutes)::

    python -m tests.real.study [ROOT [SETUP ...]]

Every set-up merges the experts with one or two merges of every method family
(``curvlens.demo.FAMILY_GRID``) and sets the diagonal prediction and its coherent
part (``split_merges``) against the measured gain kept, over all merges and over
each family and its complement (``agreement_by_family``: Spearman, p-value, 95%
interval). Three set-ups on all-MiniLM-L6-v2 experts fine-tuned by
``transformers.Trainer``:

``heads merged``
    The three sequence-classification experts merged whole (classifier and pooler
    too, as a merge that knows nothing of heads does), each task scored with the
    merged head; predicted over every tensor and without the heads.
``heads kept``
    The same experts with the heads left out of the merge
    (``Experts(exclude=HEADS)``): each task scored with its own expert's head.
``two architectures``
    All four experts (three sequence-, one token-classification) merged without
    their heads, each task scored with its own head.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

import curvlens as cl
from curvlens.demo import FAMILY_GRID
from curvlens.studies.prediction import agreement_by_family, split_merges
from tests.real.minilm import build_experts, evaluate

#: Task-specific tensors: each task's classifier and the pooler only the
#: sequence-classification head reads.
HEADS = ("classifier", "*.pooler.*")


def open_experts(zoo: dict, tasks, *, heads: bool) -> cl.Experts:
    """The tasks' experts over the sequence-classification base; ``heads=False``
    leaves the heads out."""
    return cl.Experts.from_dirs(zoo["bases"]["seqcls"], [zoo["experts"][t] for t in tasks], names=list(tasks),
                                exclude=None if heads else list(HEADS))


def score(zoo: dict, models: dict, tasks, *, own_heads: bool) -> pd.DataFrame:
    """``model, capability, accuracy, n, correct`` for the base, the experts and ``models``
    (label -> MergeResult or state), each task scored with its expert's head when
    ``own_heads`` (else with the merged one)."""
    rows = []

    def row(model, t, source, head_from=None):
        acc, correct = evaluate(source, t, head_from=head_from, items=True)
        rows.append({"model": model, "capability": t, "accuracy": acc, "n": len(correct), "correct": correct})

    for t in tasks:
        row(f"expert: {t}", t, zoo["experts"][t])
        row("base", t, zoo["bases"][zoo["arch"][t]], zoo["experts"][t] if own_heads else None)
    for label, m in models.items():
        state = dict(m.checkpoint.items()) if hasattr(m, "checkpoint") else m
        for t in tasks:
            row(label, t, state, zoo["experts"][t] if own_heads else None)
    return pd.DataFrame(rows)


def run(zoo: dict, grid=FAMILY_GRID, progress: bool = False, setups=None) -> dict:
    """Every set-up: ``{name: {"scores", "predicted", "agreement", "seconds"}}``
    (``grid``: label -> (method, params, family), as :data:`curvlens.demo.FAMILY_GRID`)."""
    seq = [t for t, a in zoo["arch"].items() if a == "seqcls"]
    every = {"heads merged": (seq, True), "heads kept": (seq, False),
             "two architectures": (list(zoo["experts"]), False)}
    setups = {k: v for k, v in every.items() if setups is None or k in setups}
    out = {}
    for name, (tasks, heads) in setups.items():
        t0 = time.perf_counter()
        experts = open_experts(zoo, tasks, heads=heads)
        merges = {label: cl.merge(experts, method, progress=progress, **p) for label, (method, p, _) in grid.items()}
        scores = score(zoo, merges, tasks, own_heads=not heads)
        caps = {t: t for t in tasks}
        families = {label: fam for label, (_, _, fam) in grid.items()}
        variants = {"all tensors": experts, "without heads": experts.without(list(HEADS))} if heads else \
            {"without heads": experts}  # kept heads are in neither the Experts nor the merges
        predicted, agreement = [], []
        for variant, ex in variants.items():
            pred = split_merges(ex, merges, progress=progress)
            predicted.append(pred.assign(variant=variant))
            agreement.append(agreement_by_family(pred, scores, caps, families).assign(variant=variant))
        predicted, agreement = pd.concat(predicted), pd.concat(agreement)
        out[name] = {"scores": scores, "predicted": predicted, "agreement": agreement,
                     "seconds": time.perf_counter() - t0}
    return out


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="curvlens-real-"))
    zoo = build_experts(root)
    print(f"real tier in {root} (built in {zoo['seconds']:.0f} s)")
    for name, r in run(zoo, setups=sys.argv[2:] or None).items():
        pivot = r["scores"].pivot_table(index="model", columns="capability", values="accuracy", sort=False)
        pivot["mean"] = pivot.mean(axis=1)
        print(f"\n== {name} ({r['seconds']:.0f} s)\n{pivot.round(3).to_string()}")
        a = r["agreement"][r["agreement"]["predictor"].isin(["relative_loss", "relative_coherent_loss"])]
        print(a.round(3).to_string(index=False))


if __name__ == "__main__":
    main()
