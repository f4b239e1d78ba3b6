"""One training run written in every layout curvlens reads gives the same analyses
and merges: the paper's export, an HF Trainer ``optimizer.pt``, a DeepSpeed ZeRO-2
dir and an FSDP-style DCP dir (``make_deepspeed.py --same-run``: the live ZeRO-2
optimizer state of each of two experts, written in all four layouts)."""
import pandas as pd
import pytest
import torch

import curvlens as cl
from tests.io.distributed.conftest import FIXTURES

RUN = FIXTURES / "same_run"
LAYOUTS = ["paper", "trainer", "deepspeed", "dcp"]


def _experts(layout: str) -> cl.Experts:
    return cl.Experts.from_dirs(RUN / "base", [RUN / "a" / layout, RUN / "b" / layout], names=["a", "b"])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = {}
    for layout in LAYOUTS:
        ex = _experts(layout)
        tmp = tmp_path_factory.mktemp(layout)
        frames = {
            "overlap": cl.curvature_overlap(ex, device="cpu", progress=False),
            "stats": cl.curvature_stats(ex, device="cpu", progress=False),
            "levels": cl.moment_levels(ex, device="cpu", progress=False),
            "interference": cl.interference(ex, device="cpu", progress=False),
            "masks": cl.mask_stats(ex, densities=(0.3,), device="cpu", progress=False),
        }
        # every analysis in one pass: three reads here where the moments are no
        # safetensors (no sampled selection), two where they are
        fused = cl.analyze(ex, densities=(0.3,), device="cpu", progress=False)
        frames.update({f"analyze: {k}": df for k, df in fused.items()})
        merges = {}
        for method, params in [("ota", {"ffg_density": 0.3}), ("fisher", {}), ("ties", {"density": 0.5}),
                               ("linear", {})]:
            res = cl.merge(ex, method, tmp / method, device="cpu", progress=False, **params)
            merges[method] = {n: res.checkpoint[n] for n in res.checkpoint.keys()}
        out[layout] = (frames, merges)
    return out


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_analyses_are_identical_in_every_layout(results, layout):
    ref, got = results["paper"][0], results[layout][0]
    for key in ref:
        pd.testing.assert_frame_equal(got[key], ref[key], check_exact=True, obj=f"{layout}: {key}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_one_pass_analysis_is_the_single_analyses_in_every_layout(results, layout):
    frames = results[layout][0]
    for key, single in [("curvature_overlap", "overlap"), ("curvature_stats", "stats"), ("moment_levels", "levels"),
                        ("interference", "interference"), ("mask_stats", "masks")]:
        pd.testing.assert_frame_equal(frames[f"analyze: {key}"], frames[single], check_exact=True,
                                      obj=f"{layout}: {key}")
    assert set(frames) >= {f"analyze: {k}" for k in ("log10_histogram", "edit_norms", "mask_overlap")}


@pytest.mark.parametrize("layout", LAYOUTS[1:])
def test_merges_are_identical_in_every_layout(results, layout):
    ref, got = results["paper"][1], results[layout][1]
    for method in ref:
        assert set(got[method]) == set(ref[method])
        for name, t in ref[method].items():
            assert torch.equal(got[method][name], t), (layout, method, name)


def test_the_two_experts_differ_so_the_comparison_can_fail(results):
    frames, merges = results["paper"]
    a = cl.Moments.open(RUN / "a" / "paper")
    b = cl.Moments.open(RUN / "b" / "paper")
    assert not torch.equal(a["lm_head.weight"], b["lm_head.weight"])
    assert not torch.equal(merges["ota"]["lm_head.weight"], merges["linear"]["lm_head.weight"])
    assert len(frames["overlap"]) > 0
