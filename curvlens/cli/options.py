"""What several subcommands share: the runtime options, how experts and an
evaluator are given on the command line, and how results are written.

Every output goes through :class:`~curvlens.io.atomic.AtomicDir` (written beside
its place, renamed in when complete, never onto or inside an input).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr and exit 2,
    as every other bad input is."""

    def error(self, message: str):
        self.exit(2, f"curvlens: error: {self.prog}: {message} (see {self.prog} --help)\n")


def runtime_options() -> argparse.ArgumentParser:
    """--device, --quiet and --threads: what every subcommand that runs passes takes."""
    r = argparse.ArgumentParser(add_help=False)
    r.add_argument("--device", default="auto", help="'auto' (CUDA when present), 'cpu', 'cuda:0', ...")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    r.add_argument("--threads", type=int, default=None,
                   help="torch threads on a CPU (default 1: a busy machine makes more many times slower)")
    return r


def output_options(default: str | None = None) -> argparse.ArgumentParser:
    """--out (required unless a default is given) and --overwrite."""
    o = argparse.ArgumentParser(add_help=False)
    o.add_argument("--out", type=Path, required=default is None, default=None if default is None else Path(default),
                   help="output dir, written atomically, never onto or inside an input"
                        + (f" (default: {default})" if default else ""))
    o.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    return o


def experts_options(*, base_required: bool) -> argparse.ArgumentParser:
    """Expert dirs and how to read them."""
    e = argparse.ArgumentParser(add_help=False)
    e.add_argument("experts", nargs="+", type=Path, help="expert model dirs")
    e.add_argument("--base", type=Path, required=base_required, help="base model dir")
    e.add_argument("--names", nargs="+", help="expert names (default: the dir names)")
    e.add_argument("--exclude", nargs="+", metavar="PATTERN",
                   help="leave tensors out: a substring ('classifier'), a glob ('*.pooler.*'), "
                        "'role:lm_head' or 'name:EXACT' (e.g. each task's head)")
    return e


def moments_options(e: argparse.ArgumentParser) -> None:
    """--moments PATH... (e.g. Fishers from ``curvlens fisher``) and --bias-correction."""
    e.add_argument("--moments", nargs="+", type=Path, metavar="PATH",
                   help="one curvature source per expert (an export dir, exp_avg_sq.safetensors, optimizer.pt, "
                        "a `curvlens fisher` output); default: each expert dir's own")
    e.add_argument("--bias-correction", action="store_true", help="divide Adam moments by 1 - beta2**step")


def open_experts(a: argparse.Namespace, *, moments: bool):
    """The :class:`~curvlens.passes.experts.Experts` the arguments name; moments
    read when ``moments`` (from ``--moments`` when given, else each dir)."""
    from curvlens.passes.experts import Experts

    given = getattr(a, "moments", None)
    source: Any = list(given) if given else moments
    return Experts.from_dirs(a.base, a.experts, names=a.names, moments=source,
                             bias_correction=getattr(a, "bias_correction", False), exclude=a.exclude)


def harness_options(p: argparse.ArgumentParser) -> None:
    """lm-evaluation-harness's options (``--tasks`` itself is added by the caller)."""
    p.add_argument("--include-path", type=Path, action="append", help="a dir of local task YAMLs (repeatable)")
    p.add_argument("--zoo-tasks", choices=["quick", "default"], help="the demo zoo's capabilities as lm-eval tasks")
    p.add_argument("--metric", help="a task's score: 'acc', 'exact_match,strict-match' (default: its only one)")
    p.add_argument("--limit", type=float, help="first N examples per task (a fraction below 1)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--model-args", help="'dtype=bfloat16,max_length=2048' (lm-eval's HFLM options)")
    p.add_argument("--verbose", action="store_true", help="lm-eval's progress bars and warnings")


def evaluator_options(*, required: bool) -> argparse.ArgumentParser:
    """How merged models are scored: the demo zoo's evaluator or lm-eval tasks."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("evaluation (higher is better)")
    one = g.add_mutually_exclusive_group(required=required)
    one.add_argument("--zoo", choices=["quick", "default"], help="score on the demo zoo's capabilities")
    one.add_argument("--tasks", help="lm-eval task names, comma-separated (the eval extra)")
    harness_options(g)
    cluster = p.add_argument_group("where the merge + evaluate jobs run")
    cluster.add_argument("--client", choices=["local"], help="a local dask cluster (default: in this process)")
    cluster.add_argument("--workers", type=int, default=2, help="worker processes of --client local")
    return p


@dataclass
class Evaluator:
    """An evaluator built from the arguments, with what it reads."""

    evaluate: Callable[[str], Any]
    capabilities: dict | None  # expert -> capability, for the zoo
    inputs: list               # files and dirs it reads: never written


def lm_eval_from(a: argparse.Namespace, tasks: str):
    """The lm-eval evaluator of ``tasks`` and the task dirs it reads."""
    from curvlens.evaluators import lm_eval, zoo_tasks

    include = list(a.include_path or []) + ([zoo_tasks(a.zoo_tasks)] if a.zoo_tasks else [])
    ev = lm_eval(tasks, metric=a.metric, limit=a.limit, num_fewshot=a.num_fewshot, batch_size=a.batch_size,
                 device=a.device, model_args=a.model_args, include_path=include or None, quiet=not a.verbose)
    return ev, include


def make_evaluator(a: argparse.Namespace) -> Evaluator | None:
    """The evaluator the arguments ask for (``--zoo`` or ``--tasks``), or None."""
    if getattr(a, "zoo", None):
        from curvlens import zoo as zoo_mod

        zoo = zoo_mod.build(a.zoo, progress=not a.quiet)
        return Evaluator(zoo.evaluator(device=a.device), dict(zoo.capabilities), [zoo.root])
    if getattr(a, "tasks", None):
        ev, include = lm_eval_from(a, a.tasks)
        return Evaluator(ev, None, include)
    return None


def save_figures(tmp: Path, stem: str, static, interactive=None) -> list[Path]:
    """A figure as ``stem.png`` and, where a plotly twin exists, ``stem.html``
    (self-contained: plotly.js inlined, opens offline)."""
    import matplotlib.pyplot as plt

    from curvlens.views.figures import save_figure

    fig = static.figure if hasattr(static, "figure") and not hasattr(static, "savefig") else static
    written = [save_figure(fig, tmp / f"{stem}.png")]
    plt.close(fig)
    if interactive is not None:
        interactive.write_html(tmp / f"{stem}.html", include_plotlyjs=True, full_html=True)
        written.append(tmp / f"{stem}.html")
    return written


def report(out: Path, tmp: Path, written: list[Path]) -> None:
    """One line per file written, named where it will be once renamed in."""
    for p in written:
        print(f"  {out / Path(p).relative_to(tmp)}", file=sys.stdout)


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
