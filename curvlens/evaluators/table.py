"""Several models scored by one evaluator, as one tidy frame (what ``curvlens eval`` writes)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from curvlens.errors import CurvlensError
from curvlens.evaluators.harness import SCORE_COLUMNS, LmEvalEvaluator


def score_models(models: Sequence, evaluator: LmEvalEvaluator, *, names: Sequence[str] | None = None,
                 progress=None) -> pd.DataFrame:
    """Every model's :meth:`LmEvalEvaluator.scores`, with a ``model`` column first.

    A model that cannot be loaded or scored is not dropped: each of its tasks has a
    row with ``status == "error"`` and the reason, and the next model is scored.

    Parameters
    ----------
    models : sequence of paths
        HF model dirs.
    evaluator : LmEvalEvaluator
    names : sequence of str, optional
        A label per model (default: the dir names, or the paths when two dirs share
        a name).
    progress : callable, optional
        Called with one line per model scored (e.g. ``print``).

    Returns
    -------
    pandas.DataFrame
        ``model`` and :data:`~curvlens.evaluators.harness.SCORE_COLUMNS`.
    """
    if not isinstance(evaluator, LmEvalEvaluator):
        raise CurvlensError(f"score_models takes an LmEvalEvaluator (cl.evaluators.lm_eval(...)); "
                            f"got a {type(evaluator).__name__}")
    models = [Path(m) for m in models]
    if not models:
        raise CurvlensError("score_models: no models given")
    if names is None:
        names = [m.name for m in models]
        if len(set(names)) < len(names):
            names = [str(m) for m in models]
    elif len(names) != len(models) or len(set(names)) < len(names):
        raise CurvlensError(f"names {list(names)}: expected {len(models)} distinct labels, one per model")
    frames = []
    for name, model in zip(names, models):
        try:
            df = evaluator.scores(model)
        except Exception as err:  # noqa: BLE001 - one model that cannot be scored is rows, not the end
            text = str(err) if isinstance(err, CurvlensError) else f"{type(err).__name__}: {err}"
            df = pd.DataFrame({"task": list(evaluator.tasks), "status": "error", "error": text,
                               "value": np.nan, "stderr": np.nan, "selected": False}, columns=SCORE_COLUMNS)
        df.insert(0, "model", name)
        frames.append(df)
        if progress is not None:
            ok = df[df["selected"] & (df["status"] == "ok")]
            progress(f"{name}: " + (", ".join(f"{r.task} {r.value:.4g} ± {r.stderr:.2g}" for r in ok.itertuples())
                                    or "no score") + (f" ({(df['status'] == 'error').sum()} errors)"
                                                      if (df["status"] == "error").any() else ""))
    return pd.concat(frames, ignore_index=True)
