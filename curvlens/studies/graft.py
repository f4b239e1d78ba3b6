"""Grafting sweeps: each expert's edit kept only where its mask says, scored.

* :func:`graft_sweep` -- score of ``theta0 + m * tau`` against density, per criterion;
* :func:`ffg_vs_magnitude_summary` -- the paper's FFG-vs-magnitude comparison.

The masks are the exact model-wide selections of
:func:`curvlens.passes.thresholds.model_selections`, as in the merges.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import pandas as pd
import torch

from curvlens.arguments import real_arg
from curvlens.errors import CurvlensError
from curvlens.passes.analysis_common import (
    FFG_VS_MAGNITUDE_COLUMNS, GRAFT_SWEEP_COLUMNS, check_criteria, check_densities, frame,
)
from curvlens.passes.analysis_masks import check_mask_inputs, selections_at
from curvlens.passes.experts import Experts
from curvlens.runtime import progress_bar, resolve_device
from curvlens.passes.thresholds import CRITERIA, Selection, mask_scores
from curvlens.studies.scores import score_metrics


def _graft(sub: Experts, selection: Selection | None, criterion: str, device) -> dict[str, torch.Tensor]:
    """The grafted expert ``theta0 + m * tau`` (``selection`` None: the expert itself)
    as a CPU state dict in the expert's stored dtypes."""
    out = {}
    floating = set(sub.tensor_names(floating_only=True))
    fisher = selection is not None and criterion == "fisher"
    # Stored dtypes, so a kept entry is the expert's value bit for bit; the scores
    # are taken on float32 copies, exactly as the threshold pass saw them.
    for g in sub.iter_tensors(device=device, dtype=None, base=selection is not None, moments=fisher,
                              progress=False, desc="graft"):
        x = g.experts[0]
        if selection is not None and g.name in floating:
            g32 = dataclasses.replace(g, base=g.base.float(), experts=[x.float()])
            (s,) = mask_scores(g32, criterion)
            x = torch.where(selection.mask(g.name, s), x, g.base)
        out[g.name] = x.cpu()
    return out


def _scores(result, expert: str, criterion: str, density: float) -> list[tuple[str, float, object]]:
    """(capability, score, per-item results or None) from what ``evaluate`` returned."""
    where = f"evaluate() for expert {expert!r}, criterion {criterion!r}, density {density}"
    if isinstance(result, Mapping):  # the sweep contract, {metric: value}; standard errors are not scores
        try:
            return [(str(m), float(result[m]), None) for m in score_metrics(result)]
        except (TypeError, ValueError):
            raise CurvlensError(f"{where} returned {dict(result)!r}; expected numbers") from None
    if not isinstance(result, pd.DataFrame):
        raise CurvlensError(f"{where} returned a {type(result).__name__}; expected a DataFrame with columns "
                            "capability and score (or accuracy), or a dict metric -> score")
    col = "score" if "score" in result.columns else "accuracy" if "accuracy" in result.columns else None
    if "capability" not in result.columns or col is None:
        raise CurvlensError(f"{where} returned columns {list(result.columns)}; expected capability and "
                            "score (or accuracy)")
    # per-item results, when the evaluation gives them (curvlens.zoo.evaluate does), ride
    # along for the findings' bootstrap over items
    items = result["correct"] if "correct" in result.columns else [None] * len(result)
    return [(str(c), real_arg(f"{where}: {col} of {c!r}", s), it)
            for c, s, it in zip(result["capability"], result[col], items)]


