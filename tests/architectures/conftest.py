"""Architecture tier fixtures: transformers families fine-tuned by the real ``Trainer``.

Skipped unless ``transformers`` and ``accelerate`` (which ``Trainer`` needs) are
installed. ``families`` builds every family's base and two experts once per
session (about 40 s on 2 CPU cores) in a session temp dir, or under
``$CURVLENS_TEST_CACHE/families`` when that is set (a complete earlier build of the
same recipe is reused).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def families(tmp_path_factory):
    """``{family: {"base": Path, "experts": {"a": Path, "b": Path}}}``."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from tests.architectures.families import build_all

    cache = os.environ.get("CURVLENS_TEST_CACHE")
    root = Path(cache) / "families" if cache else tmp_path_factory.mktemp("families")
    return build_all(root)["families"]
