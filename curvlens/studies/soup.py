"""``greedy_soup``: Wortsman et al.'s greedy model soup over the experts.

Rank the ingredients (experts) by their own held-out score, start the soup with
the best, and try the others in that order: an ingredient stays in the uniform
soup (the plain average of the kept experts: the ``linear`` merge) only if the
soup's score does not drop. Every evaluation is a :func:`curvlens.studies.sweep.sweep`
job, so it streams, and runs on a dask cluster when ``client`` is given.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from curvlens.arguments import callable_arg, names_arg
from curvlens.errors import CurvlensError, check_choice
from curvlens.io.atomic import claim_output
from curvlens.passes.experts import Experts
from curvlens.studies.scores import score_metrics, scored_jobs
from curvlens.studies.sweep import check_work_dir, sweep

OBJECTIVES = ("mean", "worst")


@dataclass
class SoupResult:
    """What :func:`greedy_soup` found.

    Attributes
    ----------
    ingredients : list of str
        The experts in the final soup, in the order they were added.
    curve : pandas.DataFrame
        One row per evaluation: ``step`` (0 = the ingredients alone, ranked;
        then one per tried ingredient), ``phase`` (``"rank"``/``"soup"``),
        ``candidate`` (the ingredient ranked or tried), ``soup`` (the experts
        evaluated together, ``+``-joined), ``score`` (the objective), ``kept``,
        ``best`` (the soup's score after the step), ``status``, ``error`` and
        one column per metric.
    path : Path or None
        The final soup's merged model dir (``out``), when asked for.
    objective : str
    sweeps : pandas.DataFrame
        Every underlying :func:`sweep` row, with the ``step`` column.
    """

    ingredients: list
    curve: pd.DataFrame
    path: Path | None
    objective: str
    sweeps: pd.DataFrame

    def __repr__(self) -> str:
        best = self.curve["best"].dropna()
        return (f"SoupResult(ingredients={self.ingredients}, objective={self.objective!r}, "
                f"score={best.iloc[-1] if len(best) else float('nan'):.4g}, path={self.path})")


def _objective(row: pd.Series, metrics: list[str], objective: str) -> float:
    vals = row[metrics].astype(float).to_numpy()
    if not len(vals) or not np.isfinite(vals).all():
        return float("nan")
    return float(vals.mean() if objective == "mean" else vals.min())


def greedy_soup(experts: Experts, evaluate: Callable[[str], Mapping[str, float]], objective: str = "mean", *,
                out=None, metrics=None, client=None, n_workers: int = 2, work_dir=None,
                overwrite: bool = False, progress: bool = True, inputs=(), **merge_kwargs) -> SoupResult:
    """Greedy soup (Wortsman et al., 2022) of ``experts`` scored by ``evaluate``.

    Parameters
    ----------
    experts : Experts
        The ingredients (no base is needed: a soup is the ``linear`` merge).
    evaluate : callable
        ``evaluate(model_dir) -> {metric: float}`` on held-out data; higher is better.
    objective : {"mean", "worst"}
        One number per evaluation: the mean or the minimum over ``metrics``.
    out : path, optional
        Write the final soup here (a merged HF dir); without it nothing is kept.
    metrics : list of str, optional
        Which of the evaluator's metrics the objective pools (default all but the
        ``<m>_stderr`` standard errors).
    client, n_workers, work_dir, inputs
        As :func:`sweep` (``work_dir`` is its ``out_dir``): the ranking evaluations
        run in parallel on a cluster; the soup steps are sequential by nature.
        ``out`` may not be, contain or lie inside any expert (tried or kept),
        their moments, ``inputs`` or the evaluator's declared data, with or
        without ``overwrite``: checked before the first evaluation.
    **merge_kwargs
        Passed to every merge (``device``, ``dtype``, ...).

    Returns
    -------
    SoupResult
        The ingredients kept, the score curve, and the soup's dir.

    Notes
    -----
    Ties go to the ingredient listed first; an ingredient whose soup scores
    exactly as well as the current soup is kept (the score did not drop), as in
    the paper. An ingredient whose evaluation fails, or whose evaluation lacks a
    metric the objective pools, is reported in the curve (``status`` "error",
    the reason in ``error``) and not added.
    """
    check_choice("objective", objective, OBJECTIVES)
    if not isinstance(experts, Experts):
        raise CurvlensError(f"greedy_soup takes an Experts; got a {type(experts).__name__}")
    callable_arg("evaluate", evaluate, "model_dir -> {metric: float}")
    metrics = names_arg("metrics", metrics) if metrics is not None else None
    if out is not None:  # before any work: never onto an ingredient, tried or kept, or its moments
        claim_output(out, [experts, evaluate, inputs], overwrite=overwrite)
    check_work_dir(work_dir, experts, evaluate, inputs)
    kw = dict(client=client, n_workers=n_workers, out_dir=work_dir, progress=False, inputs=inputs, **merge_kwargs)
    own = client == "local"
    if own:  # one cluster for every step, not one per step
        from curvlens.studies.sweep import local_client

        kw["client"] = local_client(n_workers)
    try:
        return _greedy(experts, evaluate, objective, out, metrics, overwrite, progress, kw, merge_kwargs)
    finally:
        if own:
            cluster = kw["client"].cluster
            kw["client"].close()
            cluster.close()


def _greedy(experts, evaluate, objective, out, metrics, overwrite, progress, kw, merge_kwargs) -> SoupResult:
    from curvlens.runtime import progress_bar
    from curvlens.config.merge import merge

    names = experts.names
    ranked_df = sweep(experts, [{"method": "linear", "experts": [n], "label": n} for n in names], evaluate, **kw)
    ranked_df.insert(0, "step", 0)
    returned = list(dict.fromkeys(ranked_df["metric"].dropna()))
    if metrics is None:
        metrics = score_metrics(returned)  # every score an ingredient returned: one missing elsewhere is an error row
    else:
        missing = [m for m in metrics if m not in returned]
        if missing and (ranked_df["status"] == "ok").any():
            raise CurvlensError(f"metrics {missing} are not among the evaluator's {returned}")
    purpose = f"the soup's objective ({objective} of {metrics})"
    wide = scored_jobs(ranked_df, metrics, purpose)
    wide["score"] = [_objective(wide.loc[i], metrics, objective) if wide.loc[i, "status"] == "ok" else np.nan
                     for i in wide.index]
    rows = [{"step": 0, "phase": "rank", "candidate": r["label"], "soup": r["label"], "score": r["score"],
             "kept": None, "best": np.nan, "status": r["status"], "error": r["error"],
             **{m: r.get(m, np.nan) for m in metrics}} for _, r in wide.iterrows()]
    order = (wide[np.isfinite(wide["score"])]
             .sort_values("score", ascending=False, kind="stable")["label"].tolist())
    if not order:
        raise CurvlensError("greedy_soup: no ingredient could be evaluated; see the errors: "
                            + "; ".join(f"{r.label}: {r.error}" for r in wide.itertuples()))
    soup = [order[0]]
    best = float(wide.set_index("label").loc[order[0], "score"])
    rows.append({"step": 1, "phase": "soup", "candidate": order[0], "soup": order[0], "score": best,
                 "kept": True, "best": best, "status": "ok", "error": None,
                 **{m: float(wide.set_index("label").loc[order[0], m]) for m in metrics}})
    frames = [ranked_df]
    bar = progress_bar(len(order) - 1, "greedy soup", progress)
    for step, cand in enumerate(order[1:], start=2):
        trial = soup + [cand]
        label = "+".join(trial)
        df = sweep(experts, [{"method": "linear", "experts": trial, "label": label}], evaluate, **kw)
        df.insert(0, "step", step)
        frames.append(df)
        w = scored_jobs(df, metrics, purpose).iloc[0]
        score = _objective(w, metrics, objective) if w["status"] == "ok" else np.nan
        kept = bool(np.isfinite(score) and score >= best)
        if kept:
            soup, best = trial, score
        rows.append({"step": step, "phase": "soup", "candidate": cand, "soup": label, "score": score,
                     "kept": kept, "best": best, "status": w["status"], "error": w["error"],
                     **{m: w.get(m, np.nan) for m in metrics}})
        bar.update(1)
    bar.close()
    path = None
    if out is not None:
        out = Path(out)
        merge(experts.subset(soup), "linear", out, progress=False, overwrite=overwrite, **merge_kwargs)
        path = out
    curve = pd.DataFrame(rows, columns=["step", "phase", "candidate", "soup", "score", "kept", "best",
                                        "status", "error", *metrics])
    return SoupResult(soup, curve, path, objective, pd.concat(frames, ignore_index=True))
