import json

import pytest
import torch
from safetensors.torch import save_file

from curvlens import Checkpoint, CurvlensError
from curvlens.io.writer import write_model
from tests.conftest import tiny_llama_shapes


@pytest.fixture
def state():
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in tiny_llama_shapes().items()}


def assert_same(ckpt, state):
    assert set(ckpt.keys()) == set(state)
    for k, v in state.items():
        assert ckpt.shape(k) == v.shape
        assert ckpt.dtype(k) == v.dtype
        assert torch.equal(ckpt[k], v)


def test_sharded_safetensors_dir(tmp_path, state):
    d = write_model(state, tmp_path / "m", max_shard_size=500)
    shards = sorted(p.name for p in d.glob("*.safetensors"))
    assert len(shards) > 1  # really sharded
    assert_same(Checkpoint.open(d), state)


def test_single_safetensors_dir_and_file(tmp_path, state):
    (tmp_path / "m").mkdir()
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    assert_same(Checkpoint.open(tmp_path / "m"), state)
    assert_same(Checkpoint.open(tmp_path / "m" / "model.safetensors"), state)


def test_bin_single_and_sharded(tmp_path, state):
    d = tmp_path / "bin"
    d.mkdir()
    torch.save(state, d / "pytorch_model.bin")
    assert_same(Checkpoint.open(d), state)
    names = list(state)
    half = len(names) // 2
    s = tmp_path / "sharded"
    s.mkdir()
    parts = {"pytorch_model-00001-of-00002.bin": names[:half], "pytorch_model-00002-of-00002.bin": names[half:]}
    for fname, keys in parts.items():
        torch.save({k: state[k] for k in keys}, s / fname)
    wmap = {k: f for f, keys in parts.items() for k in keys}
    (s / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wmap}))
    assert_same(Checkpoint.open(s), state)


def test_pt_file_and_state_dict_wrapper(tmp_path, state):
    torch.save({"state_dict": state}, tmp_path / "w.pt")
    assert_same(Checkpoint.open(tmp_path / "w.pt"), state)


def test_in_memory_dict(state):
    ckpt = Checkpoint.open(state)
    assert_same(ckpt, state)
    assert Checkpoint.open(ckpt) is ckpt


def test_describe_reads_no_data(tmp_path, state):
    d = write_model(state, tmp_path / "m")
    ckpt = Checkpoint.open(d)
    ckpt._reader = lambda name: pytest.fail(f"describe() read {name}")
    df = ckpt.describe()
    assert list(df.columns) == ["name", "layer", "role", "shape", "dtype", "numel"]
    row = df.set_index("name").loc["model.layers.1.self_attn.k_proj.weight"]
    assert (row["layer"], row["role"], row["shape"], row["dtype"], row["numel"]) == (1, "k", (4, 8), "bfloat16", 32)
    assert df.numel.sum() == ckpt.numel == sum(v.numel() for v in state.values())


def test_missing_path(tmp_path):
    with pytest.raises(CurvlensError, match="no such file"):
        Checkpoint.open(tmp_path / "nope")


def test_dir_without_weights(tmp_path):
    with pytest.raises(CurvlensError, match="no model weights found"):
        Checkpoint.open(tmp_path)


def test_index_names_missing_shard(tmp_path, state):
    d = write_model(state, tmp_path / "m", max_shard_size=500)
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CurvlensError, match=shard.name):
        Checkpoint.open(d)


def test_truncated_safetensors(tmp_path, state):
    f = tmp_path / "w.safetensors"
    save_file(state, str(f))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CurvlensError, match=r"w\.safetensors.*truncated"):
        Checkpoint.open(f)


def test_corrupt_safetensors_header(tmp_path):
    f = tmp_path / "bad.safetensors"
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CurvlensError, match=r"bad\.safetensors.*not a readable safetensors"):
        Checkpoint.open(f)


def test_corrupt_bin(tmp_path):
    f = tmp_path / "pytorch_model.bin"
    f.write_bytes(b"garbage")
    with pytest.raises(CurvlensError, match="pytorch_model.bin"):
        Checkpoint.open(tmp_path)


def test_unknown_tensor_name(state):
    ckpt = Checkpoint.open(state)
    with pytest.raises(CurvlensError, match="no tensor named 'x'"):
        ckpt.shape("x")
    with pytest.raises(KeyError):
        ckpt["x"]
