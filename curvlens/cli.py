"""The ``curvlens`` command line: ``demo``, ``merge``, ``analyze``, ``inspect``, ``eval``, ``figures``, ``methods``.

Run as ``curvlens ...`` or ``python -m curvlens ...``.

Each subcommand is a thin wrapper over the library; everything it does can be done
from Python (see the notebooks).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

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
    print(f"curvlens: warning: {_one_line(str(message))}", file=sys.stderr)


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
        print(f"curvlens: error: {row.path}: {_one_line(str(row.note))}", file=sys.stderr)
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
             progress=not a.quiet, echo=print)
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


def _cmd_analyze(a: argparse.Namespace) -> int:
    from curvlens.io.atomic import AtomicDir
    from curvlens.passes.experts import Experts

    experts = Experts.from_dirs(a.base, a.experts, names=a.names, bias_correction=a.bias_correction,
                                exclude=a.exclude)
    # written beside its place and renamed in when complete; never onto an input
    with AtomicDir(a.out, overwrite=a.overwrite, inputs=experts.input_paths()) as tmp:
        results = _analyze_into(tmp, experts, a)
    print("model-level curvature overlap:")
    from curvlens.demo import regime_lines
    from curvlens.passes import analysis as A

    print(A.aggregate(results["curvature_overlap"], by=()).round(3).to_string(index=False))
    for line in regime_lines(results):
        print(line)
    return 0


def _analyze_into(tmp: Path, experts, a: argparse.Namespace) -> dict:
    from curvlens.passes import analysis as A

    kw = {"device": a.device, "progress": not a.quiet}
    frames = {
        "curvature_stats": lambda: A.curvature_stats(experts, **kw),
        "curvature_overlap": lambda: A.curvature_overlap(experts, **kw),
        "mask_stats": lambda: A.mask_stats(experts, densities=a.densities, **kw),
        "interference": lambda: A.interference(experts, **kw),
    }
    results = {}
    for key, compute in frames.items():
        results[key] = compute()
    from curvlens.demo import regime_frames

    # the findings that need no scores (masks, overlap), and the regime
    results.update(regime_frames(experts, results, **kw))
    for key, df in results.items():
        df.to_csv(tmp / f"{key}.csv", index=False)
        print(f"{key}: {len(df)} rows -> {a.out / (key + '.csv')}")
    return results


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
    from curvlens.evaluators import lm_eval, score_models, zoo_tasks
    from curvlens.io.atomic import AtomicDir
    from curvlens.views.figures import save_figure
    from curvlens.views.harness import harness_scores

    include = list(a.include_path or []) + ([zoo_tasks(a.zoo_tasks)] if a.zoo_tasks else [])
    ev = lm_eval(a.tasks, metric=a.metric, limit=a.limit, num_fewshot=a.num_fewshot, batch_size=a.batch_size,
                 device=a.device, model_args=a.model_args, include_path=include or None, quiet=not a.verbose)
    # written beside its place and renamed in when complete; never onto a model or a task dir
    with AtomicDir(a.out, overwrite=a.overwrite, inputs=[*a.models, *include]) as tmp:
        df = score_models(a.models, ev, progress=print)
        df.to_csv(tmp / "scores.csv", index=False)
        if (df["status"] == "ok").any():
            save_figure(harness_scores(df).figure, tmp / "scores.png")
    print(f"{len(df)} rows -> {a.out / 'scores.csv'}")
    return 0


def _runtime_options() -> argparse.ArgumentParser:
    """--device, --quiet and --threads: what every subcommand that runs passes takes."""
    r = argparse.ArgumentParser(add_help=False)
    r.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda:0', ...")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--threads", type=int, default=None,
                   help="torch threads on a CPU (default 1: a busy machine makes more many times slower)")
    return r


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="curvlens", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    runtime = [_runtime_options()]

    d = sub.add_parser("demo", parents=runtime, help="build the demo zoo, evaluate, analyse, merge, write a report")
    d.add_argument("--out", type=Path, default=Path("demo_out"), help="output dir (default: demo_out)")
    d.add_argument("--quick", action="store_true", help="the small zoo (about a minute)")
    d.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
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

    an = sub.add_parser("analyze", parents=runtime,
                        help="curvature overlap, masks and interference of your experts (CSV)")
    an.add_argument("experts", nargs="+", type=Path, help="expert dirs (paper layout: export/exp_avg_sq.safetensors)")
    an.add_argument("--base", type=Path, required=True, help="base model dir")
    an.add_argument("--names", nargs="+", help="expert names (default: dir names)")
    an.add_argument("--out", type=Path, default=Path("curvlens_analysis"))
    an.add_argument("--densities", nargs="+", type=float, default=[0.1, 0.3])
    an.add_argument("--bias-correction", action="store_true", help="divide moments by 1 - beta2**step")
    an.add_argument("--exclude", nargs="+", metavar="PATTERN",
                    help="leave tensors out: a substring ('classifier'), a glob ('*.pooler.*'), "
                         "'role:lm_head' or 'name:EXACT' (e.g. each task's head)")
    an.add_argument("--overwrite", action="store_true")
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

    ev = sub.add_parser("eval", help="score model dirs with lm-evaluation-harness (CSV + figure; the eval extra)")
    ev.add_argument("models", nargs="+", type=Path, help="HF model dirs (merges, experts, ...)")
    ev.add_argument("--tasks", required=True, help="lm-eval task names, comma-separated")
    ev.add_argument("--out", type=Path, required=True, help="output dir: scores.csv, scores.png")
    ev.add_argument("--include-path", type=Path, action="append", help="a dir of local task YAMLs (repeatable)")
    ev.add_argument("--zoo-tasks", choices=["quick", "default"], help="the demo zoo's capabilities as tasks")
    ev.add_argument("--metric", help="a task's score: 'acc', 'exact_match,strict-match' (default: its only one)")
    ev.add_argument("--limit", type=float, help="first N examples per task (a fraction below 1)")
    ev.add_argument("--num-fewshot", type=int)
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--model-args", help="'dtype=bfloat16,max_length=2048' (lm-eval's HFLM options)")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--overwrite", action="store_true")
    ev.add_argument("--verbose", action="store_true", help="lm-eval's progress bars and warnings")
    ev.set_defaults(fn=_cmd_eval)

    s = sub.add_parser("methods", help="list merge methods and their parameters")
    s.add_argument("method", nargs="?")
    s.set_defaults(fn=_cmd_methods)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``curvlens`` command."""
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "threads", None) is not None:
            from curvlens.runtime import set_threads

            set_threads(args.threads)
        return args.fn(args)
    except CurvlensError as err:
        # one line, whatever the message's layout: scripts grep stderr
        print(f"curvlens: error: {_one_line(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("curvlens: interrupted; partial output removed", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a bug, still one line (exit 1), never a traceback
        print(f"curvlens: internal error: {type(err).__name__}: {_one_line(str(err))} (a bug in curvlens: "
              "please report it with the command that raised it)", file=sys.stderr)
        return 1


def _one_line(msg: str) -> str:
    r"""A multi-line message (a list of problems) joined into one line.

    Examples
    --------
    >>> _one_line("experts do not line up:\n  a: no moment\n  b: no moment")
    'experts do not line up: a: no moment; b: no moment'
    """
    head, *rest = [line.strip() for line in msg.strip().splitlines() if line.strip()] or [""]
    if not rest:
        return head
    return head + (" " if head.endswith(":") else "; ") + "; ".join(rest)


if __name__ == "__main__":
    sys.exit(main())
