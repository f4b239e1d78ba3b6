"""Round trip as a property: for every registered method, with and without a base,
``cl.merge(...)`` -> the ``curvlens_merge.yml`` it saves -> ``curvlens merge`` gives
the same tensors, bit for bit. And integer buffers: equal ones are carried, ones
the models disagree on are an error unless a ``tensors`` rule says whose to take
(and the report says so)."""
from __future__ import annotations

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from curvlens import Checkpoint, CurvlensError, Experts, merge
from curvlens.cli import main
from curvlens.math.methods.registry import _REGISTRY
from curvlens.config.merge_config import load_merge_config
from tests.robustness.conftest import same_tensors, scratch
from tests.robustness.pools import DRIVER_SET, accepted_values

KW = dict(device="cpu", progress=False)

def _cases():
    out = []
    for m in _REGISTRY.values():
        bases = [True] if m.needs_base else [False] if not m.allows_base else [True, False]
        n = m.min_experts if m.max_experts == m.min_experts else max(2, m.min_experts)
        out += [pytest.param(m.name, b, n, id=f"{m.name}-{'base' if b else 'nobase'}") for b in bases]
    return out


@st.composite
def merges(draw, method: str, n: int, has_base: bool):
    """Parameters (a random subset at non-default values, per-expert lists too), an
    output dtype and a tensors rule."""
    m = _REGISTRY[method]
    params = {}
    if method == "slerp":
        params["t"] = draw(st.sampled_from([0.0, 0.3, 1.0]))
    for spec in m.params:
        if spec.name in DRIVER_SET or spec.name in params:
            continue
        vals = accepted_values(spec)
        if not vals or not draw(st.booleans()):
            continue
        if spec.per_expert and draw(st.booleans()):
            params[spec.name] = [draw(st.sampled_from(vals)) for _ in range(n)]
        else:
            params[spec.name] = draw(st.sampled_from(vals))
    dtype = draw(st.sampled_from([None, "bfloat16"]))
    rules = draw(st.sampled_from([None, "drop", "expert", "base"] if has_base else [None, "drop", "expert"]))
    tensors = None if rules is None else {"model.norm.weight": "expert0" if rules == "expert" else rules}
    return params, dtype, tensors


@pytest.mark.parametrize("method, has_base, n", _cases())
def test_saved_config_reruns_to_the_same_tensors(zoo, method, has_base, n):
    base, dirs, *_ = zoo
    m = _REGISTRY[method]
    ex = Experts.from_dirs(base if has_base else None, dirs[:n], moments=m.needs_moments)
    ran = {"n": 0}

    @settings(max_examples=4, deadline=None)
    @given(case=merges(method, n, has_base))
    def check(case):
        params, dtype, tensors = case
        with scratch() as d:
            try:
                first = merge(ex, method, d / "a", dtype=dtype, tensors=tensors, **KW, **params)
            except CurvlensError as err:
                # only combinations a method refuses by its own rules (named in the message)
                assert any(k in str(err) for k in params), err
                return
            ran["n"] += 1
            saved = d / "a" / "curvlens_merge.yml"
            assert main(["merge", str(saved), str(d / "b"), "--device", "cpu", "--quiet"]) == 0
            assert same_tensors(first.checkpoint, Checkpoint.open(d / "b")) == [], yaml.safe_load(saved.read_text())

    check()
    assert ran["n"] >= 1  # the property was checked on at least one merge that ran


def test_linear_with_a_base_states_that_the_base_is_the_reference(zoo, tmp_path):
    base, dirs, *_ = zoo
    merge(Experts.from_dirs(base, dirs[:2], moments=False), "linear", tmp_path / "a", **KW)
    cfg = yaml.safe_load((tmp_path / "a" / "curvlens_merge.yml").read_text())
    assert cfg["base_model_role"] == "reference" and cfg["base_model"] == str(base)
    mc = load_merge_config(tmp_path / "a" / "curvlens_merge.yml")
    assert mc.models == tuple(d.resolve() for d in dirs[:2]) and mc.base == base.resolve()
    cfg.pop("base_model_role")  # mergekit's meaning: the base averaged as one more model
    assert len(load_merge_config(text=yaml.safe_dump(cfg)).models) == 3


