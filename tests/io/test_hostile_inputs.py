"""Checkpoints, indexes and optimizer states written by strangers: every bad one is a
CurvlensError that names the file and entry, nothing outside a model dir is read,
and no checkpoint code ever runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from curvlens import Checkpoint, CurvlensError, Experts, Moments
from curvlens.io.writer import write_model
from tests.io.test_moments import trained

INDEX = "model.safetensors.index.json"


def _model(d: Path, tensors=None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors or {"a": torch.ones(2), "b": torch.zeros(3)}, str(d / "model-00001-of-00001.safetensors"))
    return d


def _index(d: Path, weight_map, name=INDEX) -> None:
    (d / name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


# ------------------------------------------------------------------ containment
@pytest.mark.parametrize("entry", ["../outside/model-00001-of-00001.safetensors", "ABS", "sub/../../outside/"
                                   "model-00001-of-00001.safetensors"])
def test_index_naming_a_file_outside_the_model_dir_is_refused(tmp_path, entry):
    outside = _model(tmp_path / "outside", {"a": torch.full((2,), 7.0)})
    d = tmp_path / "model"
    d.mkdir()
    shard = str(outside / "model-00001-of-00001.safetensors") if entry == "ABS" else entry
    _index(d, {"a": shard})
    with pytest.raises(CurvlensError, match=r"model\.safetensors\.index\.json: entry 'a' names .*(outside|absolute)"):
        Checkpoint.open(d)


def test_bin_index_naming_a_file_outside_is_refused(tmp_path):
    (tmp_path / "outside").mkdir()
    torch.save({"a": torch.ones(2)}, tmp_path / "outside" / "pytorch_model.bin")
    d = tmp_path / "model"
    d.mkdir()
    _index(d, {"a": "../outside/pytorch_model.bin"}, name="pytorch_model.bin.index.json")
    with pytest.raises(CurvlensError, match="pytorch_model.bin.index.json: entry 'a' names .*outside"):
        Checkpoint.open(d)


def test_symlinked_shard_pointing_outside_is_refused(tmp_path):
    outside = _model(tmp_path / "outside")
    d = tmp_path / "model"
    d.mkdir()
    (d / "model-00001-of-00001.safetensors").symlink_to(outside / "model-00001-of-00001.safetensors")
    _index(d, {"a": "model-00001-of-00001.safetensors", "b": "model-00001-of-00001.safetensors"})
    with pytest.raises(CurvlensError, match="resolves outside the model dir"):
        Checkpoint.open(d)
    (d / INDEX).unlink()  # the single-file layout is checked the same way
    (d / "model-00001-of-00001.safetensors").rename(d / "model.safetensors")
    with pytest.raises(CurvlensError, match="resolves outside the model dir"):
        Checkpoint.open(d)


def test_hub_cache_snapshot_symlinks_into_blobs_are_allowed(tmp_path):
    repo = tmp_path / "models--org--name"
    blob = _model(repo / "blobs") / "model-00001-of-00001.safetensors"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(Path("../../blobs") / blob.name)
    assert torch.equal(Checkpoint.open(snap)["a"], torch.ones(2))


def test_moments_and_tokenizer_symlinks_outside_are_refused(tmp_path):
    from curvlens.config.merge import merge

    secret = tmp_path / "secret.json"
    secret.write_text('{"secret": 1}')
    base = write_model({"w": torch.zeros(3)}, tmp_path / "base")
    ex = write_model({"w": torch.ones(3)}, tmp_path / "e")
    (ex / "export").mkdir()
    (ex / "export" / "exp_avg_sq.safetensors").symlink_to(tmp_path / "v.safetensors")
    save_file({"w": torch.ones(3)}, str(tmp_path / "v.safetensors"))
    with pytest.raises(CurvlensError, match="export/exp_avg_sq.safetensors.*outside"):
        Moments.open(ex)
    # a symlinked tokenizer file would be copied into the merged model
    (base / "tokenizer.json").symlink_to(secret)
    experts = Experts.from_dirs(base, [ex], moments=False)
    with pytest.raises(CurvlensError, match="tokenizer.json.*outside"):
        merge(experts, "task_arithmetic", tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- remote code
CUSTOM_CODE = """
import pathlib
pathlib.Path({sentinel!r}).write_text("executed")
"""


@pytest.mark.parametrize("model_type", ["evil_custom", "llama"])
def test_a_config_with_custom_code_is_never_run_nor_asked_about(tmp_path, model_type):
    pytest.importorskip("transformers")
    sentinel = tmp_path / "ran.txt"
    d = tmp_path / "trainer"
    model, opt = trained()
    names = [n for n, _ in model.named_parameters()]
    write_model({n: p.detach() for n, p in model.named_parameters()}, d)
    torch.save(opt.state_dict(), d / "optimizer.pt")
    (d / "modeling_evil.py").write_text(CUSTOM_CODE.format(sentinel=str(sentinel)))
    cfg = {"model_type": model_type, "architectures": ["EvilModel"],
           "auto_map": {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilModel"}}
    if model_type == "llama":
        cfg.update(vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1)
    (d / "config.json").write_text(json.dumps(cfg))
    # In a child with stdin closed-and-answering 'y': a prompt would run the code.
    code = ("import sys\nfrom curvlens import Moments, CurvlensError\n"
            f"try:\n    Moments.open({str(d)!r})\nexcept CurvlensError as e:\n    print('ERR', e)\n")
    r = subprocess.run([sys.executable, "-c", code], input="y\ny\n", capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert not sentinel.exists(), r.stdout + r.stderr
    assert "custom code" not in r.stderr.lower() or "wish" not in r.stderr.lower()
    assert "[y/N]" not in r.stdout + r.stderr
    assert r.stdout.startswith("ERR"), r.stdout + r.stderr
    if model_type == "evil_custom":
        assert "custom code, which curvlens never runs" in r.stdout
    # the explicit order still works, with no architecture at all
    m = Moments.open(d / "optimizer.pt", checkpoint=names)
    assert set(m) == set(names)


# ------------------------------------------------------------- malformed index
@pytest.mark.parametrize("weight_map, match", [
    (["a", "b"], "weight_map"),
    ({"a": 3}, "entry 'a' maps to 3"),
    ({"a": None}, "entry 'a' maps to None"),
    ({}, "'weight_map' is empty"),
    ({"a": ""}, "entry 'a' names ''"),
])
def test_malformed_index(tmp_path, weight_map, match):
    d = _model(tmp_path / "m")
    _index(d, weight_map)
    with pytest.raises(CurvlensError, match=match):
        Checkpoint.open(d)


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"metadata": {}}', '{"weight_map": "x"}'])
def test_index_that_is_not_an_index(tmp_path, text):
    d = _model(tmp_path / "m")
    (d / INDEX).write_text(text)
    with pytest.raises(CurvlensError, match=str(d / INDEX).replace(".", r"\.")):
        Checkpoint.open(d)


def test_tensor_in_two_shards_and_shard_tensor_missing_from_index(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    save_file({"a": torch.ones(2)}, str(d / "s1.safetensors"))
    save_file({"a": torch.ones(2), "b": torch.ones(1)}, str(d / "s2.safetensors"))
    _index(d, {"a": "s1.safetensors", "b": "s2.safetensors"})
    with pytest.raises(CurvlensError, match="tensor 'a' is stored twice"):
        Checkpoint.open(d)
    save_file({"b": torch.ones(1), "c": torch.ones(1)}, str(d / "s2.safetensors"))
    with pytest.raises(CurvlensError, match=r"holds tensor\(s\) the index does not list: \['c'\]"):
        Checkpoint.open(d)


def test_index_listing_a_tensor_twice(tmp_path):
    d = _model(tmp_path / "m")
    (d / INDEX).write_text('{"weight_map": {"a": "model-00001-of-00001.safetensors", '
                           '"a": "model-00001-of-00001.safetensors"}}')
    with pytest.raises(CurvlensError, match="key 'a' appears twice"):
        Checkpoint.open(d)


def test_checkpoint_with_zero_tensors(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    save_file({}, str(d / "model.safetensors"))
    with pytest.raises(CurvlensError, match="holds no tensors"):
        Checkpoint.open(d)
    torch.save({}, tmp_path / "empty.pt")
    with pytest.raises(CurvlensError, match="holds no tensors"):
        Checkpoint.open(tmp_path / "empty.pt")


@pytest.mark.parametrize("obj, match", [
    (torch.ones(3), "expected a state dict of name -> tensor; got a Tensor"),
    ({1: torch.ones(2)}, "not str -> tensor"),
    ({"a": [1, 2]}, "not str -> tensor"),
])
def test_bin_that_is_not_a_state_dict(tmp_path, obj, match):
    torch.save(obj, tmp_path / "pytorch_model.bin")
    with pytest.raises(CurvlensError, match=match):
        Checkpoint.open(tmp_path)


def test_a_source_that_is_not_a_path(tmp_path):
    with pytest.raises(CurvlensError, match="must be a path"):
        Checkpoint.open(3)
    with pytest.raises(CurvlensError, match="must be a path or a mapping"):
        Moments.open(3.5)


# ------------------------------------------------------- optimizer states, moments
def _opt_state():
    _, opt = trained()
    return opt.state_dict()


def _bad_states():
    sd = _opt_state()
    yield "bare tensor", torch.ones(3), "got a Tensor"
    yield "state a tensor", {"state": torch.ones(2), "param_groups": []}, "'state' must map parameters"
    s = _opt_state()
    s["state"][0] = torch.ones(2)
    yield "state entry a tensor", s, "state of parameter 0 must be a dict"
    s = _opt_state()
    s["state"][1]["exp_avg_sq"] = [1.0, 2.0]
    yield "exp_avg_sq not a tensor", s, "'exp_avg_sq' of parameter 1 must be a tensor"
    s = _opt_state()
    s["state"][0]["exp_avg_sq"] = s["state"][0]["exp_avg_sq"].to(torch.int32)
    yield "integer moments", s, "has dtype int32; expected a floating-point tensor"
    s = _opt_state()
    for v in s["state"].values():
        v["step"] = "abc"
    yield "step not a number", s, "'step' of parameter .* must be a whole number"
    s = _opt_state()
    for v in s["state"].values():
        v["step"] = torch.tensor(2.5)
    yield "step not whole", s, "must be a whole number >= 0; got 2.5"
    for b2 in (1.0, 1.5, -0.1):
        s = _opt_state()
        s["param_groups"][0]["betas"] = (0.9, b2)
        yield f"beta2={b2}", s, rf"beta2 must be in \[0, 1\).*got {b2}"
    s = _opt_state()
    s["param_groups"] = "x"
    yield "param_groups not a list", s, "'param_groups' must be a list of dicts"
    s = _opt_state()
    s["param_groups"][0]["params"] = ["a", "b"]
    yield "params not indices", s, r"param_groups\[0\]\['params'\] must be a list of parameter indices"
    yield "empty state", {"state": {}, "param_groups": sd["param_groups"]}, "state is empty.*no exp_avg_sq"
    model, _ = trained()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.l2(model.norm(model.l1(torch.randn(5, 4)))).sum().backward()
    sgd.step()
    yield "SGD state", sgd.state_dict(), r"has no exp_avg_sq \(its entries hold \['momentum_buffer'\]"
    yield "plain dict, non-tensor", {"a": 1.0}, "not str -> tensor"
    yield "plain dict, empty", {}, "empty mapping"


@pytest.mark.parametrize("case", list(_bad_states()), ids=lambda c: c[0])
def test_malformed_optimizer_states(tmp_path, case):
    _, obj, match = case
    model, _ = trained()
    names = [n for n, _ in model.named_parameters()]
    torch.save(obj, tmp_path / "optimizer.pt")
    with pytest.raises(CurvlensError, match=match) as info:
        Moments.open(tmp_path / "optimizer.pt", checkpoint=names)
    assert "optimizer.pt" in str(info.value) or "<in-memory" in str(info.value)
    if isinstance(obj, dict):  # the same from memory
        with pytest.raises(CurvlensError, match=match):
            Moments.open(obj, checkpoint=names)


@pytest.mark.parametrize("meta, match", [
    ({"step": "x"}, "'step' must be a whole number"),
    ({"step": "-3"}, "'step' must be a whole number >= 0"),
    ({"beta2": "1.0"}, r"beta2 must be in \[0, 1\)"),
    ({"beta2": "nope"}, "beta2 must be a number"),
    ({"betas": "[0.9]"}, r"'betas' must be a list \[beta1, beta2\]"),
    ({"betas": "{"}, "'betas' must be a JSON list"),
])
def test_bad_moments_metadata(tmp_path, meta, match):
    save_file({"w": torch.ones(2)}, str(tmp_path / "v.safetensors"), metadata=meta)
    with pytest.raises(CurvlensError, match=match):
        Moments.open(tmp_path / "v.safetensors")


def test_two_moments_for_one_parameter_and_integer_moments(tmp_path):
    save_file({"w": torch.ones(2), "w.exp_avg_sq": torch.ones(2)}, str(tmp_path / "v.safetensors"))
    with pytest.raises(CurvlensError, match="both 'w' and 'w.exp_avg_sq'"):
        Moments.open(tmp_path / "v.safetensors")
    save_file({"w": torch.ones(2, dtype=torch.int64)}, str(tmp_path / "i.safetensors"))
    with pytest.raises(CurvlensError, match="'w' has dtype int64"):
        Moments.open(tmp_path / "i.safetensors")
    save_file({}, str(tmp_path / "e.safetensors"))
    with pytest.raises(CurvlensError, match="holds no tensors"):
        Moments.open(tmp_path / "e.safetensors")
