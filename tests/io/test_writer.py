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
