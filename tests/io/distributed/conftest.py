"""The checked-in fixtures, made by the real DeepSpeed 0.19.8 and torch FSDP2/DCP
(``tests/io/distributed/make_fixtures.sh``), and their expected moments (gathered
from the live optimizer inside each run)."""
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"

#: layout dir -> the expected file of the run it holds
LAYOUTS = {
    "zero1": "zero1", "zero2_elastic": "zero2_elastic", "zero3": "zero3", "fsdp2": "fsdp2",
    "same_run/a/deepspeed": "same_run/a/deepspeed", "same_run/a/trainer": "same_run/a/deepspeed",
    "same_run/a/dcp": "same_run/a/deepspeed", "same_run/a/paper": "same_run/a/deepspeed",
    "same_run/b/deepspeed": "same_run/b/deepspeed", "same_run/b/dcp": "same_run/b/deepspeed",
}


def expected(run: str) -> tuple[dict, dict]:
    """(name -> live exp_avg_sq, the file's metadata) of a fixture run."""
    file = FIXTURES / f"{run}.expected.safetensors"
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata()
    return load_file(str(file)), meta


@pytest.fixture
def fixture_copy(tmp_path):
    """A writable copy of one fixture dir (for tampering)."""
    import shutil

    def copy(rel: str) -> Path:
        dst = tmp_path / rel.replace("/", "_")
        shutil.copytree(FIXTURES / rel, dst)
        return dst

    return copy
