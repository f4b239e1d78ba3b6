import json

import pytest
import torch
from safetensors import safe_open

from curvlens import CurvlensError, Moments, export_moments
from tests.io.test_moments import Tiny, expected, trained


def test_round_trip_equals_optimizer_state(tmp_path):
    model, opt = trained(steps=4)
    path = export_moments(opt, model, tmp_path / "export" / "exp_avg_sq.safetensors")
    m = Moments.open(tmp_path)  # finds export/exp_avg_sq.safetensors
    want = expected(model, opt)
    assert set(m) == set(want)
    for k, v in want.items():
        assert m[k].dtype == torch.float32
        assert torch.equal(m[k], v)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert int(meta["step"]) == 4 and json.loads(meta["betas"]) == [0.9, 0.999] and float(meta["eps"]) == 1e-8
    assert m.step == 4 and m.beta2 == 0.999
    # bias correction uses what the export recorded
    mc = Moments.open(path, bias_correction=True)
    torch.testing.assert_close(mc["l1.weight"], want["l1.weight"] / (1 - 0.999**4))


def test_export_before_any_step_fails(tmp_path):
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(CurvlensError, match="has no 'exp_avg_sq'.*at least one"):
        export_moments(opt, model, tmp_path / "v.safetensors")
    assert not (tmp_path / "v.safetensors").exists()


def test_frozen_parameters_are_skipped_not_failed(tmp_path):
    model = Tiny()
    model.norm.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters())
    model.l2(model.norm(model.l1(torch.randn(2, 4)))).sum().backward()
    opt.step()
    m = Moments.open(export_moments(opt, model, tmp_path / "v.safetensors"))
    assert "norm.weight" not in m and "l1.weight" in m
