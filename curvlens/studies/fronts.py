"""Pareto fronts of task-arithmetic merges θ(c) = θ₀ + Σⱼ cⱼ τⱼ over the coefficients c.

Two ways to predict the front, both ending in a dense sample of c and its
non-dominated set (:mod:`curvlens.math.fronts`):

- ``"surrogate"`` (MAP, Li et al. 2025, arXiv:2406.07529): merge and evaluate
  sampled c (:func:`curvlens.studies.sweep.sweep`), more of them than the quadratic
  has weights, fit one quadratic in c per capability by least squares (on the logit
  of a bounded metric, so a predicted accuracy stays in [0, 1]), and take the front
  of the fitted scores.
- ``"curvature"``: no evaluation at all. Expert i's curvature-predicted loss
  Lᵢ(c) = ½ Σ vᵢ (θ(c) − θᵢ)² is exactly quadratic in c with Gram matrices
  Gᵢ[j, l] = Σ vᵢ τⱼ τₗ, which :func:`gram_matrices` sums in one streaming pass,
  tensor by tensor; the front is that of the Lᵢ.

Either front can be checked by evaluating some of its points (and a sample of c).
Agreement is measured only where the prediction was not given the answer: the
surrogate's on held-out points (its front checks and ``n_holdout`` random c, never
its fitting set), the curvature prediction's away from the corners (each expert
alone, where its own predicted loss is 0 by construction).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from curvlens.arguments import bounds_arg, callable_arg, finite_array, int_arg, names_arg
from curvlens.errors import CurvlensError
from curvlens.math.fronts import (
    fit_quadratic,
    non_dominated,
    predict_quadratic,
    quadratic_features,
    quadratic_losses,
    quadratic_parts,
    sample_coefficients,
    scalarized_minimisers,
    simplex_weights,
    tensor_grams,
    unsquash,
)
from curvlens.passes.experts import Experts
from curvlens.runtime import resolve_device
from curvlens.studies.scores import score_metrics, scored_jobs
from curvlens.studies.sweep import check_work_dir, sweep
from curvlens.studies.front_checks import fit_scale, front_agreement

PREDICTORS = ("surrogate", "curvature")


def gram_matrices(experts: Experts, *, device="auto", progress: bool = True) -> np.ndarray:
    """Every expert's Gram matrix of the task vectors under its curvature, in one pass.

    ``G[i, j, l] = Σ vᵢ τⱼ τₗ`` summed over every (floating, not excluded) tensor,
    with τⱼ = θⱼ − θ₀ and vᵢ expert i's second moments; so expert i's predicted
    loss of the task-arithmetic merge θ₀ + Σ cⱼ τⱼ is ``½ (c − eᵢ)ᵀ G[i] (c − eᵢ)``
    (:func:`curvlens.math.fronts.quadratic_losses`). Streams one tensor at a time;
    sums in float64.

    Returns
    -------
    numpy.ndarray
        Shape ``(k, k, k)`` for k experts, in ``experts.names`` order.
    """
    if experts.base is None:
        raise CurvlensError("gram_matrices needs a base model (task vectors are theta_i - theta_0)")
    if not experts.has_moments:
        lacking = [e.name for e in experts.experts if e.moments is None]
        raise CurvlensError(f"gram_matrices needs second moments; expert(s) {lacking} have none")
    k = len(experts)
    total = torch.zeros(k, k, k, dtype=torch.float64)
    for g in experts.iter_tensors(device=resolve_device(device), progress=progress, desc="gram matrices"):
        if g.moments is None or not g.experts[0].is_floating_point():
            continue
        total += tensor_grams(g.moments, g.task_vectors)
    return total.numpy()


@dataclass
class FrontResult:
    """A predicted Pareto front over task-arithmetic coefficients, and its checks.

    Attributes
    ----------
    predictor : {"surrogate", "curvature"}
    experts : list of str
        The coefficients' experts; coefficient columns are ``c_<expert>``.
    objectives : list of str
        The predicted objective columns of ``dense`` (``pred_<metric>``, higher is
        better, for the surrogate; ``loss_<expert>``, lower is better, for the
        curvature prediction).
    dense : pandas.DataFrame
        The dense sample of c: ``source`` (``"random"`` in the box, or
        ``"scalarized"``: the minimiser of a weighted sum of the objectives,
        clipped to the box), coefficient columns, objective columns, ``on_front``.
    evaluated : pandas.DataFrame
        Every evaluated c: ``role`` (``"sample"``: fitted or rank-checked,
        ``"check"``: a point of the predicted front), ``label``, ``status``,
        ``error``, coefficient columns, measured metric columns, the predicted
        objective columns at that c, ``measured_front`` (non-dominated among the
        evaluated points on the measured metrics) and ``predicted_front``. Roles:
        ``"sample"`` (the surrogate's fitting set; the curvature prediction's rank
        check), ``"holdout"`` (random c no fit saw), ``"check"`` (front points).
    agreement : pandas.DataFrame
        One row per objective: the metric it is compared with, ``points`` (which
        evaluated c enter: the surrogate's held-out ones, or the curvature
        prediction's off the corners), ``n``, ``spearman`` (predicted against
        measured over those points; the curvature losses enter negated; NaN below
        3 points), and for the surrogate ``mae`` over the same points. Empty
        without evaluations.
    summary : dict
        ``front_distance`` (mean nearest-neighbour distance in coefficient space
        between the predicted front and the measured non-dominated points),
        ``n_evaluations``, ``n_fit`` (the surrogate's fitting evaluations),
        ``n_front``, ``front_share``.
    grams : numpy.ndarray or None
        The curvature predictor's Gram matrices.
    surrogates : dict or None
        Metric -> least-squares weights of :func:`~curvlens.math.fronts.quadratic_features`
        (of the metric's logit, :func:`~curvlens.math.fronts.squash`, when ``metric_range`` is set).
    metric_range : tuple or None
        The range the surrogate's metrics were squashed from (None: fitted raw).
    sweeps : pandas.DataFrame
        Every underlying :func:`sweep` row.
    """

    predictor: str
    experts: list
    objectives: list
    dense: pd.DataFrame
    evaluated: pd.DataFrame
    agreement: pd.DataFrame
    summary: dict = field(default_factory=dict)
    grams: np.ndarray | None = None
    surrogates: dict | None = None
    sweeps: pd.DataFrame | None = None
    metric_range: tuple | None = None

    @property
    def coefficient_columns(self) -> list[str]:
        return [f"c_{n}" for n in self.experts]

    @property
    def front(self) -> pd.DataFrame:
        """The dense sample's non-dominated rows."""
        return self.dense[self.dense["on_front"]]

    def __repr__(self) -> str:
        return (f"FrontResult(predictor={self.predictor!r}, experts={self.experts}, "
                f"front={int(self.dense['on_front'].sum())} of {len(self.dense)} sampled c, "
                f"evaluations={len(self.evaluated)})")


def _spread(points: np.ndarray, n: int, avoid: np.ndarray | None = None) -> list[int]:
    """Indices of ``n`` rows of ``points`` spread out by farthest-point sampling:
    each next row is the one farthest from those chosen and from ``avoid`` (the c
    already evaluated); without ``avoid`` it starts nearest the centroid.
    Deterministic."""
    if n <= 0 or not len(points):
        return []
    if avoid is not None and len(avoid):
        dist = ((points[:, None, :] - avoid[None, :, :]) ** 2).sum(-1).min(1)
        chosen = []
    else:
        first = int(np.argmin(((points - points.mean(0)) ** 2).sum(1)))
        chosen = [first]
        dist = ((points - points[first]) ** 2).sum(1)
    while len(chosen) < min(n, len(points)):
        nxt = int(np.argmax(dist))
        if dist[nxt] == 0:
            break
        chosen.append(nxt)
        dist = np.minimum(dist, ((points - points[nxt]) ** 2).sum(1))
    return chosen


def _jobs(coefs: np.ndarray, names: Sequence[str], role: str) -> list[dict]:
    return [{"method": "task_arithmetic", "weight": [float(x) for x in c],
             "label": f"{role} c=[" + ", ".join(f"{x:.3f}" for x in c) + "]"} for c in coefs]


def pareto_front(experts: Experts, evaluate: Callable[[str], Mapping[str, float]] | None = None, *,
                 predictor: str | None = None, capabilities: Mapping[str, str] | None = None,
                 metrics: Sequence[str] | None = None, n_samples: int | None = None, n_checks: int | None = None,
                 n_holdout: int | None = None, metric_range: tuple[float, float] | None = (0.0, 1.0),
                 n_dense: int = 2000, bounds: tuple[float, float] = (0.0, 1.0), seed: int = 0,
                 grams=None, client=None, n_workers: int = 2, work_dir=None, device="auto",
                 progress: bool = True, inputs=(), **merge_kwargs) -> FrontResult:
    """The predicted Pareto front of task-arithmetic merges θ₀ + Σⱼ cⱼ τⱼ over c.

    Parameters
    ----------
    experts : Experts
        Base and experts (and moments, for the curvature predictor).
    evaluate : callable, optional
        ``evaluate(model_dir) -> {metric: float}``, higher is better. Without it
        the front is the curvature-predicted one, with no evaluation at all.
    predictor : {"surrogate", "curvature"}, optional
        Default ``"surrogate"`` (MAP) with ``evaluate``, else ``"curvature"``.
    capabilities : mapping, optional
        Expert -> the metric that measures its capability (``zoo.capabilities``);
        pairs each curvature loss with a measured metric. Default: the metric of
        the expert's own name, when the evaluator has one.
    metrics : list of str, optional
        The evaluator's metrics the surrogate fits (default all but the
        ``<m>_stderr`` standard errors).
    n_samples : int, optional
        Evaluated c: the surrogate's fitting set (default twice the quadratic's
        ``1 + k + k(k+1)/2`` weights; it must exceed them, or the quadratic only
        interpolates), or the curvature predictor's rank check (default 8 when
        ``evaluate`` is given). The experts alone (unit c) come first when the
        bounds contain them.
    n_checks : int, optional
        Points of the predicted front evaluated afterwards (default 4 with
        ``evaluate``), spread out over the front and away from the c already
        evaluated (farthest-point sampling).
    n_holdout : int, optional
        Random c evaluated and kept out of every fit (default 4 for the surrogate,
        0 for the curvature prediction, whose samples are held out already).
    metric_range : (low, high) or None
        The range of the evaluator's metrics (default ``(0, 1)``: accuracies). The
        surrogate is fitted to their logit and predicts inside the range; a
        measured value outside it is an error. None fits the raw values (metrics
        without bounds).
    n_dense : int
        Size of the dense sample of c the front is read from: ``n_dense`` random
        points in the box plus ``n_dense`` minimisers of weighted sums of the
        predicted objectives (weights spread over the simplex), which lie on the
        front itself where the objectives are convex.
    bounds : (low, high)
        The box each coefficient is sampled in.
    grams : array (k, k, k), optional
        The curvature predictor's :func:`gram_matrices` of these experts, when
        already computed (e.g. ``result.grams`` of an earlier call): no pass then.
    client, n_workers, work_dir, inputs, **merge_kwargs
        As :func:`curvlens.studies.sweep.sweep` (every evaluation is a sweep job;
        ``work_dir`` is checked against the inputs before any work).

    Returns
    -------
    FrontResult
    """
    if not isinstance(experts, Experts):
        raise CurvlensError(f"pareto_front takes an Experts; got a {type(experts).__name__}")
    if evaluate is not None:
        callable_arg("evaluate", evaluate, "model_dir -> {metric: float}")
    names = experts.names
    k = len(names)
    if predictor is None:
        predictor = "surrogate" if evaluate is not None else "curvature"
    if predictor not in PREDICTORS:
        raise CurvlensError(f"predictor must be one of {PREDICTORS}; got {predictor!r}")
    if predictor == "surrogate" and evaluate is None:
        raise CurvlensError("the surrogate (MAP) predictor needs evaluate")
    if experts.base is None:
        raise CurvlensError("pareto_front needs a base model: theta(c) = theta_0 + sum_j c_j tau_j")
    low, high = bounds_arg("bounds", bounds)
    n_samples = int_arg("n_samples", n_samples, lo=0, allow_none=True)
    n_checks = int_arg("n_checks", n_checks, lo=0, allow_none=True)
    n_dense = int_arg("n_dense", n_dense, lo=1)
    seed = int_arg("seed", seed, lo=0)
    metrics = names_arg("metrics", metrics) if metrics is not None else None
    if capabilities is not None and not isinstance(capabilities, Mapping):
        raise CurvlensError(f"capabilities must be a mapping expert -> metric; got {capabilities!r}")
    if grams is not None:
        grams = finite_array("grams", grams, (k, k, k))
    check_work_dir(work_dir, experts, evaluate, inputs)
    n_feat = quadratic_features(np.zeros((1, k))).shape[1]
    if n_samples is None:
        n_samples = 2 * n_feat if predictor == "surrogate" else (8 if evaluate is not None else 0)
    if n_checks is None:
        n_checks = 4 if evaluate is not None else 0
    if n_holdout is None:
        n_holdout = 4 if predictor == "surrogate" else 0
    if evaluate is None and (n_samples or n_checks or n_holdout):
        raise CurvlensError("n_samples / n_checks / n_holdout evaluate merges: pass evaluate")
    if metric_range is not None:
        metric_range = tuple(float(x) for x in metric_range)
        if len(metric_range) != 2 or not metric_range[1] > metric_range[0]:
            raise CurvlensError(f"metric_range must be (low, high) with low < high, or None; got {metric_range}")
    if grams is not None and predictor != "curvature":
        raise CurvlensError("grams are the curvature predictor's; pass predictor='curvature'")
    if predictor == "surrogate" and n_samples <= n_feat:
        raise CurvlensError(f"the surrogate is a quadratic with {n_feat} weights in {k} coefficients: fitted to "
                            f"n_samples={n_samples} evaluations it only interpolates them; give more than {n_feat} "
                            f"(the default is {2 * n_feat})")
    coef_cols = [f"c_{n}" for n in names]
    kw = dict(client=client, n_workers=n_workers, out_dir=work_dir, progress=False, device=device, inputs=inputs,
              **merge_kwargs)
    own = client == "local"
    if own:  # one cluster for both rounds
        from curvlens.studies.sweep import local_client

        kw["client"] = local_client(n_workers)
    try:
        dense_c = sample_coefficients(n_dense, k, low, high, seed=seed + 1)
        sweeps = []
        surrogates = None
        sampled = None
        if predictor == "curvature":
            if grams is None:
                grams = gram_matrices(experts, device=device, progress=progress)
            # sums of v * tau * tau can overflow: a non-finite matrix is an error, not a NaN front
            grams = finite_array("grams (the experts' Gram matrices)", grams, (k, k, k))
            objectives = [f"loss_{n}" for n in names]

            predict = _Predict(grams=grams)
            sense_max = False
            hessians, linears = grams, -np.stack([grams[i] @ np.eye(k)[i] for i in range(k)])
        parts = []
        for role, n_eval, corners, s in (("sample", n_samples, True, seed), ("holdout", n_holdout, False, seed + 3)):
            if n_eval:
                c = sample_coefficients(n_eval, k, low, high, seed=s, corners=corners)
                df = sweep(experts, _jobs(c, names, role), evaluate, **kw)
                sweeps.append(df.assign(role=role))
                parts.append(_measured(df, c, coef_cols, role, metrics))
        sampled = parts[0] if n_samples else None
        if predictor == "surrogate":
            ok = sampled[sampled["status"] == "ok"]
            if metrics is None:
                metrics = score_metrics(m for m in sampled.columns
                                        if m not in ("job", "label", "status", "role", "error", *coef_cols))
            missing = [m for m in metrics if m not in ok.columns]
            if missing or len(ok) <= n_feat:
                raise CurvlensError(f"the surrogate has {len(ok)} successful evaluations (it needs more than "
                                    f"{n_feat})" + (f" and lacks metrics {missing}" if missing else "") + "; errors: "
                                    + "; ".join(sampled["error"].dropna().unique()[:3]))
            surrogates = {m: fit_quadratic(ok[coef_cols].to_numpy(), fit_scale(ok[m], m, metric_range))
                          for m in metrics}
            objectives = [f"pred_{m}" for m in metrics]

            predict = _Predict(surrogates=[surrogates[m] for m in metrics], metric_range=metric_range)
            sense_max = True
            parts_ = [quadratic_parts(surrogates[m], k) for m in metrics]   # minimise -score
            hessians, linears = -np.stack([h for _, _, h in parts_]), -np.stack([b for _, b, _ in parts_])
        # the weighted-sum minimisers lie on the front (exactly, for convex objectives):
        # with them the front read from the sample is sharp, not a cloud near it
        scal = scalarized_minimisers(hessians, linears, simplex_weights(n_dense, len(objectives), seed + 2),
                                     low, high)
        dense_c = np.concatenate([dense_c, scal])
        pred = predict(dense_c)
        dense = pd.DataFrame(dense_c, columns=coef_cols)
        dense.insert(0, "source", ["random"] * n_dense + ["scalarized"] * len(scal))
        for j, o in enumerate(objectives):
            dense[o] = pred[:, j]
        dense["on_front"] = non_dominated(pred, maximize=sense_max)
        if n_checks:
            front_c = dense_c[dense["on_front"].to_numpy()]
            done = (pd.concat(parts)[coef_cols].to_numpy(dtype=float) if parts else None)
            picks = front_c[_spread(front_c, n_checks, done)]  # away from what was evaluated
            df = sweep(experts, _jobs(picks, names, "check"), evaluate, **kw)
            sweeps.append(df.assign(role="check"))
            parts.append(_measured(df, picks, coef_cols, "check", metrics))
    finally:
        if own:
            cluster = kw["client"].cluster
            kw["client"].close()
            cluster.close()
    evaluated = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["role", "label", "status"])
    if len(evaluated):
        p = predict(evaluated[coef_cols].to_numpy(dtype=float))
        for j, o in enumerate(objectives):
            evaluated[o] = p[:, j]
    pairs = _pairs(predictor, names, objectives, metrics, capabilities, evaluated)
    agreement, summary = front_agreement(evaluated, pairs, predictor, coef_cols, dense, sense_max)
    summary["n_fit"] = int((evaluated["role"] == "sample").sum()) if predictor == "surrogate" and len(evaluated) else 0
    return FrontResult(predictor, list(names), objectives, dense, evaluated, agreement, summary, grams, surrogates,
                       pd.concat(sweeps, ignore_index=True) if sweeps else None,
                       metric_range if predictor == "surrogate" else None)


@dataclass
class _Predict:
    """The predicted objectives at coefficients c: curvature losses or surrogate scores."""

    grams: np.ndarray | None = None
    surrogates: list | None = None
    metric_range: tuple | None = None

    def __call__(self, c) -> np.ndarray:
        if self.grams is not None:
            return quadratic_losses(self.grams, c)
        z = np.stack([predict_quadratic(w, c) for w in self.surrogates], axis=1)
        return z if self.metric_range is None else unsquash(z, *self.metric_range)


def _measured(df: pd.DataFrame, coefs: np.ndarray, coef_cols, role: str, metrics=None) -> pd.DataFrame:
    # a job lacking a metric the surrogate fits is an error row that says so
    wide = scored_jobs(df, metrics, "the surrogate")
    wide.insert(0, "role", role)
    c = pd.DataFrame(coefs[wide["job"].to_numpy()], columns=coef_cols)
    return pd.concat([wide.drop(columns="job").reset_index(drop=True), c], axis=1)


def _pairs(predictor, names, objectives, metrics, capabilities, evaluated) -> list[tuple[str, str]]:
    """(predicted objective, measured metric) pairs to compare."""
    if not len(evaluated):
        return []
    if predictor == "surrogate":
        return [(o, m) for o, m in zip(objectives, metrics)]
    caps = dict(capabilities) if capabilities is not None else {n: n for n in names}
    unknown = [n for n in caps if n not in names]
    if unknown:
        raise CurvlensError(f"capabilities names experts {unknown}; the experts are {names}")
    return [(f"loss_{n}", caps[n]) for n in names if n in caps and caps[n] in evaluated.columns]
