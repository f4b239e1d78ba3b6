"""Every family of the tier, as a user meets it: two ``transformers.Trainer``
``checkpoint-N`` dirs over a saved base. The moments read from ``optimizer.pt``
equal the live optimizer's state bit for bit under the names ``save_pretrained``
wrote; every analysis runs; every method that merges two experts merges; the
merged dir loads with the family's class and runs."""
from __future__ import annotations

import math
import warnings

import pandas as pd
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

import curvlens as cl  # noqa: E402
from curvlens.io.architecture import architecture_orders  # noqa: E402
from curvlens.math.methods import get_method  # noqa: E402
from tests.architectures.families import (EXPERTS, FAMILIES, LIVE, LIVE_SAVED, config_of,  # noqa: E402
                                          model_class, sample_batch)

KW = {"device": "cpu", "progress": False}
FAMS = list(FAMILIES)
#: Parameters of the methods that need some; every other method runs on its defaults.
PARAMS = {"task_arithmetic": {"lambda": 0.5}, "ties": {"density": 0.5}, "dare_linear": {"density": 0.5},
          "dare_ties": {"density": 0.5}, "breadcrumbs": {"density": 0.8, "gamma": 0.1},
          "breadcrumbs_ties": {"density": 0.8, "gamma": 0.1}, "della": {"density": 0.5, "epsilon": 0.1},
          "della_linear": {"density": 0.5, "epsilon": 0.1}, "ota": {"epsilon": 1e-26}, "slerp": {"t": 0.3},
          "nuslerp": {"weight": [0.4, 0.6]}}


def _live(d, which: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(d.parent / which))


def _open(d) -> tuple[cl.Moments, list]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = cl.Moments.open(d)
    return m, [str(w.message) for w in caught]


_EXPERTS: dict = {}


def _experts(families, fam: str) -> cl.Experts:
    if fam not in _EXPERTS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the untrained buffers' warning: checked below
            _EXPERTS[fam] = cl.Experts.from_dirs(families[fam]["base"], list(families[fam]["experts"].values()),
                                                 names=list(families[fam]["experts"]))
    return _EXPERTS[fam]


@pytest.mark.parametrize("fam", FAMS)
def test_moments_equal_the_live_optimizers_bitwise_by_saved_name(families, fam):
    for e, d in families[fam]["experts"].items():
        m, caught = _open(d)
        ckpt = cl.Checkpoint.open(d)
        live, live_saved = _live(d, LIVE), _live(d, LIVE_SAVED)
        floating = [n for n in ckpt.keys() if ckpt.dtype(n).is_floating_point]
        assert sorted(m) == sorted(floating), (fam, e)
        assert m.shape_problems(ckpt) == []
        for n in floating:
            if n in live_saved:
                assert torch.equal(m[n], live_saved[n]), (fam, e, n)
                if n in live:  # a name kept as in memory
                    assert torch.equal(m[n], live[n]), (fam, e, n)
            else:  # a buffer: no optimizer state; untrained, zero moment, named in a warning
                assert n in m.untrained and torch.equal(m[n], torch.zeros(ckpt.shape(n))), (fam, e, n)
        assert set(m.untrained) == set(floating) - set(live_saved)
        if m.untrained:
            assert any("no optimizer state" in w and m.untrained[0] in w for w in caught), caught
        # where the names came from: the declared class's order (in the Trainer's two groups,
        # where they differ from it), saved through transformers' conversion mapping exactly
        # when the names differ
        src = m.source
        assert src.names.startswith(f"{FAMILIES[fam].model} parameter order")
        renamed = set(live) - set(live_saved)  # names save_pretrained changes
        assert ("conversion mapping" in src.names) == bool(renamed), src.names
        assert ("fused" in src.names) == any(live[n].dim() == 3 for n in renamed), src.names
        assert (m.step, m.beta2, src.betas, src.dtypes) == (EXPERTS[e]["max_steps"], 0.999, (0.9, 0.999),
                                                              ("float32",))


def test_the_tier_covers_renamed_fused_tied_and_untrained_tensors(families):
    """The classes the tier exists for, each in at least one family."""
    seen = {"renamed": set(), "fused": set(), "untrained": set(), "tied": set()}
    for fam in FAMS:
        d = families[fam]["experts"]["a"]
        live, ckpt = _live(d, LIVE), cl.Checkpoint.open(d)
        renamed = set(live) - set(_live(d, LIVE_SAVED))
        if renamed:
            seen["renamed"].add(fam)
        if any(live[n].dim() == 3 for n in renamed):
            seen["fused"].add(fam)
        if set(ckpt.keys()) - set(_live(d, LIVE_SAVED)):
            seen["untrained"].add(fam)
        arch = next(x for x in architecture_orders(d)[0] if x.name == FAMILIES[fam].model)
        if arch.layouts[0].aliases:  # a second name for a parameter (tied embeddings)
            seen["tied"].add(fam)
    assert {"mixtral", "qwen2_moe"} <= seen["fused"] and {"vit", "swin", "gpt_neox"} <= seen["renamed"]
    assert {"bart", "marian"} <= seen["untrained"] and {"gpt2", "gemma", "t5"} <= seen["tied"]
    kinds = {FAMILIES[f].kind for f in FAMS}
    assert kinds == {"decoder-only", "encoder-only", "encoder-decoder", "vision", "speech"} and len(FAMS) >= 15


