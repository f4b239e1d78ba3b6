"""The real libraries, run here on CPU with 2 processes: DeepSpeed ZeRO 1, 2 and 3
(skipped without deepspeed, ``pip install -e .[deepspeed]``) and FSDP2 + DCP (torch
only). Each run saves its checkpoint and, from inside the run, the live optimizer's
full ``exp_avg_sq`` per name; the moments read back must equal them bitwise."""
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from curvlens import Experts, Moments

HERE = Path(__file__).parent
ROOT = HERE.parents[2]


def _torchrun(script: str, out: Path, *args: str, port: int) -> None:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(HERE / script), "--out", str(out), *args]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if run.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")


def _check(out: Path) -> None:
    want = load_file(str(out.with_name(out.name + ".expected.safetensors")))
    m = Moments.open(out)
    assert set(m) == set(want)
    for name, v in want.items():
        assert torch.equal(m[name], v), name
    assert m.step == 3 and m.beta2 == 0.999
    Experts.from_dirs(None, [out], moments=True).experts[0].moments.validate(out)


needs_deepspeed = [
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                       reason="deepspeed is not installed (pip install -e .[deepspeed]); the checked-in fixtures "
                              "made by it are still tested in test_fixtures.py"),
    pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                       reason="DeepSpeed builds its CPU comm op with a C++ compiler; none found"),
]


@needs_deepspeed[0]
@needs_deepspeed[1]
@pytest.mark.parametrize("stage,args", [(1, ()), (2, ()), (3, ("--sub-group-size", "100")), (3, ())])
def test_deepspeed_zero_moments_equal_the_live_optimizer(tmp_path, stage, args):
    out = tmp_path / f"zero{stage}"
    _torchrun("make_deepspeed.py", out, "--stage", str(stage), *args, port=29531 + stage)
    _check(out)
    assert Moments.open(out).metadata["zero_stage"] == str(stage)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch build has no torch.distributed")
def test_fsdp2_dcp_moments_equal_the_live_optimizer(tmp_path):
    out = tmp_path / "fsdp2"
    _torchrun("make_fsdp2.py", out, port=29541)
    _check(out)


@needs_deepspeed[0]
@needs_deepspeed[1]
@pytest.mark.parametrize("stage", [2, 3])
def test_hf_trainer_under_deepspeed_checkpoint_dir_opens_bitwise(tmp_path, stage):
    """transformers.Trainer(deepspeed=...) writes checkpoint-3/ with the model files,
    latest and global_step3/; Experts.from_dirs reads it as an expert dir."""
    out = tmp_path / f"trainer_zero{stage}"
    _torchrun("make_trainer_deepspeed.py", out, "--stage", str(stage), port=29551 + stage)
    want = load_file(str(out.with_name(out.name + ".expected.safetensors")))
    ckpt = out / "checkpoint-3"
    m = Experts.from_dirs(None, [ckpt]).experts[0].moments
    assert set(m) == set(want) and all(torch.equal(m[n], v) for n, v in want.items())
    assert m.step == 3 and m.beta2 == 0.999 and m.metadata["zero_stage"] == str(stage)
