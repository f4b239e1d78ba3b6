"""The ``curvlens`` command line: ``demo``, ``merge``, ``analyze``, ``figures``, ``methods``.

Each subcommand is a thin wrapper over the library; everything it does can be done
from Python (see the notebooks).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from curvlens.errors import CurvlensError


def _cmd_merge(a: argparse.Namespace) -> int:
    from curvlens.streams.merge import merge
    from curvlens.streams.merge_config import load_merge_config

    cfg = load_merge_config(a.config)
    if cfg.stack is not None:
        path = cfg.stack.run(a.out, overwrite=a.overwrite, max_shard_size=a.max_shard_size, progress=not a.quiet)
        print(f"stacked {cfg.stack.n_layers} layers from {len(cfg.models)} model(s) -> {path}")
        return 0
    experts = cfg.experts()
    for note in cfg.notes:
        print(f"note: {note}")
    result = merge(experts, cfg.method, a.out, device=a.device, overwrite=a.overwrite,
                   max_shard_size=a.max_shard_size, progress=not a.quiet, **cfg.merge_kwargs())
    print(f"merged {len(experts)} experts with {cfg.method} -> {result.path}")
    print(result.summary().to_string())
    return 0


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


def _cmd_figures(a: argparse.Namespace) -> int:
    from curvlens import zoo as zoo_mod
    from curvlens.demo import analysis_frames, evaluate_and_merge
    from curvlens.views.figures import FRAME_KEYS, render_all

    zoo = zoo_mod.build("quick" if a.quick else "default", progress=not a.quiet)
    experts = zoo.experts()
    table, merges = evaluate_and_merge(zoo, experts, device=a.device, progress=not a.quiet, echo=print)
    frames = analysis_frames(zoo, experts, merges, table, device=a.device, progress=not a.quiet, echo=print)
    frames = {k: v for k, v in frames.items() if k in FRAME_KEYS}  # the ones that have figures
    written = render_all(frames, a.out, formats=a.formats, capability_map=zoo.capabilities)
    print(f"wrote {len(written)} files to {a.out} (captions in {a.out / 'README.md'})")
    return 0


def _cmd_analyze(a: argparse.Namespace) -> int:
    from curvlens.streams.experts import Experts

    from curvlens.io.atomic import AtomicDir

    experts = Experts.from_dirs(a.base, a.experts, names=a.names, bias_correction=a.bias_correction,
                                exclude=a.exclude)
    # written beside its place and renamed in when complete; never onto an input
    with AtomicDir(a.out, overwrite=a.overwrite, inputs=experts.input_paths()) as tmp:
        results = _analyze_into(tmp, experts, a)
    print("model-level curvature overlap:")
    from curvlens.demo import regime_lines
    from curvlens.streams import analysis as A

    print(A.aggregate(results["curvature_overlap"], by=()).round(3).to_string(index=False))
    for line in regime_lines(results):
        print(line)
    return 0


def _analyze_into(tmp: Path, experts, a: argparse.Namespace) -> dict:
    from curvlens.streams import analysis as A

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="curvlens", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="build the demo zoo, evaluate, analyse, merge, write a report")
    d.add_argument("--out", type=Path, default=Path("demo_out"), help="output dir (default: demo_out)")
    d.add_argument("--quick", action="store_true", help="the small zoo (about a minute)")
    d.add_argument("--device", default="auto")
    d.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.add_argument("--threads", type=int, default=None,
                   help="torch threads on a CPU (default 1: a busy machine makes more many times slower)")
    d.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="build and analyse one zoo per seed and pool the findings over them (each further "
                        "seed costs one more zoo build; default: seed 0 alone)")
    d.set_defaults(fn=_cmd_demo)

    m = sub.add_parser("merge", help="merge models from a mergekit / OTA-fork YAML config")
    m.add_argument("config", type=Path)
    m.add_argument("out", type=Path)
    m.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda:0', ...")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    m.add_argument("--max-shard-size", default="1GB")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    m.add_argument("--threads", type=int, default=None,
                   help="torch threads on a CPU (default 1: a busy machine makes more many times slower)")
    m.set_defaults(fn=_cmd_merge)

    f = sub.add_parser("figures", help="regenerate every paper figure from the demo zoo (PDF + PNG)")
    f.add_argument("--out", type=Path, default=Path("figures"))
    f.add_argument("--quick", action="store_true", help="the small zoo")
    f.add_argument("--formats", nargs="+", default=["pdf", "png"])
    f.add_argument("--device", default="auto")
    f.add_argument("--quiet", action="store_true")
    f.add_argument("--threads", type=int, default=None,
                   help="torch threads on a CPU (default 1: a busy machine makes more many times slower)")
    f.set_defaults(fn=_cmd_figures)

    an = sub.add_parser("analyze", help="curvature overlap, masks and interference of your experts (CSV)")
    an.add_argument("experts", nargs="+", type=Path, help="expert dirs (paper layout: export/exp_avg_sq.safetensors)")
    an.add_argument("--base", type=Path, required=True, help="base model dir")
    an.add_argument("--names", nargs="+", help="expert names (default: dir names)")
    an.add_argument("--out", type=Path, default=Path("curvlens_analysis"))
    an.add_argument("--densities", nargs="+", type=float, default=[0.1, 0.3])
    an.add_argument("--bias-correction", action="store_true", help="divide moments by 1 - beta2**step")
    an.add_argument("--exclude", nargs="+", metavar="PATTERN",
                    help="leave tensors out: a substring ('classifier'), a glob ('*.pooler.*'), "
                         "'role:lm_head' or 'name:EXACT' (e.g. each task's head)")
    an.add_argument("--device", default="auto")
    an.add_argument("--overwrite", action="store_true")
    an.add_argument("--quiet", action="store_true")
    an.add_argument("--threads", type=int, default=None,
                   help="torch threads on a CPU (default 1: a busy machine makes more many times slower)")
    an.set_defaults(fn=_cmd_analyze)

    nbk = sub.add_parser("notebooks", help="execute the notebooks (no widget hang) and write readable pages")
    nbk.add_argument("which", nargs="*", help="notebook numbers or stems, e.g. 06 (default: all)")
    nbk.add_argument("--dir", type=Path, default=Path("notebooks"), help="where the NN_name.py sources are")
    nbk.add_argument("--out", type=Path, default=Path("docs/notebooks"), help="where the pages go")
    nbk.add_argument("--full", action="store_true", help="QUICK = False (the default zoo); default: the quick zoo")
    nbk.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    nbk.set_defaults(fn=_cmd_notebooks)

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
