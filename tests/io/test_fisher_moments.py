"""A Fisher written by estimate_fisher reads back through Moments like exp_avg_sq."""
import pytest
import torch

import curvlens as cl
from curvlens.errors import CurvlensError


def _fisher(tmp_path, out):
    lin = torch.nn.Linear(3, 1, bias=False)
    x = torch.arange(12.0).reshape(4, 3)
    return cl.estimate_fisher(lin, [{"input": x, "labels": torch.zeros(4)}], out,
                              loss=lambda o, ex: 0.5 * (o[0, 0] - ex["labels"]) ** 2, device="cpu", progress=False)


def test_metadata_and_layout(tmp_path):
    f = _fisher(tmp_path, tmp_path / "expert")
    m = cl.Moments.open(tmp_path / "expert")            # finds export/exp_avg_sq.safetensors
    assert m.path == tmp_path / "expert" / "export" / "exp_avg_sq.safetensors"
    assert m.metadata["kind"] == "empirical_fisher" and m.metadata["n_examples"] == "4"
    assert m.step is None and m.beta2 is None
    assert torch.equal(m["weight"], f["weight"]) and m["weight"].dtype == torch.float32
    with pytest.raises(CurvlensError, match="bias_correction=True needs"):
        cl.Moments.open(tmp_path / "expert", bias_correction=True)   # a Fisher has no Adam step
    file = _fisher(tmp_path, tmp_path / "f.safetensors")
    assert file.path == tmp_path / "f.safetensors"
    assert cl.Moments.open(tmp_path / "f.safetensors").metadata["loss"].startswith("callable")
