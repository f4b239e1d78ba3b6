"""The ``curvlens`` command line.

Run as ``curvlens ...`` or ``python -m curvlens ...``. Models: ``demo``,
``merge``, ``analyze``, ``eval``, ``methods``, ``figures``, ``notebooks``
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
from curvlens.cli.options import Parser, runtime_options
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


def one_line(msg: str) -> str:
    r"""A multi-line message (a list of problems) joined into one line.

    Examples
    --------
    >>> one_line("experts do not line up:\n  a: no moment\n  b: no moment")
    'experts do not line up: a: no moment; b: no moment'
    """
    head, *rest = [line.strip() for line in msg.strip().splitlines() if line.strip()] or [""]
    if not rest:
        return head
    return head + (" " if head.endswith(":") else "; ") + "; ".join(rest)
