"""The ``curvlens`` command line.

Run as ``curvlens ...`` or ``python -m curvlens ...``. Models: ``demo``,
``merge``, ``analyze``, ``inspect``, ``eval``, ``methods``, ``figures``, ``notebooks``
(:mod:`curvlens.cli.models`); a data Fisher: ``fisher`` (:mod:`curvlens.cli.fisher`);
many merges at once: ``soup``, ``sweep``, ``front``, ``sparse-soup``
(:mod:`curvlens.cli.studies`).

Each subcommand is a thin wrapper over the library; everything it does can be done
from Python (see the notebooks). Every bad input is one line on stderr and exit
status 2.
"""
from __future__ import annotations

import sys

from curvlens.cli import fisher, models, studies
from curvlens.cli.options import Parser, one_line, runtime_options
from curvlens.errors import CurvlensError


def build_parser() -> Parser:
    """The ``curvlens`` argument parser with every subcommand."""
    p = Parser(prog="curvlens", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    runtime = [runtime_options()]
    models.add_subcommands(sub, runtime)
    fisher.add_subcommands(sub, runtime)
    studies.add_subcommands(sub, runtime)
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
        print(f"curvlens: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("curvlens: interrupted; partial output removed", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - a bug, still one line (exit 1), never a traceback
        print(f"curvlens: internal error: {type(err).__name__}: {one_line(str(err))} (a bug in curvlens: "
              "please report it with the command that raised it)", file=sys.stderr)
        return 1


__all__ = ["build_parser", "main", "one_line"]
