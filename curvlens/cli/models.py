"""Subcommands on models: ``demo``, ``merge``, ``methods``, ``figures``, ``analyze``,
``inspect``, ``eval``, ``notebooks``."""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from curvlens.cli.options import (
    experts_options, harness_options, lm_eval_from, moments_options, one_line, open_experts, output_options,
)
from curvlens.errors import CurvlensError
from curvlens.io.atomic import claim_output


def _cmd_merge(a: argparse.Namespace) -> int:
    from curvlens.config.merge import merge
    from curvlens.config.merge_config import load_merge_config
    from curvlens.passes.preflight import preflight, preflight_text

    claim_output(a.out, [a.config], overwrite=a.overwrite)  # the config is an input of the job too
    cfg = load_merge_config(a.config)
    if cfg.stack is not None:
        path = cfg.stack.run(a.out, overwrite=a.overwrite, max_shard_size=a.max_shard_size, progress=not a.quiet)
        print(f"stacked {cfg.stack.n_layers} layers from {len(cfg.models)} model(s) -> {path}")
        return 0
    experts = cfg.experts()
    for note in cfg.notes:
        print(f"note: {note}")
    if experts.has_moments:  # where each expert's moments come from, and their levels
        print(preflight_text(preflight(experts)))
    with warnings.catch_warnings():  # a warning is one line on stderr, as it happens
        warnings.simplefilter("always")
        warnings.showwarning = _show_warning
        result = merge(experts, cfg.method, a.out, device=a.device, overwrite=a.overwrite, progress=not a.quiet,
                       **cfg.merge_kwargs(max_shard_size=a.max_shard_size))
    print(f"merged {len(experts)} experts with {cfg.method} -> {result.path}")
    print(result.summary().to_string())
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"curvlens: warning: {one_line(str(message))}", file=sys.stderr)


def _cmd_inspect(a: argparse.Namespace) -> int:
    import pandas as pd

    from curvlens.io.inspection import inspect

    df = inspect(a.paths)
    for row in df.to_dict("records"):
        print(f"== {row.pop('path')}")
        for key, value in row.items():
            if value is not None and not (isinstance(value, float) and value != value) and value is not pd.NA:
                print(f"  {key:<15} {value}")
    # a path with neither weights nor moments is an input error
    unreadable = df[df["tensors"].isna() & df["moments"].isna()]
    for row in unreadable.itertuples():
        print(f"curvlens: error: {row.path}: {one_line(str(row.note))}", file=sys.stderr)
    return 2 if len(unreadable) else 0


def _cmd_methods(a: argparse.Namespace) -> int:
    import pandas as pd

    from curvlens.math.methods import get_method, list_methods, method_params

    with pd.option_context("display.max_rows", None, "display.max_colwidth", 90, "display.width", 200):
        if a.method:  # one method: what it does, then its parameters
            print(f"{a.method}: {get_method(a.method).description}\n")
            table = method_params(a.method).drop(columns="method")
            print(table.to_string(index=False) if len(table) else "(no parameters)")
        else:
            for row in list_methods().itertuples():
                print(f"{row.method:<16} {row.description}")
            print("\n`curvlens methods NAME` lists a method's parameters.")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from curvlens.demo import run_demo

    run_demo(a.out, config="quick" if a.quick else "default", device=a.device, overwrite=a.overwrite,
             progress=not a.quiet, echo=print, seeds=a.seeds)
    return 0


def label_with_params(label: str, params: dict) -> str:
    """A merge's label with the parameters that tell its variant apart (figure labels).

    Examples
    --------
    >>> label_with_params("TIES", {"density": 0.5})
    'TIES (density 0.5)'
    >>> label_with_params("OTA", {"epsilon": 1e-26})
    'OTA'
    """
    shown = {k: v for k, v in params.items() if k not in ("epsilon", "seed", "fallback_to_base")}
    if not shown:
        return label
    return f"{label} (" + ", ".join(f"{k.replace('_', ' ')} {v:g}" for k, v in shown.items()) + ")"


