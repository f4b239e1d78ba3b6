"""The OTA authors' fork's configs, merged by curvlens, give the tensors the
fork's own code gave, bit for bit, without a checkout of the fork.

``ota_fork/fixtures/`` holds tiny inputs (a Llama base, three experts with their
``exp_avg_sq``), one fork config per case (its options: ``power``, ``epsilon``,
``normalise``, ``precond_threshold`` global and per model, ``fallback_to_base``,
``rank1_approx``, ``rank``, ``scaling_factor``, the ``linear`` and ``ties``
combines with ``ties_density``, ``rescale`` and ``rescale_relative_threshold``,
no base, bf16 inputs) and what the fork's ``run_merge`` wrote for it
(``expected/CASE.safetensors``), made by ``ota_fork/make_fixtures.sh`` (the
command and the fork's commit are in ``manifest.json``).
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from curvlens import Checkpoint
from curvlens.cli import main
from curvlens.config.merge import merge
from curvlens.config.merge_config import load_merge_config

FIXTURES = Path(__file__).parent / "ota_fork" / "fixtures"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
CASES = MANIFEST["cases"]


def test_every_case_has_a_config_and_the_forks_tensors():
    assert len(CASES) >= 15 and MANIFEST["fork"] == "github.com/pmahdavi/ota-merge" and MANIFEST["fork_commit"]
    assert {p.stem for p in FIXTURES.glob("*.yml")} == set(CASES)
    assert {p.stem for p in (FIXTURES / "expected").glob("*.safetensors")} == set(CASES)


def _expected(case):
    return load_file(str(FIXTURES / "expected" / f"{case}.safetensors"))


@pytest.mark.parametrize("case", CASES)
def test_curvlens_gives_the_forks_tensors(case):
    cfg = load_merge_config(FIXTURES / f"{case}.yml")
    res = merge(cfg.experts(), cfg.method, device="cpu", progress=False, **cfg.merge_kwargs())
    want = _expected(case)
    assert set(res.checkpoint) == set(want)
    for name, t in want.items():
        got = res.checkpoint[name]
        assert got.dtype == t.dtype and torch.equal(got, t), name


def test_the_cases_are_not_degenerate():
    # each case merges differently, and the masking cases mask some entries, not all
    base = load_file(str(FIXTURES / "inputs" / "base" / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    outs = {c: _expected(c)[name].float() for c in CASES}
    assert len({tuple(t.flatten().tolist()) for t in outs.values()}) == len(CASES)
    at_base = (outs["threshold_fallback_base"] == base[name]).float().mean()
    assert 0.05 < float(at_base) < 0.95


def test_a_fork_config_through_the_cli(tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(FIXTURES / "ties_density.yml"), str(out), "--device", "cpu", "--quiet"]) == 0
    got = Checkpoint.open(out)
    for name, t in _expected("ties_density").items():
        assert torch.equal(got[name], t), name
    assert "merged 3 experts with ota" in capsys.readouterr().out
