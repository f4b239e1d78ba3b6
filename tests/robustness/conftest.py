"""A tiny zoo on disk, shared by the robustness suite (module scope: Hypothesis
examples reuse it; each example writes only into its own cleaned temp dir)."""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tests.conftest import make_tiny_zoo


class Zoo(tuple):
    """``(base, [expert dirs], weights, moments)``, shown by its dir only (in a
    Hypothesis failure report)."""

    def __repr__(self) -> str:
        return f"Zoo({self[0].parent})"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """``(base, [expert dirs], weights, moments)``: three tiny Llama experts with moments."""
    return Zoo(make_tiny_zoo(tmp_path_factory.mktemp("robust-zoo"), n_experts=3))


@contextmanager
def scratch():
    """A temp dir removed afterwards, whatever happened (one per Hypothesis example)."""
    with tempfile.TemporaryDirectory(prefix="curvlens-robust-") as d:
        yield Path(d)


def same_tensors(a, b) -> list[str]:
    """Names whose tensors differ (dtype, shape or any bit) between two checkpoints,
    plus names only one has."""
    diff = sorted(set(a.keys()) ^ set(b.keys()))
    for k in set(a.keys()) & set(b.keys()):
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            diff.append(k)
    return diff
