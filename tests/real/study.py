"""How well the predicted loss ranks merges of real experts, with and without heads.

Run from the repository root (builds the real tier first, about 1.5 minutes)::

    python -m tests.real.study [ROOT]

Three set-ups on all-MiniLM-L6-v2 experts fine-tuned by ``transformers.Trainer``:

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
from curvlens.demo import RANKING_GRID
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
    """``model, capability, accuracy`` for the base, the experts and ``models``
    (label -> MergeResult or state), each task scored with its expert's head when
    ``own_heads`` (else with the merged one)."""
    rows = []
    for t in tasks:
        rows.append({"model": f"expert: {t}", "capability": t, "accuracy": evaluate(zoo["experts"][t], t)})
        rows.append({"model": "base", "capability": t,
                     "accuracy": evaluate(zoo["bases"][zoo["arch"][t]], t,
                                          head_from=zoo["experts"][t] if own_heads else None)})
    for label, m in models.items():
        state = dict(m.checkpoint.items()) if hasattr(m, "checkpoint") else m
        for t in tasks:
            rows.append({"model": label, "capability": t,
                         "accuracy": evaluate(state, t, head_from=zoo["experts"][t] if own_heads else None)})
    return pd.DataFrame(rows)


def run(zoo: dict, grid=RANKING_GRID, progress: bool = False) -> dict:
    """Every set-up: ``{name: {"scores", "predicted", "agreement", "seconds"}}``."""
    seq = [t for t, a in zoo["arch"].items() if a == "seqcls"]
    setups = {"heads merged": (seq, True), "heads kept": (seq, False),
              "two architectures": (list(zoo["experts"]), False)}
    out = {}
    for name, (tasks, heads) in setups.items():
        t0 = time.perf_counter()
        experts = open_experts(zoo, tasks, heads=heads)
        merges = {label: cl.merge(experts, method, progress=progress, **p) for label, method, p in grid}
        scores = score(zoo, merges, tasks, own_heads=not heads)
        caps = {t: t for t in tasks}
        if heads:  # predicted over every tensor and without the heads
            predicted, agreement = cl.prediction_study(experts, merges, scores, caps, list(HEADS),
                                                       progress=progress)
        else:  # the heads are in neither the Experts nor the merges
            predicted = cl.compare_merges(experts, merges, progress=progress)
            predicted.insert(0, "variant", "without heads")
            agreement = cl.prediction_agreement(predicted, scores, caps)
            agreement.insert(0, "variant", "without heads")
        out[name] = {"scores": scores, "predicted": predicted, "agreement": agreement,
                     "seconds": time.perf_counter() - t0}
    return out


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="curvlens-real-"))
    zoo = build_experts(root)
    print(f"real tier in {root} (built in {zoo['seconds']:.0f} s)")
    for name, r in run(zoo).items():
        pivot = r["scores"].pivot_table(index="model", columns="capability", values="accuracy", sort=False)
        pivot["mean"] = pivot.mean(axis=1)
        print(f"\n== {name} ({r['seconds']:.0f} s)\n{pivot.round(3).to_string()}")
        print(r["agreement"].round(3).to_string(index=False))


if __name__ == "__main__":
    main()