@pytest.mark.parametrize("fam", FAMS)
def test_moments_are_split_as_transformers_splits_the_weights(families, fam):
    """The layout that matched, applied to the weights in memory (as
    ``from_pretrained`` builds them), gives the saved weights bit for bit."""
    d = families[fam]["experts"]["a"]
    m, _ = _open(d)
    arch = next(a for a in architecture_orders(d)[0] if a.name == FAMILIES[fam].model)
    layout = next(lay for lay in arch.layouts if m.source.names.endswith(lay.label))
    model = model_class(fam).from_pretrained(d)
    in_memory = dict(model.named_parameters())
    ckpt = cl.Checkpoint.open(d)
    read = layout.reader(lambda n: in_memory[n].detach(), "weights")
    for name in layout.shapes:
        assert torch.equal(read(name), ckpt[name]), (fam, name)


@pytest.mark.parametrize("fam", FAMS)
def test_every_analysis_runs(families, fam):
    ex = _experts(families, fam)
    names = ex.tensor_names(floating_only=True)
    stats = cl.curvature_stats(ex, **KW)
    assert sorted(set(stats["name"])) == sorted(names) and set(stats["expert"]) == {"a", "b"}
    overlap = cl.curvature_overlap(ex, **KW)
    assert sorted(set(overlap["name"])) == sorted(names)
    assert overlap["cosine"].dropna().between(-1e-6, 1 + 1e-6).all()
    masks = cl.mask_stats(ex, densities=[0.3], **KW)
    assert set(masks["criterion"]) == {"fisher", "magnitude"} and masks["kept_frac"].notna().any()
    inter = cl.interference(ex, **KW)
    assert sorted(set(inter["name"])) == sorted(names)
    edits = cl.edit_norms(ex, **KW)
    assert (edits.groupby("expert")["delta_sq"].sum() > 0).all()
    hist = cl.log10_histogram(ex, **KW)
    assert hist["count"].sum() > 0
    levels = cl.moment_levels(ex, **KW)
    assert (levels["mean_v"] > 0).all()
    # the one pass that feeds them all gives each frame exactly
    fused = cl.analyze(ex, densities=[0.3], **KW)
    singles = {"curvature_stats": stats, "curvature_overlap": overlap, "mask_stats": masks, "interference": inter,
               "edit_norms": edits, "log10_histogram": hist, "moment_levels": levels,
               "mask_overlap": cl.mask_overlap(ex, 0.3, **KW)}
    assert set(fused) == set(singles)
    for key, df in singles.items():
        pd.testing.assert_frame_equal(fused[key], df, check_exact=True, obj=f"{fam}: {key}")
    # an untrained buffer reads as a zero moment, and the edit there is zero
    for n in set(ex["a"].moments.untrained):
        row = stats[(stats["name"] == n)]
        assert (row["frac_zero"] == 1.0).all()


def _two_expert_methods() -> list[str]:
    return [m for m in cl.list_methods()["method"]
            if get_method(m).allows_base and get_method(m).min_experts <= 2
            and (get_method(m).max_experts is None or get_method(m).max_experts >= 2)]


def _one_expert_methods() -> list[str]:
    return [m for m in cl.list_methods()["method"] if get_method(m).max_experts == 1 and get_method(m).needs_base]


@pytest.mark.parametrize("fam", FAMS)
def test_every_two_expert_method_merges(families, fam):
    ex = _experts(families, fam)
    ref = ex.reference
    untrained = set(ex["a"].moments.untrained)
    runs = {m: (ex, PARAMS.get(m, {})) for m in _two_expert_methods()}
    runs["ota+ffg"] = (ex, {"epsilon": 1e-26, "ffg_density": 0.3, "fallback_to_base": True, "_method": "ota"})
    # the methods that take one expert over the base (slerp, arcee_fusion): two models
    runs.update({m: (ex.subset(["b"]), PARAMS.get(m, {})) for m in _one_expert_methods()})
    assert len(runs) >= 17
    for label, (experts, params) in runs.items():
        params = dict(params)
        method = params.pop("_method", label)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # level warnings: tests/passes/test_preflight.py
            res = cl.merge(experts, method, **KW, **params)
        got = res.checkpoint
        assert sorted(got.keys()) == sorted(ref.keys()), label
        for n in ref.keys():
            t = got[n]
            assert t.shape == ref.shape(n) and t.dtype == ref.dtype(n), (label, n)
            assert not t.is_floating_point() or bool(torch.isfinite(t).all()), (label, n)
        src = res.report.set_index("name")["source"]
        for n in untrained:  # a buffer no optimizer trained comes from the base
            assert src[n] == "base" and torch.equal(got[n], ex.base[n]), (label, n)
        if label == "linear":  # the exact average, bit for bit
            a, b = ex["a"].checkpoint, ex["b"].checkpoint
            for n in ref.keys():
                if n not in untrained and ref.dtype(n).is_floating_point:
                    assert torch.equal(got[n], (a[n].float() + b[n].float()) / 2), n