def _cmd_figures(a: argparse.Namespace) -> int:
    from curvlens import zoo as zoo_mod
    from curvlens.demo import DEMO_MERGES, analysis_frames, evaluate_and_merge
    from curvlens.views.figures import FRAME_KEYS, render_all

    name = "quick" if a.quick else "default"
    zoo = zoo_mod.build(name, progress=not a.quiet)
    experts = zoo.experts()
    table, merges = evaluate_and_merge(zoo, experts, device=a.device, progress=not a.quiet, echo=print)
    frames = analysis_frames(zoo, experts, merges, table, device=a.device, progress=not a.quiet, echo=print)
    frames = {k: v for k, v in frames.items() if k in FRAME_KEYS}  # the ones that have figures
    labels = {label: label_with_params(label, params) for label, _, params in DEMO_MERGES}
    frames["merge_table"] = frames["merge_table"].assign(model=frames["merge_table"]["model"].replace(labels))
    desc = experts.describe()
    source = (f"the {name} demo zoo (`{zoo.root.name}`: {len(zoo.expert_dirs)} experts, seed {zoo.seed}), built and "
              f"analysed by `curvlens figures{' --quick' if a.quick else ''}`; the merges are the demo's"
              + ("" if a.quick else ". The rendered notebook pages (`docs/notebooks/`) run on the quick zoo, "
                 "so their numbers differ from these"))
    written = render_all(frames, a.out, formats=a.formats, capability_map=zoo.capabilities,
                         shapes=dict(zip(desc["name"], desc["shape"])), source=source)
    print(f"wrote {len(written)} files to {a.out} (captions in {a.out / 'README.md'})")
    return 0


#: What ``curvlens analyze`` computes by default (plus the regime and findings).
CLI_ANALYSES = ("curvature_stats", "curvature_overlap", "mask_stats", "interference", "edit_norms")


def _cmd_analyze(a: argparse.Namespace) -> int:
    from curvlens.demo import regime_frames, regime_lines
    from curvlens.io.atomic import AtomicDir
    from curvlens.passes import analysis as A
    from curvlens.passes.analyze import analyze

    experts = open_experts(a, moments=True)
    kw = {"device": a.device, "progress": not a.quiet}
    # written beside its place and renamed in when complete; never onto an input
    with AtomicDir(a.out, overwrite=a.overwrite, inputs=experts.input_paths()) as tmp:
        # every analysis from one pass over the experts (two reads with masks)
        results = analyze(experts, a.analyses, densities=a.densities, ranks=not a.no_ranks, **kw)
        # the findings that need no scores (masks, overlap), and the regime
        results.update(regime_frames(experts, results, **kw))
        for key, df in results.items():
            df.to_csv(tmp / f"{key}.csv", index=False)
            print(f"{key}: {len(df)} rows -> {a.out / (key + '.csv')}")
    if "curvature_overlap" in results:
        print("model-level curvature overlap:")
        print(A.aggregate(results["curvature_overlap"], by=()).round(3).to_string(index=False))
    for line in regime_lines(results):
        print(line)
    return 0


def _cmd_notebooks(a) -> int:
    from curvlens.notebooks import render_notebooks

    sources = sorted(a.dir.glob("[0-9][0-9]_*.py"))
    if a.which:
        sources = [s for s in sources if any(s.stem == w or s.stem.startswith(w + "_") for w in a.which)]
    if not sources:
        raise CurvlensError(f"no notebook sources matching {a.which or 'NN_*.py'} in {a.dir}")
    render_notebooks(sources, a.out, quick=not a.full, timeout=a.timeout)
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    from curvlens.evaluators import score_models
    from curvlens.io.atomic import AtomicDir
    from curvlens.views.figures import save_figure
    from curvlens.views.harness import harness_scores

    ev, include = lm_eval_from(a, a.tasks)
    # written beside its place and renamed in when complete; never onto a model or a task dir
    with AtomicDir(a.out, overwrite=a.overwrite, inputs=[*a.models, *include]) as tmp:
        df = score_models(a.models, ev, progress=print)
        df.to_csv(tmp / "scores.csv", index=False)
        if (df["status"] == "ok").any():
            save_figure(harness_scores(df).figure, tmp / "scores.png")
    print(f"{len(df)} rows -> {a.out / 'scores.csv'}")
    return 0


