"""mergekit's ``passthrough`` with ``models``: its one model, each tensor times its
``scale`` (a constant, a gradient over the layers or ``{filter, value}``
conditions; the way to zero a module), as mergekit 0.1.5 writes it."""
import pytest
import torch
import yaml

from curvlens import CurvlensError
from curvlens.config.merge import merge
from curvlens.config.merge_config import load_merge_config
from tests.passes.mergekit_zoo import MERGEKIT_MISSING, make_llama_zoo, run_mergekit

O_PROJ, UP0, UP1, EMB = ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.up_proj.weight",
                         "model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight")
ZERO_O = {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("passthrough")
    base, dirs, weights = make_llama_zoo(root, n_experts=2, layers=2)
    return root, base, dirs, weights


def _cfg(dirs, params=None, dtype="float32", **top):
    model = {"model": str(dirs[0]), **({"parameters": params} if params else {})}
    return {"merge_method": "passthrough", "models": [model], "dtype": dtype, **top}


CASES = {  # name -> (config from (base, dirs), what it must give for (name, expert tensor))
    "zero a module": (lambda b, d: _cfg(d, ZERO_O), lambda n, x: x * 0 if "o_proj" in n else x),
    "no scale": (lambda b, d: _cfg(d), lambda n, x: x),
    "the base listed as the model": (lambda b, d: _cfg(d, ZERO_O, base_model=str(d[0])),
                                     lambda n, x: x * 0 if "o_proj" in n else x),
    "top-level scale": (lambda b, d: _cfg(d, parameters={"scale": 0.5}), lambda n, x: x * 0.5),
    # a gradient over 2 layers: layer 0 at t = 0, layer 1 at t = 1, tensors outside the layers at t = 0
    "gradient": (lambda b, d: _cfg(d, {"scale": [0, 1]}), lambda n, x: x if ".layers.1." in n else x * 0),
    "a filter with no fallback": (lambda b, d: _cfg(d, {"scale": [{"filter": "o_proj", "value": 0.0}]}),
                                  lambda n, x: x * 0 if "o_proj" in n else x),
    "bf16": (lambda b, d: _cfg(d, {"scale": [{"filter": "mlp", "value": 0.37}, {"value": -1.5}]}, "bfloat16"),
             lambda n, x: (x.to(torch.bfloat16).float() * (0.37 if "mlp" in n else -1.5)).to(torch.bfloat16)),
    "fp16 in, fp32 out": (lambda b, d: _cfg(d, {"scale": 0.3}, "float16", out_dtype="float32"),
                          lambda n, x: (x.half().float() * 0.3).half().float()),
}


def _run(tmp_path, cfg):
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    mc = load_merge_config(tmp_path / "c.yml")
    return merge(mc.experts(), mc.method, device="cpu", progress=False, **mc.merge_kwargs())


@pytest.mark.parametrize("case", CASES)
def test_passthrough_models_copies_the_model_scaled(llama, tmp_path, case):
    root, base, dirs, weights = llama
    make, want = CASES[case]
    res = _run(tmp_path, make(base, dirs))
    assert set(res.checkpoint) == set(weights["expert0"])
    for name, x in weights["expert0"].items():
        assert torch.equal(res.checkpoint[name], want(name, x)), name


@pytest.mark.parametrize("case", CASES)
def test_passthrough_models_matches_mergekit_bit_for_bit(llama, tmp_path, case):
    pytest.importorskip("mergekit", reason=MERGEKIT_MISSING)
    root, base, dirs, _ = llama
    cfg = CASES[case][0](base, dirs)
    res = _run(tmp_path, cfg)
    for name, t in run_mergekit(cfg, tmp_path / "mk").items():
        got = res.checkpoint[name]
        assert got.dtype == t.dtype and torch.equal(got, t), name


@pytest.mark.parametrize("edit, match", [
    (lambda c, b, d: c["models"].append({"model": str(d[1])}), r"takes at most 1 model\(s\); got 2$"),
    (lambda c, b, d: c.update(base_model=str(b)), r"got 2 \(mergekit counts an unlisted base_model as one more\)"),
])
def test_what_mergekit_refuses_is_refused(llama, tmp_path, edit, match):
    root, base, dirs, _ = llama
    cfg = _cfg(dirs, ZERO_O)
    edit(cfg, base, dirs)
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CurvlensError, match=match):
        load_merge_config(tmp_path / "c.yml")


def test_a_weight_is_ignored_with_a_note_as_mergekit_ignores_it(llama, tmp_path):
    root, base, dirs, weights = llama
    (tmp_path / "c.yml").write_text(yaml.safe_dump(_cfg(dirs, {"weight": 2.0})))
    mc = load_merge_config(tmp_path / "c.yml")
    assert any("passthrough has no weight; ignored" in n for n in mc.notes)
    res = merge(mc.experts(), mc.method, device="cpu", progress=False, **mc.merge_kwargs())
    assert all(torch.equal(res.checkpoint[n], x) for n, x in weights["expert0"].items())
