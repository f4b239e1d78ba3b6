"""``inspect``: what each dir holds, told from headers only (no tensor data read)."""
from __future__ import annotations

import shutil

import pandas as pd
import pytest
import torch

import curvlens as cl
from curvlens.cli import main
from curvlens.io import checkpoint as checkpoint_mod
from curvlens.io.moments import Moments
from tests.conftest import make_tiny_zoo


@pytest.fixture
def no_data_read(monkeypatch):
    """Any read of tensor data fails the test."""
    def boom(*args, **kwargs):
        raise AssertionError("inspect read tensor data")

    monkeypatch.setattr(checkpoint_mod, "read_safetensor", boom)
    monkeypatch.setattr(cl.Checkpoint, "__getitem__", boom)
    monkeypatch.setattr(Moments, "__getitem__", boom)


def test_the_paper_layout_and_a_plain_model(tmp_path, no_data_read):
    base, dirs, weights, _ = make_tiny_zoo(tmp_path, n_experts=1)
    df = cl.inspect([dirs[0], base, dirs[0] / "export" / "exp_avg_sq.safetensors"])
    expert, plain, file = (r for r in df.to_dict("records"))
    n = len(weights["expert0"])
    assert expert["tensors"] == n and expert["params"] == sum(t.numel() for t in weights["expert0"].values())
    assert expert["weights_format"].startswith("safetensors") and expert["weight_dtypes"] == "float32"
    assert expert["moments_format"] == "exported exp_avg_sq (safetensors)" and expert["moments"] == n
    assert expert["names_from"] == "keys are parameter names" and expert["moment_dtypes"] == "float32"
    assert plain["tensors"] == n and pd.isna(plain["moments_format"]) and "no second moments found" in plain["note"]
    # a moments file is moments, not a model
    assert pd.isna(file["tensors"]) and file["moments"] == n and pd.isna(file["note"])


def test_a_trainer_run_dir_lists_its_checkpoints_and_how_names_were_mapped(tmp_path, no_data_read):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.99))
    for step in (1, 2):
        model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
        opt.step()
        d = tmp_path / "run" / f"checkpoint-{step}"
        model.save_pretrained(d)
        torch.save(opt.state_dict(), d / "optimizer.pt")
    (tmp_path / "run" / "checkpoint-10").symlink_to(tmp_path.parent, target_is_directory=True)  # leads out
    df = cl.inspect(tmp_path / "run")
    assert [p.rsplit("/", 1)[1] for p in df["path"]] == ["checkpoint-1", "checkpoint-2", "checkpoint-10"]
    ok = df.iloc[:2]
    assert ok["step"].tolist() == [1, 2] and (ok["beta1"] == 0.8).all() and (ok["beta2"] == 0.99).all()
    assert (ok["architectures"] == "LlamaForCausalLM").all() and (ok["model_type"] == "llama").all()
    assert ok["names_from"].str.startswith("LlamaForCausalLM parameter order; saved names: saved as in memory").all()
    assert ok["moments_format"].eq("torch.optim state dict (optimizer.pt)").all() and ok["note"].isna().all()
    assert "outside" in df["note"].iloc[2]


def test_the_cli_prints_each_path_and_fails_on_an_unreadable_one(tmp_path, capsys):
    base, dirs, _, _ = make_tiny_zoo(tmp_path, n_experts=1)
    assert main(["inspect", str(dirs[0])]) == 0
    out = capsys.readouterr().out
    assert f"== {dirs[0]}" in out and "exported exp_avg_sq (safetensors)" in out
    assert main(["inspect", str(dirs[0]), str(tmp_path / "missing")]) == 2
    captured = capsys.readouterr()
    assert "no such file or directory" in captured.err and captured.err.count("\n") == 1


def test_moments_that_do_not_line_up_are_noted(tmp_path):
    base, dirs, _, _ = make_tiny_zoo(tmp_path, n_experts=1)
    other = tmp_path / "other"
    shutil.copytree(dirs[0], other)
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(other / "export" / "exp_avg_sq.safetensors"))
    (row,) = cl.inspect(other).to_dict("records")
    assert row["moments"] == 1 and "do not line up" in row["note"]
