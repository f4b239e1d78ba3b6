"""The zoo build in a process of its own, run by :func:`curvlens.zoo.build.build`
under the environment :func:`curvlens.zoo.pinning.build_environment` pins (one
thread, the CPU's kernels fixed: see :mod:`curvlens.zoo.pinning`).

    python -m curvlens.zoo.worker PARTIAL_DIR CONFIG_JSON SEED [--progress]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    progress = "--progress" in args
    path, config_json, seed = [a for a in args if a != "--progress"]
    import torch

    from curvlens.zoo.build import build_into
    from curvlens.zoo.config import ZooConfig

    fields = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
              for k, v in json.loads(config_json).items()}
    # CPU kernels with a nondeterministic variant (few) take the deterministic one
    torch.use_deterministic_algorithms(True)
    build_into(Path(path), ZooConfig(**fields), int(seed), progress=progress)


if __name__ == "__main__":
    main()