def test_base_model_role_is_checked(zoo, tmp_path):
    base, dirs, *_ = zoo
    cfg = {"merge_method": "ties", "base_model": str(base), "base_model_role": "reference",
           "models": [{"model": str(d)} for d in dirs[:2]]}
    assert load_merge_config(text=yaml.safe_dump(cfg)).base == base.resolve()  # its own role: fine
    for bad, match in (("input", "not valid for ties"), (3, "not valid")):
        with pytest.raises(CurvlensError, match=match):
            load_merge_config(text=yaml.safe_dump({**cfg, "base_model_role": bad}))
    with pytest.raises(CurvlensError, match="without a base_model"):
        load_merge_config(text=yaml.safe_dump({**{k: v for k, v in cfg.items() if k != "base_model"},
                                               "merge_method": "linear"}))


def test_bias_corrected_moments_are_stated(tmp_path):
    from tests.passes.handmade import write_experts

    b, ds = write_experts(tmp_path, {"w": [0.0, 0.0]}, {"a": {"w": [1.0, 2.0]}, "c": {"w": [3.0, 1.0]}},
                          {"a": {"w": [1.0, 2.0]}, "c": {"w": [2.0, 1.0]}})
    for d in ds:  # moments with a step and beta2, so bias correction changes them
        save_file({"w": torch.tensor([1.0, 2.0]) * (1 + (d.name == "c"))}, str(d / "export" / "exp_avg_sq.safetensors"),
                  metadata={"step": "3", "beta2": "0.9"})
    ex = Experts.from_dirs(b, ds, bias_correction=True)
    first = merge(ex, "ota", tmp_path / "o1", power=1.0, **KW)
    cfg = yaml.safe_load((tmp_path / "o1" / "curvlens_merge.yml").read_text())
    assert cfg["parameters"]["bias_correction"] is True
    assert main(["merge", str(tmp_path / "o1" / "curvlens_merge.yml"), str(tmp_path / "o2"), "--device", "cpu",
                 "--quiet"]) == 0
    assert same_tensors(first.checkpoint, Checkpoint.open(tmp_path / "o2")) == []


# ------------------------------------------------------------------ buffers
def _with_buffer(root, values: dict):
    """Models with a float tensor and an int64 buffer ``pos`` (per model)."""
    out = {}
    for name, pos in values.items():
        d = root / name
        d.mkdir()
        save_file({"w": torch.tensor([1.0, 2.0]) * (len(out) + 1), "pos": torch.tensor(pos, dtype=torch.int64)},
                  str(d / "model.safetensors"))
        out[name] = d
    return out


def test_equal_buffers_are_carried_and_differing_ones_refused(tmp_path):
    d = _with_buffer(tmp_path, {"base": [0, 1, 2], "a": [0, 1, 2], "b": [0, 1, 2], "c": [0, 1, 5]})
    res = merge(Experts.from_dirs(d["base"], [d["a"], d["b"]], moments=False), "task_arithmetic", **KW)
    assert torch.equal(res.checkpoint["pos"], torch.tensor([0, 1, 2]))
    for base, experts in ((d["base"], [d["a"], d["c"]]), (None, [d["a"], d["c"]]), (d["c"], [d["a"], d["b"]])):
        ex = Experts.from_dirs(base, experts, moments=False)
        with pytest.raises(CurvlensError, match=r"tensor 'pos' \(int64\) cannot be averaged and the models "
                                                r"disagree on it: .*tensors rule"):
            merge(ex, "linear", tmp_path / "never", **KW)
        assert not (tmp_path / "never").exists()


def test_a_tensors_rule_takes_a_differing_buffer_and_the_report_says_whose(tmp_path):
    d = _with_buffer(tmp_path, {"base": [0, 1, 2], "a": [0, 1, 2], "c": [0, 1, 5]})
    ex = Experts.from_dirs(d["base"], [d["a"], d["c"]], moments=False)
    for rule, want in (("base", [0, 1, 2]), ("c", [0, 1, 5])):
        res = merge(ex, "task_arithmetic", tmp_path / f"out_{rule}", tensors={"name:pos": rule}, **KW)
        assert torch.equal(res.checkpoint["pos"], torch.tensor(want))
        assert res.report.set_index("name").loc["pos", "source"] == rule
        # and the saved config re-runs it
        assert main(["merge", str(tmp_path / f"out_{rule}" / "curvlens_merge.yml"), str(tmp_path / f"rerun_{rule}"),
                     "--device", "cpu", "--quiet"]) == 0
        assert same_tensors(res.checkpoint, Checkpoint.open(tmp_path / f"rerun_{rule}")) == []
