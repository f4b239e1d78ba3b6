"""mergekit's per-tensor parameter forms (gradients, filter conditions) at both
levels, resolved per tensor by the streaming driver: compared with mergekit's own
resolver and with mergekit's own merges where mergekit is installed."""
import pytest
import torch
import yaml

from curvlens import CurvlensError
from curvlens.config.merge import merge
from curvlens.config.merge_config import load_merge_config
from curvlens.config.param_settings import UNSET, setting_value, layer_fraction
from tests.passes.mergekit_zoo import MERGEKIT_MISSING, make_llama_zoo, run_mergekit

KW = dict(device="cpu", progress=False)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama5")
    base, dirs, weights = make_llama_zoo(root, n_experts=3, layers=5)
    return root, base, dirs, weights


def _ties_yml(base, dirs, dtype):
    # mergekit's examples/ties.yml (not shipped in its wheel), with local models
    return {"models": [
        {"model": str(dirs[0]), "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
        {"model": str(dirs[1]), "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
        {"model": str(dirs[2]), "parameters": {"density": 0.33,
                                               "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]}}],
        "merge_method": "ties", "base_model": str(base), "parameters": {"normalize": True, "int8_mask": True},
        "dtype": dtype}


def _run(root, cfg, name="c.yml"):
    (root / name).write_text(yaml.safe_dump(cfg))
    mc = load_merge_config(root / name)
    return mc, merge(mc.experts(), mc.method, **KW, **mc.merge_kwargs())


def test_setting_value_follows_mergekits_rules():
    assert setting_value([0, 0.3, 0.7, 1], "x", 0.5) == pytest.approx(0.5)
    assert setting_value([1, 0.7, 0.1], "x", 0.25) == pytest.approx(0.85)
    assert setting_value([0, 1], "x", 1.0) == 1
    assert setting_value([True, False], "x", 0.4) is True and setting_value([True, False], "x", 1.0) is False
    conds = [{"filter": "mlp", "value": [0, 1]}, {"filter": "self_attn", "value": 2}]
    assert setting_value(conds, "model.layers.1.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)
    assert setting_value(conds, "model.norm.weight", 0.0) is UNSET  # falls through to the next scope
    assert setting_value({"filter": "*", "value": 3}, "anything", 0.0) == 3
    assert layer_fraction("model.layers.2.mlp.up_proj.weight", 5) == 0.5
    assert layer_fraction("model.embed_tokens.weight", 5) == 0.0 == layer_fraction("lm_head.weight", 5)
    assert layer_fraction("model.layers.0.mlp.up_proj.weight", 1) == 1.0


def test_resolution_matches_mergekits_resolver(llama):
    mk_config = pytest.importorskip("mergekit.config", reason=MERGEKIT_MISSING)
    from mergekit.common import ModelReference
    from mergekit.parameter_resolver import resolve_parameter

    root, base, dirs, _ = llama
    cfg = _ties_yml(base, dirs, "float32")
    cfg["parameters"]["density"] = [{"filter": "self_attn", "value": [0.2, 0.9]}, {"value": 0.6}]
    del cfg["models"][1]["parameters"]["density"]  # falls back to the top level
    (root / "r.yml").write_text(yaml.safe_dump(cfg))
    tp = load_merge_config(root / "r.yml").tensor_params
    parsed = mk_config.MergeConfiguration.model_validate(cfg)

    class Spec:
        required, default = False, None

        def __init__(self, name):
            self.name = name

        @staticmethod
        def validate(x):
            return float(x) if x is not None else None

    names = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{s}" for i in range(5) for s in ("self_attn.q_proj.weight", "mlp.up_proj.weight")]
    for name in names:
        t = layer_fraction(name, 5)
        ours = tp(name)
        for key in ("density", "weight"):
            for i, m in enumerate(parsed.models):
                scopes = [m.parameters, parsed.parameters]
                theirs = resolve_parameter(Spec(key), scopes, tensor_name=name, t=t, model=ModelReference.parse(str(dirs[i])))
                assert ours[key][i] == pytest.approx(theirs if theirs is not None else 1.0), (name, key, i)


def test_ties_yml_matches_mergekits_merge_bit_for_bit(llama, tmp_path):
    pytest.importorskip("mergekit", reason=MERGEKIT_MISSING)
    root, base, dirs, _ = llama
    cfg = _ties_yml(base, dirs, "float32")
    want = run_mergekit(cfg, tmp_path / "mk")
    _, res = _run(tmp_path, cfg)
    assert set(want) == set(res.checkpoint)
    for name, t in want.items():
        assert torch.equal(res.checkpoint[name], t), name


def test_ties_yml_in_float16_runs(llama, tmp_path):
    root, base, dirs, _ = llama
    mc, res = _run(tmp_path, _ties_yml(base, dirs, "float16"))
    assert mc.tensor_params is not None and mc.input_dtype == "float16"
    assert {str(res.checkpoint.dtype(n)) for n in res.checkpoint} == {"torch.float16"}


def test_ties_yml_in_float16_is_close_to_mergekit(llama, tmp_path):
    pytest.importorskip("mergekit", reason=MERGEKIT_MISSING)
    root, base, dirs, _ = llama
    cfg = _ties_yml(base, dirs, "float16")
    _, res = _run(tmp_path, cfg)
    want = run_mergekit(cfg, tmp_path / "mk16")
    # mergekit computes in fp16, curvlens in fp32 from the same fp16 inputs: equal up to
    # rounding, except where fp16 sums flip a TIES sign election or a magnitude tie
    far = total = 0
    for name, t in want.items():
        close = torch.isclose(res.checkpoint[name].float(), t.float(), atol=4e-3, rtol=4e-3)
        far, total = far + int((~close).sum()), total + close.numel()
    assert far / total < 0.01


def test_gradients_change_the_merge_per_layer(llama, tmp_path):
    root, base, dirs, weights = llama
    cfg = {"merge_method": "linear", "models": [{"model": str(dirs[0]), "parameters": {"weight": [1, 0]}},
                                                {"model": str(dirs[1]), "parameters": {"weight": [0, 1]}}]}
    _, res = _run(tmp_path, cfg)
    n0, n4 = "model.layers.0.mlp.up_proj.weight", "model.layers.4.mlp.up_proj.weight"
    assert torch.equal(res.checkpoint[n0], weights["expert0"][n0])  # t=0: all expert0
    assert torch.equal(res.checkpoint[n4], weights["expert1"][n4])  # t=1: all expert1
    n2 = "model.layers.2.mlp.up_proj.weight"
    torch.testing.assert_close(res.checkpoint[n2], (weights["expert0"][n2] + weights["expert1"][n2]) / 2)
    emb = "model.embed_tokens.weight"  # outside the layers: t = 0
    assert torch.equal(res.checkpoint[emb], weights["expert0"][emb])


@pytest.mark.parametrize("params, match", [
    ({"weight": [{"filter": "mlp", "value": 1, "extra": 2}]}, r"must be \{filter: SUBSTRING"),
    ({"weight": [1, {"value": 2}]}, "mix of values and conditions"),
    ({"weight": {"value": {"a": 1}}}, "must be a value or a gradient"),
    ({"normalize": [True, False]}, None),  # a shared parameter may vary by layer
])
def test_bad_forms_are_refused(llama, tmp_path, params, match):
    root, base, dirs, _ = llama
    cfg = {"merge_method": "linear", "models": [{"model": str(d)} for d in dirs[:2]], "parameters": params}
    if match is None:
        _run(tmp_path, cfg)
        return
    with pytest.raises(CurvlensError, match=match):
        _run(tmp_path, cfg)


def test_model_wide_density_cannot_vary(llama, tmp_path):
    root, base, dirs, _ = llama
    cfg = {"merge_method": "ota", "base_model": str(base), "models": [{"model": str(d)} for d in dirs[:2]],
           "parameters": {"ffg_density": [0.1, 0.5]}}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CurvlensError, match="model-wide selection"):
        load_merge_config(tmp_path / "c.yml")
