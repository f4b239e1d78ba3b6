"""Every pass gives the CPU's numbers on another device.

Each test runs on ``cpu`` (which checks the comparison itself) and on ``cuda``
(marked ``cuda``: skipped without a device, run by ``benchmarks/gpu_check.py`` on a
GPU machine). The reference is always computed on the CPU. Deterministic merges
must agree to fp32 rounding of a few operations (power, division: CUDA's and the
CPU's libm may differ in the last bit), exact selections exactly (the same
entries kept), random-mask methods in distribution (each device has its own
generator stream).
"""
import pytest
import torch

import curvlens as cl

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
EXACT_METHODS = {"linear": {}, "task_arithmetic": {"lambda": 0.7}, "ties": {"density": 0.5},
                 "breadcrumbs_ties": {"density": 0.6, "gamma": 0.05}, "fisher": {},
                 "ota": {"epsilon": 1e-26}, "ota+ffg": {"epsilon": 1e-26, "ffg_density": 0.3,
                                                         "fallback_to_base": True}}
FP32_TOL = dict(rtol=2e-6, atol=1e-7)


@pytest.fixture
def experts(tiny_zoo):
    base, dirs, *_ = tiny_zoo
    return cl.Experts.from_dirs(base, dirs)


def _merged(experts, label, device, **kw):
    method = "ota" if label.startswith("ota") else label
    res = cl.merge(experts, method, device=device, progress=False, dtype="float32", **EXACT_METHODS[label], **kw)
    return {n: res.checkpoint[n] for n in res.checkpoint.keys()}, res


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label", sorted(EXACT_METHODS))
def test_deterministic_merges_match_the_cpu(experts, label, device):
    ref, ref_res = _merged(experts, label, "cpu")
    got, res = _merged(experts, label, device)
    assert got.keys() == ref.keys()
    for n in ref:
        assert got[n].device.type == "cpu" and got[n].dtype == torch.float32, n
        torch.testing.assert_close(got[n], ref[n], **FP32_TOL, msg=lambda m, n=n: f"{label}, {n}: {m}")
    # the masks kept the same entries (the report counts them), the selection the same thresholds
    kept = [c for c in ref_res.report.columns if c.startswith("kept_") or c == "all_masked"]
    assert res.report[kept].equals(ref_res.report[kept])
    if ref_res.thresholds is not None:
        assert res.thresholds["kept"].tolist() == ref_res.thresholds["kept"].tolist()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_random_masks_keep_their_density_on_the_device(experts, method, device):
    params = {"density": 0.4} if method == "dare_ties" else {"density": 0.4, "epsilon": 0.1}
    res = cl.merge(experts, method, device=device, progress=False, dtype="float32", seed=3, **params)
    r = res.report[res.report["source"] == "merged"]
    kept = (r[[c for c in r.columns if c.startswith("kept_")]].mul(r["numel"], axis=0).sum() / r["numel"].sum())
    assert ((kept - 0.4).abs() < 0.08).all(), kept  # ~1900 entries per expert: 4 SE is about 0.045
    for n in res.checkpoint.keys():
        assert torch.isfinite(res.checkpoint[n]).all()


@pytest.mark.parametrize("device", DEVICES)
def test_model_wide_selections_match_the_cpu(experts, device):
    ref = cl.mask_thresholds(experts, [0.1, 0.3], device="cpu", progress=False)
    got = cl.mask_thresholds(experts, [0.1, 0.3], device=device, progress=False)
    assert got["kept"].tolist() == ref["kept"].tolist()
    torch.testing.assert_close(torch.tensor(got["threshold"].to_numpy()), torch.tensor(ref["threshold"].to_numpy()),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_analyses_match_the_cpu(experts, device):
    import numpy as np
    import pandas as pd

    for fn, kw in [(cl.curvature_overlap, {}), (cl.curvature_stats, {}), (cl.interference, {}),
                   (cl.mask_stats, {"densities": [0.3]}), (cl.edit_norms, {}), (cl.log10_histogram, {})]:
        ref = fn(experts, device="cpu", progress=False, **kw)
        got = fn(experts, device=device, progress=False, **kw)
        assert list(got.columns) == list(ref.columns), fn.__name__
        num = [c for c in ref.columns if pd.api.types.is_numeric_dtype(ref[c])]
        np.testing.assert_allclose(got[num].to_numpy(float), ref[num].to_numpy(float), rtol=1e-5, atol=1e-9,
                                   err_msg=fn.__name__)


@pytest.mark.parametrize("device", DEVICES)
def test_gram_matrices_match_the_cpu(experts, device):
    import numpy as np

    ref = cl.gram_matrices(experts, device="cpu", progress=False)
    got = cl.gram_matrices(experts, device=device, progress=False)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 6))

    def forward(self, input):
        return input @ self.w


@pytest.mark.parametrize("device", DEVICES)
def test_estimate_fisher_matches_the_cpu(device):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(9, 6, generator=g), torch.randn(9, generator=g)
    loss = lambda out, ex: 0.5 * (out[0] - ex["labels"]) ** 2  # noqa: E731
    batches = [{"input": x, "labels": y}]
    ref = cl.estimate_fisher(_Linear(), batches, loss=loss, device="cpu", progress=False)
    got = cl.estimate_fisher(_Linear(), batches, loss=loss, device=device, progress=False)
    torch.testing.assert_close(got["w"], ref["w"], rtol=1e-5, atol=0)
