"""mergekit's passthrough ``slices``: layer ranges stacked, layers renamed, the new
layer count in config.json; compared with mergekit's own merge where installed."""
import json

import pytest
import torch
import yaml

from curvlens import Checkpoint, CurvlensError
from curvlens.cli import main
from curvlens.config.merge_config import load_merge_config
from tests.passes.mergekit_zoo import MERGEKIT_MISSING, make_llama_zoo, run_mergekit


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-stack")
    base, dirs, weights = make_llama_zoo(root, n_experts=2, layers=5)
    return root, base, dirs, weights


def _stack(dirs, **extra):
    # the shape of mergekit's examples/orcamini-platy-44layer.yml
    return {"slices": [{"sources": [{"model": str(dirs[0]), "layer_range": [0, 3]}]},
                       {"sources": [{"model": str(dirs[1]), "layer_range": [1, 5]}]}],
            "merge_method": "passthrough", "dtype": "float32", **extra}


def _cli(tmp_path, cfg, out="o"):
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(tmp_path / "c.yml"), str(tmp_path / out), "--quiet"]) == 0
    return Checkpoint.open(tmp_path / out)


def test_layers_are_stacked_and_renamed(llama, tmp_path):
    root, base, dirs, w = llama
    got = _cli(tmp_path, _stack(dirs))
    e0, e1 = w["expert0"], w["expert1"]
    assert torch.equal(got["model.embed_tokens.weight"], e0["model.embed_tokens.weight"])  # first slice
    assert torch.equal(got["lm_head.weight"], e1["lm_head.weight"])  # last slice
    assert torch.equal(got["model.norm.weight"], e1["model.norm.weight"])
    assert torch.equal(got["model.layers.2.mlp.up_proj.weight"], e0["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.3.mlp.up_proj.weight"], e1["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(got["model.layers.6.self_attn.q_proj.weight"], e1["model.layers.4.self_attn.q_proj.weight"])
    assert {n for n in got if ".layers.7." in n} == set()
    assert json.loads((tmp_path / "o" / "config.json").read_text())["num_hidden_layers"] == 7
    # written by the merge driver like any merge: its report says where each tensor came from
    import pandas as pd

    report = pd.read_csv(tmp_path / "o" / "merge_report.csv").set_index("name")
    assert set(report.index) == set(got) and len(report) == len(got)
    assert report.loc["model.embed_tokens.weight", "source"] == dirs[0].name
    assert report.loc["model.layers.3.mlp.up_proj.weight", "source"] == dirs[1].name
    assert report.loc["lm_head.weight", "source"] == dirs[1].name


def test_stack_with_scale_matches_mergekit(llama, tmp_path):
    pytest.importorskip("mergekit", reason=MERGEKIT_MISSING)
    root, base, dirs, w = llama
    cfg = _stack(dirs, parameters={"scale": [{"filter": "o_proj", "value": [0.5, 1.5]},
                                             {"filter": "down_proj", "value": 2.0}, {"value": 1.0}]})
    cfg["slices"][1]["sources"][0]["parameters"] = {"scale": [{"filter": "mlp", "value": 0.25}]}
    got = _cli(tmp_path, cfg)
    want = run_mergekit(cfg, tmp_path / "mk")
    assert set(got) == set(want)
    for n, t in want.items():
        assert torch.equal(got[n], t), n
    mk_cfg = json.loads((tmp_path / "mk" / "config.json").read_text())
    assert json.loads((tmp_path / "o" / "config.json").read_text())["num_hidden_layers"] == \
        mk_cfg["num_hidden_layers"] == 7


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(merge_method="linear"), "a merge per layer range"),
    (lambda c: c.update(merge_method="linear", slices=[{"sources": [
        {"model": s["model"], "layer_range": [0, 4]} for s in (c["slices"][0]["sources"][0],
                                                               c["slices"][1]["sources"][0])]}]),
     r"layer_range is \[0, 4\], the model has \[0, 5\]"),
    (lambda c: c["slices"][0]["sources"].append(dict(c["slices"][0]["sources"][0])), "exactly one source"),
    (lambda c: c["slices"][0].update(base_model="x"), "per-slice base model"),
    (lambda c: c["slices"][0]["sources"][0].update(layer_range=[3, 2]), "0 <= START < END"),
    (lambda c: c["slices"][1]["sources"][0].update(layer_range=[3, 9]), r"no layer\(s\) \[5, 6, 7, 8\]"),
    (lambda c: c.update(parameters={"weight": 1}), r"unknown parameter\(s\) \['weight'\]"),
    (lambda c: c["slices"][0].update(foo=1), r"unknown key\(s\) \['foo'\]"),
    (lambda c: c.update(tokenizer_source="base"), "not supported with 'slices'"),
])
def test_slice_errors(llama, tmp_path, edit, match):
    root, base, dirs, _ = llama
    cfg = _stack(dirs)
    edit(cfg)
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(CurvlensError, match=match):
        mc = load_merge_config(tmp_path / "c.yml")
        mc.stack.run(tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def _one_slice(llama, tmp_path):
    # the shape of mergekit's examples/gradient-slerp.yml, with a method curvlens has
    root, base, dirs, w = llama
    cfg = {"slices": [{"sources": [{"model": str(d), "layer_range": [0, 5],
                                    "parameters": {"weight": [1, 0] if i == 0 else [0, 1]}}
                                   for i, d in enumerate(dirs)],
                       "parameters": {"normalize": True}}],
           "merge_method": "linear", "base_model": str(base), "dtype": "float32"}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    mc = load_merge_config(tmp_path / "c.yml")
    from curvlens.config.merge import merge

    return cfg, mc, merge(mc.experts(), mc.method, device="cpu", progress=False, **mc.merge_kwargs())


def test_one_slice_over_all_layers_is_the_models_form(llama, tmp_path):
    w = llama[3]
    _, mc, res = _one_slice(llama, tmp_path)
    assert mc.names == ("expert0", "expert1")  # slices never add the base (mergekit adds it only for models)
    n = "model.layers.4.mlp.up_proj.weight"
    assert torch.equal(res.checkpoint[n], w["expert1"][n])


def test_one_slice_over_all_layers_matches_mergekit(llama, tmp_path):
    pytest.importorskip("mergekit", reason=MERGEKIT_MISSING)
    cfg, _, res = _one_slice(llama, tmp_path)
    for name, t in run_mergekit(cfg, tmp_path / "mk").items():
        assert torch.equal(res.checkpoint[name], t), name