def graft_sweep(experts: Experts, densities, criteria=CRITERIA, evaluate: Callable | None = None, *,
                device="auto", progress: bool = True) -> pd.DataFrame:
    """Score each expert grafted onto the base at several model-wide densities.

    For each expert, criterion and density ``d < 1`` the grafted model
    ``theta0 + m * tau`` (``m`` the expert's mask at the model-wide threshold of
    :func:`curvlens.passes.thresholds.model_thresholds`) is built by streaming
    and handed to ``evaluate``. Density 1.0, when asked for, is the expert itself
    (evaluated once, reported under every criterion).

    Grafting materialises one model at a time: ``evaluate`` needs a whole model,
    so each grafted model is a CPU state dict (in the expert's dtypes) that lives
    only while it is evaluated. Memory is one model, never the sweep.

    Parameters
    ----------
    experts : Experts
        With a base; with moments for ``fisher``.
    densities : float or sequence of float
        Model-wide densities in (0, 1].
    criteria : str or sequence of {"fisher", "magnitude"}
    evaluate : callable
        ``evaluate(state_dict) -> DataFrame`` with columns ``capability`` and
        ``score`` or ``accuracy`` (as ``curvlens.zoo.evaluate`` returns), e.g.
        ``lambda sd: zoo.evaluate(sd, zoo=zoo)``; or ``-> {metric: score}`` as
        sweeps take it (``zoo.evaluator()``, ``cl.evaluators.lm_eval(..., base=DIR)``),
        each metric a capability row (its ``<m>_stderr`` companion is not a score
        and has no row).
    device, progress
        ``progress`` shows one bar over the grafted models.

    Returns
    -------
    pandas.DataFrame
        ``expert, criterion, density, capability, score``: one row per expert x
        criterion x density x capability the evaluation reports, plus
        ``correct`` (per-item results) when ``evaluate`` returns that column.
    """
    if evaluate is None or not callable(evaluate):
        raise CurvlensError(f"evaluate must be a callable state_dict -> DataFrame; got {evaluate!r}")
    criteria = check_criteria(criteria)
    ds = check_densities(densities)
    check_mask_inputs(experts, criteria, "graft_sweep")
    dev = resolve_device(device)
    partial = [d for d in ds if d < 1.0]
    sel = selections_at(experts, partial, criteria, dev, progress) if partial else {}
    bar = progress_bar(len(experts) * (len(criteria) * len(partial) + (1.0 in ds)), "graft sweep", progress)
    rows = []
    for e in experts.names:
        sub = experts.subset([e])
        own = None
        if 1.0 in ds:
            own = _scores(evaluate(_graft(sub, None, "", dev)), e, "-", 1.0)
            bar.update(1)
        for c in criteria:
            for d in ds:
                if d == 1.0:
                    scores = own
                else:
                    scores = _scores(evaluate(_graft(sub, sel[c, e, d], c, dev)), e, c, d)
                    bar.update(1)
                rows += [{"expert": e, "criterion": c, "density": d, "capability": cap, "score": s, "correct": it}
                         for cap, s, it in scores]
    bar.close()
    with_items = any(r["correct"] is not None for r in rows)
    return frame(rows, GRAFT_SWEEP_COLUMNS + (["correct"] if with_items else []))


def ffg_vs_magnitude_summary(sweep: pd.DataFrame, capabilities: Mapping[str, str]) -> pd.DataFrame:
    """Each expert's score on its own capability, FFG against magnitude, per density.

    Parameters
    ----------
    sweep : pandas.DataFrame
        A :func:`graft_sweep` frame with both criteria.
    capabilities : mapping
        Expert -> the capability it was trained for.

    Returns
    -------
    pandas.DataFrame
        ``expert, capability, density, fisher, magnitude, fisher_ge_magnitude``.

    Examples
    --------
    >>> import pandas as pd
    >>> sweep = pd.DataFrame({"expert": ["m"] * 4, "criterion": ["fisher", "magnitude"] * 2,
    ...                       "density": [0.1, 0.1, 1.0, 1.0], "capability": ["math"] * 4,
    ...                       "score": [0.8, 0.3, 0.9, 0.9]})
    >>> ffg_vs_magnitude_summary(sweep, {"m": "math"})
      expert capability  density  fisher  magnitude  fisher_ge_magnitude
    0      m       math      0.1     0.8        0.3                 True
    1      m       math      1.0     0.9        0.9                 True
    """
    if not isinstance(sweep, pd.DataFrame):
        raise CurvlensError(f"sweep must be a graft_sweep DataFrame; got a {type(sweep).__name__}")
    missing = [c for c in GRAFT_SWEEP_COLUMNS if c not in sweep.columns]
    if missing:
        raise CurvlensError(f"sweep lacks column(s) {missing}; expected a graft_sweep frame")
    for c in CRITERIA:
        if c not in set(sweep["criterion"]):
            raise CurvlensError(f"sweep has no {c!r} rows; run graft_sweep with criteria={CRITERIA}")
    experts = list(dict.fromkeys(sweep["expert"]))
    lacking = [e for e in experts if e not in capabilities]
    if lacking:
        raise CurvlensError(f"capabilities has no entry for expert(s) {lacking}; give expert -> capability")
    own = sweep[sweep["capability"] == sweep["expert"].map(capabilities)]
    absent = [e for e in experts if e not in set(own["expert"])]
    if absent:
        raise CurvlensError(f"the sweep has no score on the own capability of expert(s) "
                            f"{[(e, capabilities[e]) for e in absent]}")
    wide = own.pivot_table(index=["expert", "density"], columns="criterion", values="score", aggfunc="first",
                           sort=False).reset_index()
    wide["capability"] = wide["expert"].map(capabilities)
    wide["fisher_ge_magnitude"] = wide["fisher"] >= wide["magnitude"]
    wide["_e"] = wide["expert"].map({e: i for i, e in enumerate(experts)})
    wide = wide.sort_values(["_e", "density"], kind="stable").reset_index(drop=True)
    wide.columns.name = None
    return wide[FFG_VS_MAGNITUDE_COLUMNS]
