"""Hand-made experts on disk and picklable evaluators with known answers
(module level, so dask workers can unpickle them)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from curvlens import Checkpoint
from curvlens.io.writer import write_model


def write_experts(root: Path, base: dict | None, experts: dict[str, dict], moments: dict[str, dict] | None = None):
    """Write ``base`` and each expert (with ``export/exp_avg_sq.safetensors`` when
    ``moments`` has it) as model dirs; returns (base_dir or None, [expert dirs])."""
    from safetensors.torch import save_file

    base_dir = write_model({k: torch.as_tensor(v, dtype=torch.float32) for k, v in base.items()},
                           root / "base") if base is not None else None
    dirs = []
    for name, w in experts.items():
        d = write_model({k: torch.as_tensor(v, dtype=torch.float32) for k, v in w.items()}, root / name)
        if moments is not None and name in moments:
            (d / "export").mkdir()
            save_file({k: torch.as_tensor(v, dtype=torch.float32) for k, v in moments[name].items()},
                      str(d / "export" / "exp_avg_sq.safetensors"))
        dirs.append(d)
    return base_dir, dirs


class DistanceScore:
    """``{metric: -||w - target||^2}`` for each named target of tensor ``w``."""

    def __init__(self, targets: dict[str, list[float]], tensor: str = "w"):
        self.targets = {k: torch.tensor(v, dtype=torch.float64) for k, v in targets.items()}
        self.tensor = tensor

    def __call__(self, model_dir: str) -> dict[str, float]:
        w = Checkpoint.open(model_dir)[self.tensor].double().reshape(-1)
        return {k: -float(((w - t) ** 2).sum()) for k, t in self.targets.items()}


class BoundedScore(DistanceScore):
    """``{metric: exp(-||w - target||^2)}``: an accuracy-like score in (0, 1]."""

    def __call__(self, model_dir: str) -> dict[str, float]:
        return {k: math.exp(v) for k, v in super().__call__(model_dir).items()}


class FailsAbove:
    """Raises when ``w[0]`` exceeds ``limit``, else returns ``{"w0": w[0]}``."""

    def __init__(self, limit: float):
        self.limit = limit

    def __call__(self, model_dir: str) -> dict[str, float]:
        w0 = float(Checkpoint.open(model_dir)["w"].reshape(-1)[0])
        if w0 > self.limit:
            raise ValueError(f"w0={w0} above {self.limit}")
        return {"w0": w0}


class KillsWorkerOnJob0:
    """Ends its process (as a crash or the OOM killer would) when scoring job 0;
    ``{"x": 1.0}`` otherwise. Cluster tests only: in-process it ends the test run."""

    def __call__(self, model_dir: str) -> dict[str, float]:
        import os

        if "job000-" in model_dir:
            os._exit(3)
        return {"x": 1.0}


class Unpicklable:
    """Holds a lock, so it cannot be sent to a worker."""

    def __init__(self):
        import threading

        self.lock = threading.Lock()

    def __call__(self, model_dir: str) -> dict[str, float]:
        return {"x": 1.0}
