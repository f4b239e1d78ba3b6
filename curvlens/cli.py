"""The ``curvlens`` command line: ``demo``, ``merge``, ``methods``.

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
    experts = cfg.experts()
    result = merge(experts, cfg.method, a.out, device=a.device, dtype=cfg.dtype, overwrite=a.overwrite,
                   max_shard_size=a.max_shard_size, progress=not a.quiet, config_text=cfg.text,
                   **cfg.params)
    print(f"merged {len(experts)} experts with {cfg.method} -> {result.path}")
    print(result.summary().to_string())
    return 0


def _cmd_methods(a: argparse.Namespace) -> int:
    import pandas as pd

    from curvlens.math.merge_methods import list_methods

    with pd.option_context("display.max_rows", None, "display.max_colwidth", 90, "display.width", 200):
        df = list_methods()
        print(df[df.method == a.method].to_string(index=False) if a.method else df.to_string(index=False))
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from curvlens.demo import run_demo

    run_demo(a.out, config="quick" if a.quick else "default", device=a.device, overwrite=a.overwrite,
             progress=not a.quiet, echo=print)
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
    d.set_defaults(fn=_cmd_demo)

    m = sub.add_parser("merge", help="merge models from a mergekit / OTA-fork YAML config")
    m.add_argument("config", type=Path)
    m.add_argument("out", type=Path)
    m.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda:0', ...")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    m.add_argument("--max-shard-size", default="1GB")
    m.add_argument("--quiet", action="store_true", help="no progress bars")
    m.set_defaults(fn=_cmd_merge)

    s = sub.add_parser("methods", help="list merge methods and their parameters")
    s.add_argument("method", nargs="?")
    s.set_defaults(fn=_cmd_methods)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``curvlens`` command."""
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except CurvlensError as err:
        print(f"curvlens: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
