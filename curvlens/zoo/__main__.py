"""``python -m curvlens.zoo``: build a zoo, time it, print its score table.

The table has one row per model, base, each expert and the plain average of the
experts' weights, and one column per capability: the numbers ``docs/zoo.md``
reports. (``curvlens demo`` adds the other merge methods and a report.)

    python -m curvlens.zoo --config default --cache-dir /tmp/zoo --rebuild
"""
from __future__ import annotations

import argparse
import time

import pandas as pd

from curvlens.zoo.build import build, evaluate
from curvlens.zoo.config import PRESETS


def score_table(zoo) -> pd.DataFrame:
    """Accuracy of base, experts and the experts' weight average (rows) per capability."""
    from curvlens.config.merge import merge

    models = {"base": zoo.base_dir, **{f"expert: {n}": d for n, d in zoo.expert_dirs.items()}}
    models["average of experts"] = merge(zoo.experts(), "linear", device="cpu",
                                         progress=False).checkpoint
    rows = {label: evaluate(m, zoo=zoo).set_index("capability")["accuracy"]
            for label, m in models.items()}
    return pd.DataFrame(rows).T


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m curvlens.zoo", description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=list(PRESETS), default="default")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--rebuild", action="store_true", help="build even if cached")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    zoo = build(args.config, seed=args.seed, cache_dir=args.cache_dir,
                progress=not args.no_progress, rebuild=args.rebuild)
    print(f"zoo {zoo.root} ready in {time.perf_counter() - start:.1f} s (wall)")
    start = time.perf_counter()
    table = score_table(zoo)
    print(table.round(3).to_string())
    print(f"evaluated {len(table)} models in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
