"""Property-based: whatever bytes, JSON, pickled objects or YAML a stranger hands over,
curvlens either reads it or raises a CurvlensError; nothing else escapes."""
import json
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from curvlens import Checkpoint, CurvlensError, Moments
from curvlens.config.merge_config import load_merge_config

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
tensors = st.builds(lambda shape, dt: torch.zeros(shape, dtype=dt),
                    st.lists(st.integers(0, 3), max_size=2).map(tuple),
                    st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.bool]))
objects = st.recursive(st.one_of(scalars, tensors),
                       lambda inner: st.one_of(st.lists(inner, max_size=3),
                                               st.dictionaries(st.one_of(st.text(max_size=10), st.integers(0, 3)),
                                                               inner, max_size=4)),
                       max_leaves=10)


def _either(fn):
    try:
        fn()
    except CurvlensError:
        pass


@SETTINGS
@given(index=json_values)
def test_any_index_json(index):
    d = Path(tempfile.mkdtemp())
    save_file({"a": torch.ones(2)}, str(d / "model-00001-of-00001.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    _either(lambda: Checkpoint.open(d))


@SETTINGS
@given(blob=st.binary(max_size=200), suffix=st.sampled_from([".safetensors", ".bin", ".pt"]))
def test_any_bytes_as_a_checkpoint_or_moments_file(blob, suffix):
    f = Path(tempfile.mkdtemp()) / f"x{suffix}"
    f.write_bytes(blob)
    _either(lambda: Checkpoint.open(f))
    _either(lambda: Moments.open(f, checkpoint=["a"]))


@SETTINGS
@given(obj=objects)
def test_any_pickled_object_as_weights_or_optimizer_state(obj):
    d = Path(tempfile.mkdtemp())
    torch.save(obj, d / "optimizer.pt")
    torch.save(obj, d / "pytorch_model.bin")
    _either(lambda: Checkpoint.open(d))
    _either(lambda: Moments.open(d / "optimizer.pt", checkpoint=["a", "b"]))
    _either(lambda: Moments.open({"state": obj, "param_groups": [{"params": [0, 1]}]}, checkpoint=["a", "b"]))


@SETTINGS
@given(meta=st.dictionaries(st.sampled_from(["step", "beta2", "betas", "format"]), st.text(max_size=10),
                            max_size=3))
def test_any_moments_metadata(meta):
    f = Path(tempfile.mkdtemp()) / "v.safetensors"
    save_file({"w": torch.ones(2)}, str(f), metadata=meta)
    _either(lambda: Moments.open(f, bias_correction=True))


@SETTINGS
@given(cfg=st.dictionaries(st.sampled_from(["merge_method", "base_model", "models", "parameters", "dtype",
                                            "out_dtype", "tokenizer_source"]), json_values, max_size=5),
       model_entries=st.lists(st.dictionaries(st.sampled_from(["model", "parameters"]), json_values, max_size=2),
                              max_size=3))
def test_any_yaml_merge_config(cfg, model_entries):
    if model_entries:
        cfg = {**cfg, "models": model_entries}
    d = Path(tempfile.mkdtemp())
    (d / "c.yml").write_text(yaml.safe_dump(cfg))
    _either(lambda: load_merge_config(d / "c.yml"))


def test_undecodable_config_file(tmp_path):
    (tmp_path / "c.yml").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CurvlensError, match="c.yml"):
        load_merge_config(tmp_path / "c.yml")


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory):
    from tests.conftest import make_tiny_zoo

    return make_tiny_zoo(tmp_path_factory.mktemp("fuzz-zoo"), n_experts=2)


PARAMS = ["weight", "density", "lambda", "normalize", "rescale", "epsilon", "power", "normalise", "ffg_density",
          "fallback_to_base", "rank1_approx", "rank", "scaling_factor", "combine", "seed", "int8_mask",
          "precond_threshold", "bias_correction"]


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(method=st.sampled_from(["linear", "task_arithmetic", "ties", "dare_ties", "fisher", "ota", "nope"]),
       top=st.dictionaries(st.sampled_from(PARAMS), json_values, max_size=3),
       per=st.dictionaries(st.sampled_from(PARAMS), json_values, max_size=2),
       dtype=st.one_of(st.none(), st.sampled_from(["float16", "bfloat16", "float32", "int8"]), json_values))
def test_any_parameters_on_real_models(small_zoo, method, top, per, dtype):
    from curvlens.config.merge import merge

    base, dirs, *_ = small_zoo
    cfg = {"merge_method": method, "base_model": str(base), "parameters": top, "dtype": dtype,
           "models": [{"model": str(dirs[0]), "parameters": per}, {"model": str(dirs[1])}]}
    d = Path(tempfile.mkdtemp())
    (d / "c.yml").write_text(yaml.safe_dump(cfg))

    def run():
        c = load_merge_config(d / "c.yml")
        merge(c.experts(), c.method, dtype=c.dtype, device="cpu", progress=False, **c.params)

    _either(run)
