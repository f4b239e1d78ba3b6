import pytest

from tests.views.frames import CAPABILITIES, make_frames

EXPERTS = ("math", "code", "instruct")


@pytest.fixture(scope="session")
def frames():
    """Small hand-made analysis frames: 2 layers, 3 experts, 4 x 4 pooled blocks."""
    return make_frames(experts=EXPERTS)


@pytest.fixture(scope="session")
def capability_map():
    return {e: CAPABILITIES[e] for e in EXPERTS}
