import json

import pytest
import torch

from curvlens import Checkpoint, CurvlensError
from curvlens.io.writer import ModelWriter, parse_size, write_model


def tensors():
    return {f"layer{i}.weight": torch.full((10, 10), float(i)) for i in range(5)}


def test_sharding_index_and_round_trip(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "config.json").write_text('{"model_type": "llama"}')
    (ref / "tokenizer.json").write_text("{}")
    out = write_model(tensors(), tmp_path / "out", ref, max_shard_size=800, extra_files={"merge.yml": "x: 1"})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]  # 400 B each, 800 B max
    assert index["metadata"]["total_size"] == 5 * 400
    assert (out / "config.json").read_text() == '{"model_type": "llama"}'
    assert (out / "tokenizer.json").exists() and (out / "merge.yml").read_text() == "x: 1"
    ck = Checkpoint.open(out)
    for k, v in tensors().items():
        assert torch.equal(ck[k], v)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_existing_output_refused_then_overwritten(tmp_path):
    out = write_model(tensors(), tmp_path / "out")
    with pytest.raises(CurvlensError, match="already exists; pass overwrite=True"):
        write_model({"x": torch.zeros(1)}, out)
    assert set(Checkpoint.open(out)) == set(tensors())  # untouched
    write_model({"x": torch.zeros(1)}, out, overwrite=True)
    assert set(Checkpoint.open(out)) == {"x"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_crash_mid_write_leaves_nothing(tmp_path):
    def gen():
        yield "a", torch.zeros(100)
        yield "b", torch.zeros(100)
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        write_model(gen(), tmp_path / "out", max_shard_size=300)
    assert list(tmp_path.iterdir()) == []


def test_crash_with_overwrite_keeps_old_output(tmp_path):
    out = write_model(tensors(), tmp_path / "out")

    def gen():
        yield "a", torch.zeros(3)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_model(gen(), out, overwrite=True)
    assert set(Checkpoint.open(out)) == set(tensors())
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_duplicate_name_and_use_outside_with(tmp_path):
    w = ModelWriter(tmp_path / "o")
    with pytest.raises(CurvlensError, match="outside a 'with'"):
        w.add("a", torch.zeros(1))
    with pytest.raises(CurvlensError, match="written twice"):
        with ModelWriter(tmp_path / "o") as w:
            w.add("a", torch.zeros(1))
            w.add("a", torch.zeros(1))
    assert not (tmp_path / "o").exists()


def test_parse_size_rejects_garbage():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20
    with pytest.raises(CurvlensError, match="max_shard_size='lots'"):
        parse_size("lots")


def test_planned_streaming_write_matches_buffered(tmp_path):
    ts = {"a": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "b": torch.tensor(3.5),
          "c": torch.ones(50, dtype=torch.float32), "d": torch.zeros(4, dtype=torch.int64)}
    plan = [(k, v.shape, v.dtype) for k, v in ts.items()]
    out = write_model(ts, tmp_path / "planned", plan=plan, max_shard_size=100)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # 12+4 B | 200 B | 32 B
    ck = Checkpoint.open(out)  # read back by the safetensors library itself
    for k, v in ts.items():
        assert ck.dtype(k) == v.dtype and torch.equal(ck[k], v)


def test_planned_write_checks_order_and_completeness(tmp_path):
    plan = [("a", (2,), torch.float32), ("b", (2,), torch.float32)]
    with pytest.raises(CurvlensError, match="expected tensor 'a' \\(2,\\) torch.float32 next, got 'b'"):
        write_model({"b": torch.zeros(2)}, tmp_path / "o", plan=plan)
    with pytest.raises(CurvlensError, match="1 planned tensor\\(s\\) were never written, starting with 'b'"):
        write_model({"a": torch.zeros(2)}, tmp_path / "o", plan=plan)
    assert list(tmp_path.iterdir()) == []


def test_config_overrides_keep_config_truthful(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "config.json").write_text('{"model_type": "llama", "torch_dtype": "float32"}')
    out = write_model({"a": torch.zeros(2, dtype=torch.bfloat16)}, tmp_path / "o", ref,
                      config_overrides={"torch_dtype": "bfloat16"})
    assert json.loads((out / "config.json").read_text()) == {"model_type": "llama", "torch_dtype": "bfloat16"}
    assert json.loads((ref / "config.json").read_text())["torch_dtype"] == "float32"  # source untouched