@pytest.mark.parametrize("fam", FAMS)
def test_one_read_ffg_merges_hand_out_the_ties_as_two_reads_do(families, fam):
    """At densities that reach the entries scored 0 (untrained tensors, zero
    moments), the one-read selection keeps tied entries in model order as the
    merge meets them: the same bits as the two-read selection's per-tensor quotas."""
    ex = _experts(families, fam)
    params = {"epsilon": 1e-26, "fallback_to_base": True}
    for density in (0.3, 0.99):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            two = cl.merge(ex, "ota", selection="exact", ffg_density=density, **KW, **params)
            one = cl.merge(ex, "ota", selection="scout", ffg_density=density, **KW, **params)
        for n in ex.tensor_names():
            assert torch.equal(one.checkpoint[n], two.checkpoint[n]), (fam, density, n)
        pd.testing.assert_frame_equal(one.thresholds, two.thresholds)


@pytest.mark.parametrize("fam", FAMS)
def test_merged_dir_loads_with_the_family_class_and_runs(families, fam, tmp_path):
    from transformers.core_model_loading import revert_weight_conversion

    ex = _experts(families, fam)
    batch = sample_batch(fam, config_of(fam))
    for label, method, params in [("linear", "linear", {}),
                                  ("ota-ffg", "ota", {"epsilon": 1e-26, "ffg_density": 0.3, "fallback_to_base": True})]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = cl.merge(ex, method, tmp_path / label, **KW, **params)
        model, info = model_class(fam).from_pretrained(tmp_path / label, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
        # what the model holds, saved back as transformers saves it, is the merge
        saved = revert_weight_conversion(model, model.state_dict())
        for n in res.checkpoint.keys():
            assert torch.equal(saved[n], res.checkpoint[n]), (label, n)
        with torch.no_grad():
            out = model.eval()(**batch)
        logits = out.logits if hasattr(out, "logits") else out[0]
        assert logits.numel() and bool(torch.isfinite(logits).all()), label
        assert not math.isnan(float(logits.float().abs().sum()))


@pytest.mark.parametrize("fam", FAMS)
def test_c_merge_kernels_give_the_torch_bits_on_real_trainer_outputs(families, fam, monkeypatch):
    """OTA+FFG and TIES through the driver on what a real Trainer wrote (every
    family's layouts, conv and fused tensors, untrained buffers): the C kernels
    run, and the merged tensors and reports equal the torch code's bit for bit."""
    from curvlens.math import native
    from curvlens.math.native import merges as native_merges

    if native.lib() is None:
        pytest.skip(f"no C kernels: {native.reason()}")
    ex = _experts(families, fam)
    calls = []
    for name in ("ota_merge", "ties_merge"):
        real = getattr(native_merges, name)
        monkeypatch.setattr(f"curvlens.math.methods.native_paths.{name}",
                            lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    for method, kw in (("ota", dict(ffg_density=0.3, fallback_to_base=True)), ("ties", dict(density=0.5))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with_c = cl.merge(ex, method, None, device="cpu", progress=False, **kw)
            with monkeypatch.context() as m:
                m.setitem(native._STATE, "lib", None)
                torch_only = cl.merge(ex, method, None, device="cpu", progress=False, **kw)
        for n in with_c.checkpoint.keys():
            a, b = with_c.checkpoint[n], torch_only.checkpoint[n]
            assert a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)), n
        assert with_c.report.equals(torch_only.report), method
    assert calls  # the kernels did run


@pytest.mark.parametrize("fam", FAMS)
def test_mask_ranks_and_selections_are_the_same_from_one_thread_or_two(families, fam, monkeypatch):
    """On what a real Trainer wrote (conv, fused, tied and 1-D tensors), the mask
    statistics whose singular values and selection sweeps run on a second thread
    equal those of one thread, on both rank paths."""
    from curvlens import runtime as background

    ex = _experts(families, fam)
    monkeypatch.setattr(background, "_cores", lambda: 2)
    for exact in (None, 0):  # the default split of exact and randomized ranks; randomized only
        two = cl.mask_stats(ex, densities=[0.1, 0.3], rank_exact_max=exact, **KW)
        with monkeypatch.context() as m:
            m.setenv("CURVLENS_BACKGROUND", "0")
            one = cl.mask_stats(ex, densities=[0.1, 0.3], rank_exact_max=exact, **KW)
        pd.testing.assert_frame_equal(two, one, check_exact=True)
        assert two["mask_rank"].notna().any() or two["mask_rank_at_least"].notna().any()
