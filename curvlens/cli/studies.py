"""Subcommands for many merges at once: ``soup``, ``sweep``, ``front``, ``sparse-soup``.

Each writes its frames as CSV and its figures as PNG and, where a plotly twin
exists, self-contained HTML, into one output dir written atomically. Merged
models are scored by ``--zoo quick|default`` (the demo zoo's capabilities) or
``--tasks`` (lm-evaluation-harness, the eval extra).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from curvlens.cli.options import (
    evaluator_options, experts_options, make_evaluator, moments_options, open_experts, output_options, report,
    save_figures,
)
from curvlens.errors import CurvlensError


def _inputs(experts, evaluator) -> list:
    return experts.input_paths() + (evaluator.inputs if evaluator is not None else [])


def _cluster(a: argparse.Namespace) -> dict:
    return {"client": a.client, "n_workers": a.workers}


def _cmd_soup(a: argparse.Namespace) -> int:
    from curvlens.io.atomic import AtomicDir
    from curvlens.studies.soup import greedy_soup
    from curvlens.views.soups import soup_curve, soup_curve_plotly

    experts = open_experts(a, moments=False)  # a soup is a linear merge: no curvature
    ev = make_evaluator(a)
    with AtomicDir(a.out, overwrite=a.overwrite, inputs=_inputs(experts, ev)) as tmp:
        res = greedy_soup(experts, ev.evaluate, a.objective, out=None if a.no_model else tmp / "model",
                          device=a.device, progress=not a.quiet, **_cluster(a))
        res.curve.to_csv(tmp / "curve.csv", index=False)
        res.sweeps.to_csv(tmp / "sweeps.csv", index=False)
        written = [tmp / "curve.csv", tmp / "sweeps.csv"] + ([] if a.no_model else [tmp / "model"])
        written += save_figures(tmp, "soup_curve", soup_curve(res.curve), soup_curve_plotly(res.curve))
    best = res.curve["best"].dropna()
    print(f"greedy soup ({a.objective}): {' + '.join(res.ingredients)}, score "
          f"{best.iloc[-1] if len(best) else float('nan'):.4g} -> {a.out}")
    report(a.out, tmp, written)
    return 0


def _param(text: str) -> tuple[str, object]:
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise CurvlensError(f"--param {text!r}: expected NAME=VALUE, e.g. density=[0.3,0.7] or lambda=1.0")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise CurvlensError(f"--param {text!r}: the value is not YAML ({err})") from err


def grid_of(a: argparse.Namespace) -> list[dict]:
    """The jobs: ``--grid FILE`` (a YAML list of ``{method: ..., param: ...}``), or
    ``--method`` with ``--param NAME=VALUE`` (a list value is an axis of a product grid)."""
    import yaml

    from curvlens.studies.sweep import sweep_grid

    if (a.grid is None) == (a.method is None):
        raise CurvlensError("sweep: give --method (with --param NAME=VALUE ...) or --grid FILE, not both")
    if a.method is not None:
        return sweep_grid(a.method, **dict(_param(p) for p in a.param or []))
    if a.param:
        raise CurvlensError("sweep: --param goes with --method; a --grid file gives each job's parameters")
    try:
        jobs = yaml.safe_load(a.grid.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise CurvlensError(f"--grid {a.grid}: cannot read a YAML list of jobs ({err})") from err
    if not isinstance(jobs, list) or not jobs or not all(isinstance(j, dict) for j in jobs):
        raise CurvlensError(f"--grid {a.grid}: expected a non-empty YAML list of jobs {{method: NAME, ...}}")
    return jobs


def _cmd_sweep(a: argparse.Namespace) -> int:
    from curvlens.io.atomic import AtomicDir
    from curvlens.studies.scores import wide_scores
    from curvlens.studies.sweep import sweep
    from curvlens.views.merges import merge_scores, merge_scores_plotly

    grid = grid_of(a)
    experts = open_experts(a, moments=not a.no_moments)
    ev = make_evaluator(a)
    inputs = _inputs(experts, ev) + ([a.grid] if a.grid is not None else [])
    with AtomicDir(a.out, overwrite=a.overwrite, inputs=inputs) as tmp:
        df = sweep(experts, grid, ev.evaluate, out_dir=tmp / "models" if a.keep else None, keep=a.keep,
                   device=a.device, progress=not a.quiet, **_cluster(a))
        if a.keep:  # where the kept models will be once the dir is renamed in
            df["model_dir"] = df["model_dir"].map(lambda p: p if not isinstance(p, str) else
                                                  str(a.out.resolve() / Path(p).relative_to(tmp)))
        df.to_csv(tmp / "sweep.csv", index=False)
        wide_scores(df).to_csv(tmp / "scores.csv", index=False)
        written = [tmp / "sweep.csv", tmp / "scores.csv"] + ([tmp / "models"] if a.keep else [])
        ok = df[df["status"] == "ok"]
        if len(ok):
            table = ok.rename(columns={"label": "model", "metric": "capability", "value": "accuracy"})
            title = "Sweep: score per job and metric"
            written += save_figures(tmp, "sweep_scores", merge_scores(table, kind="bars", title=title),
                                    merge_scores_plotly(table, kind="bars", title=title))
    failed = int((df.drop_duplicates("job")["status"] != "ok").sum())
    print(f"{df['job'].nunique()} jobs ({failed} failed) -> {a.out}")
    report(a.out, tmp, written)
    return 0


def _cmd_front(a: argparse.Namespace) -> int:
    from curvlens.io.atomic import AtomicDir
    from curvlens.studies.fronts import pareto_front
    from curvlens.views.soups import front_plot, front_plot_plotly

    ev = make_evaluator(a)
    predictor = a.predictor or ("surrogate" if ev is not None else "curvature")
    experts = open_experts(a, moments=predictor == "curvature")
    with AtomicDir(a.out, overwrite=a.overwrite, inputs=_inputs(experts, ev)) as tmp:
        caps = {e: c for e, c in (ev.capabilities or {}).items() if e in experts.names} if ev is not None else {}
        res = pareto_front(experts, ev.evaluate if ev is not None else None, predictor=predictor,
                           capabilities=caps or None, n_samples=a.samples,
                           n_checks=a.checks, n_dense=a.dense, bounds=tuple(a.bounds), seed=a.seed,
                           device=a.device, progress=not a.quiet, **_cluster(a))
        frames = {"dense": res.dense, "front": res.front, "evaluated": res.evaluated, "agreement": res.agreement}
        for key, df in frames.items():
            df.to_csv(tmp / f"{key}.csv", index=False)
        summary = {"predictor": res.predictor, "experts": res.experts, "objectives": res.objectives,
                   **{k: _json_number(v) for k, v in res.summary.items()}}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        written = [tmp / f"{k}.csv" for k in frames] + [tmp / "summary.json"]
        if len(res.experts) >= 2:  # the figure draws two coefficients against each other
            # measured panel: the metrics the two drawn objectives were compared with
            pairs = dict(zip(res.agreement.get("objective", []), res.agreement.get("metric", [])))
            drawn = [pairs.get(o) for o in res.objectives[:2]]
            kw = {"metrics": drawn} if None not in drawn and len(set(drawn)) == 2 else {}
            written += save_figures(tmp, "front", front_plot(res.dense, res.evaluated, **kw),
                                    front_plot_plotly(res.dense, res.evaluated, **kw))
    print(f"{predictor} front: {int(res.dense['on_front'].sum())} of {len(res.dense)} sampled c, "
          f"{len(res.evaluated)} evaluated -> {a.out}")
    report(a.out, tmp, written)
    return 0


def _json_number(v):
    """A number as JSON has it: NaN and infinities (not JSON) as null."""
    import math

    v = v.item() if hasattr(v, "item") else v
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _cmd_sparse_soup(a: argparse.Namespace) -> int:
    from curvlens.passes.sparse_soup import sparse_soup

    experts = open_experts(a, moments=False)
    res = sparse_soup(experts, a.out, mask=a.mask, weights=a.weights, dtype=a.dtype, device=a.device,
                      overwrite=a.overwrite, progress=not a.quiet)
    bad = int((~res.report["agree"].astype(bool)).sum())
    print(f"sparse soup of {len(experts)} experts ({a.mask}; {bad} tensor(s) whose masks disagree) -> {a.out}")
    return 0


def add_subcommands(sub, runtime: list) -> None:
    """Add the study subcommands to ``sub``."""
    out = output_options()
    ex = experts_options(base_required=False)
    p = sub.add_parser("soup", parents=runtime + [ex, evaluator_options(required=True), out],
                       help="greedy soup of experts (Wortsman et al.): curve CSV, figure, the soup's model")
    p.add_argument("--objective", choices=["mean", "worst"], default="mean", help="over the evaluator's metrics")
    p.add_argument("--no-model", action="store_true", help="do not write the final soup's model (out/model)")
    p.set_defaults(fn=_cmd_soup)

    ex = experts_options(base_required=False)
    moments_options(ex)
    p = sub.add_parser("sweep", parents=runtime + [ex, evaluator_options(required=True), out],
                       help="merge + evaluate a grid of jobs: the tidy frame, wide scores, a figure")
    p.add_argument("--method", help="one method's product grid, with --param NAME=VALUE")
    p.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="a YAML value; a list is an axis (density=[0.3,0.7]), a list of lists a per-expert axis")
    p.add_argument("--grid", type=Path, help="a YAML list of jobs ({method: ties, density: 0.5, label: ...})")
    p.add_argument("--no-moments", action="store_true", help="read no curvature (no job uses it)")
    p.add_argument("--keep", action="store_true", help="keep every merged model (out/models)")
    p.set_defaults(fn=_cmd_sweep)

    ex = experts_options(base_required=True)
    moments_options(ex)
    p = sub.add_parser("front", parents=runtime + [ex, evaluator_options(required=False), out],
                       help="Pareto front of task-arithmetic coefficients: curvature-predicted (no evaluation) "
                            "or fitted from evaluations (MAP)")
    p.add_argument("--predictor", choices=["surrogate", "curvature"],
                   help="default: surrogate with an evaluator, else curvature")
    p.add_argument("--samples", type=int, help="evaluated c (surrogate fit or rank check)")
    p.add_argument("--checks", type=int, help="points of the predicted front evaluated afterwards")
    p.add_argument("--dense", type=int, default=2000, help="size of the dense sample of c")
    p.add_argument("--bounds", type=float, nargs=2, default=[0.0, 1.0], metavar=("LOW", "HIGH"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=_cmd_front)

    ex = experts_options(base_required=False)
    p = sub.add_parser("sparse-soup", parents=runtime + [ex, out],
                       help="average sparse experts keeping their zeros (the model, with sparsity_report.csv)")
    p.add_argument("--mask", choices=["agree", "union", "intersection"], default="agree",
                   help="agree: masks must match (else an error naming the tensors)")
    p.add_argument("--weights", type=float, nargs="+", help="per-expert weights (default uniform)")
    p.add_argument("--dtype", help="output dtype of floating tensors (default: the experts' own)")
    p.set_defaults(fn=_cmd_sparse_soup)