def add_subcommands(sub, runtime: list) -> None:
    """Add the model subcommands to ``sub``."""
    d = sub.add_parser("demo", parents=runtime + [output_options("demo_out")],
                       help="build the demo zoo, evaluate, analyse, merge, write a report")
    d.add_argument("--quick", action="store_true", help="the small zoo (about a minute)")
    d.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="build and analyse one zoo per seed and pool the findings over them (each further "
                        "seed costs one more zoo build; default: seed 0 alone)")
    d.set_defaults(fn=_cmd_demo)

    m = sub.add_parser("merge", parents=runtime, help="merge models from a mergekit / OTA-fork YAML config")
    m.add_argument("config", type=Path)
    m.add_argument("out", type=Path)
    m.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    m.add_argument("--max-shard-size", default="1GB")
    m.set_defaults(fn=_cmd_merge)

    f = sub.add_parser("figures", parents=runtime, help="regenerate every paper figure from the demo zoo (PDF + PNG)")
    f.add_argument("--out", type=Path, default=Path("figures"))
    f.add_argument("--quick", action="store_true", help="the small zoo")
    f.add_argument("--formats", nargs="+", default=["pdf", "png"])
    f.set_defaults(fn=_cmd_figures)

    ex = experts_options(base_required=True)
    moments_options(ex)
    an = sub.add_parser("analyze", parents=runtime + [ex, output_options("curvlens_analysis")],
                        help="curvature overlap, masks and interference of your experts (CSV)")
    an.add_argument("--densities", nargs="+", type=float, default=[0.1, 0.3])
    an.add_argument("--analyses", nargs="+", default=list(CLI_ANALYSES), metavar="NAME",
                    help="which analyses (default: %(default)s; any of curvlens.passes.analyze.ANALYSES "
                         "but the merge ones); all come from one pass over the experts")
    an.add_argument("--no-ranks", action="store_true",
                    help="no singular values of the masks (their rank columns empty): on a CPU they are about "
                         "half of the pass (benchmarks/README.md)")
    an.set_defaults(fn=_cmd_analyze)

    ins = sub.add_parser("inspect", help="what model dirs, Trainer checkpoints and moments files hold (headers only)")
    ins.add_argument("paths", nargs="+", type=Path, help="model dirs, checkpoint-N dirs, Trainer run dirs, files")
    ins.set_defaults(fn=_cmd_inspect)

    nbk = sub.add_parser("notebooks", help="execute the notebooks (no widget hang) and write readable pages")
    nbk.add_argument("which", nargs="*", help="notebook numbers or stems, e.g. 06 (default: all)")
    nbk.add_argument("--dir", type=Path, default=Path("notebooks"), help="where the NN_name.py sources are")
    nbk.add_argument("--out", type=Path, default=Path("docs/notebooks"), help="where the pages go")
    nbk.add_argument("--full", action="store_true", help="QUICK = False (the default zoo); default: the quick zoo")
    nbk.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    nbk.set_defaults(fn=_cmd_notebooks)

    ev = sub.add_parser("eval", parents=[output_options()],
                        help="score model dirs with lm-evaluation-harness (CSV + figure; the eval extra)")
    ev.add_argument("models", nargs="+", type=Path, help="HF model dirs (merges, experts, ...)")
    ev.add_argument("--tasks", required=True, help="lm-eval task names, comma-separated")
    harness_options(ev)
    ev.add_argument("--device", default="auto")
    ev.set_defaults(fn=_cmd_eval)

    s = sub.add_parser("methods", help="list merge methods and their parameters")
    s.add_argument("method", nargs="?")
    s.set_defaults(fn=_cmd_methods)
