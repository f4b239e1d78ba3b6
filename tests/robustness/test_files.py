"""Every file the peers' surface reads or writes, against symlinks, traversal and
overwrite: tokenizer files, chat templates and configs are read only inside their
model dir (a template *name* only from the shipped set), and no output of a merge,
soup, sweep, front, sparse soup, stack, Fisher or moments export is, contains or
lies inside an input of its job, with or without overwrite, checked before any
work (nothing is created, no evaluation runs)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from curvlens import Checkpoint, CurvlensError, Experts, TokenizerOptions, merge
from curvlens.cli import main
from curvlens.io.writer import write_tensor_file
from curvlens.studies.fronts import pareto_front
from curvlens.config.merge_config import load_merge_config
from curvlens.studies.soup import greedy_soup
from curvlens.passes.sparse_soup import sparse_soup
from curvlens.studies.sweep import sweep
from tests.conftest import make_tiny_zoo

KW = dict(device="cpu", progress=False)
SECRET = "SECRET-MARKER-7f3a"
VOCAB = {f"t{i}": i for i in range(16)}  # the tiny zoo's 16 embedding rows


def _tokenizer(d: Path, template: str | None = None) -> None:
    (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": VOCAB}, "added_tokens": []}))
    cfg = {"model_max_length": 8, **({"chat_template": template} if template else {})}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))


@pytest.fixture
def models(tmp_path):
    base, dirs, *_ = make_tiny_zoo(tmp_path / "z", n_experts=2)
    for d in [base, *dirs]:
        _tokenizer(d, "{{ messages }} plain")
    secret = tmp_path / "secret"
    secret.mkdir()
    # outside every model dir; valid content, so only containment can refuse it
    (secret / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": VOCAB},
                                                       "added_tokens": [], "note": SECRET}))
    (secret / "tokenizer_config.json").write_text(json.dumps({"chat_template": SECRET + " {{ x }}" * 3}))
    (secret / "chat_template.jinja").write_text(SECRET + " {{ messages }}" * 3)
    (secret / "vocab.json").write_text(json.dumps(VOCAB))
    (secret / "config.json").write_text(json.dumps({"num_hidden_layers": 2, "note": SECRET}))
    return base, dirs, secret


def _no_secret(*paths: Path) -> None:
    for p in paths:
        for f in ([p] if p.is_file() else p.rglob("*") if p.exists() else []):
            if f.is_file() and not f.name.endswith(".safetensors"):
                assert SECRET not in f.read_text(errors="replace"), f


def _link(target: Path, link: Path) -> None:
    if link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to(target)


# ------------------------------------------------------------- reads: containment
@pytest.mark.parametrize("fname, kwargs, where", [
    ("tokenizer.json", {"tokenizer": TokenizerOptions(source="base")}, "base"),
    ("tokenizer.json", {"tokenizer": TokenizerOptions(source="base")}, "expert"),
    ("tokenizer.json", {"tokenizer": TokenizerOptions(source="union")}, "expert"),
    ("tokenizer_config.json", {"tokenizer": TokenizerOptions(chat_template="{{ messages }} a template long enough")}, "base"),
    ("tokenizer_config.json", {}, "base"),  # copied beside the weights
    ("chat_template.jinja", {"tokenizer": TokenizerOptions(chat_template="auto")}, "expert"),
    ("chat_template.jinja", {}, "base"),
    ("tokenizer_config.json", {"tokenizer": TokenizerOptions(chat_template="auto")}, "expert"),
])
def test_a_symlinked_tokenizer_file_pointing_outside_is_refused(models, tmp_path, fname, kwargs, where):
    base, dirs, secret = models
    _link(secret / fname, base / fname if where == "base" else dirs[0] / fname)
    ex = Experts.from_dirs(base, dirs, moments=False)
    with pytest.raises(CurvlensError, match="resolves outside the model dir") as err:
        merge(ex, "task_arithmetic", tmp_path / "o", **KW, **kwargs)
    assert SECRET not in str(err.value)
    assert not (tmp_path / "o").exists()


def test_a_symlinked_vocab_json_and_added_tokens_are_refused(models, tmp_path):
    base, dirs, secret = models
    for d in [base, *dirs]:
        (d / "tokenizer.json").unlink()
        (d / "vocab.json").write_text(json.dumps(VOCAB))
    merge(Experts.from_dirs(base, dirs, moments=False), "task_arithmetic", tmp_path / "ok", tokenizer=TokenizerOptions(source="base"),
          **KW)
    for fname in ("vocab.json", "added_tokens.json"):
        _link(secret / "vocab.json", dirs[1] / fname)
        with pytest.raises(CurvlensError, match="resolves outside"):
            merge(Experts.from_dirs(base, dirs, moments=False), "task_arithmetic", tmp_path / "o",
                  tokenizer=TokenizerOptions(source="base"), **KW)
        (dirs[1] / fname).unlink()
        (dirs[1] / "vocab.json").write_text(json.dumps(VOCAB))


def test_a_symlinked_tokenizer_json_is_never_copied_into_the_output(models, tmp_path):
    base, dirs, secret = models
    _link(secret / "tokenizer.json", base / "tokenizer.json")
    with pytest.raises(CurvlensError, match="resolves outside"):
        merge(Experts.from_dirs(base, dirs, moments=False), "task_arithmetic", tmp_path / "o", **KW)
    _no_secret(tmp_path / "o")


@pytest.mark.parametrize("name", ["../secret/chat_template", "/etc/hostname", "sub/chatml", "..", "a\\..\\b",
                                  "~/x", "chatml/../../secret/chat_template"])
def test_a_chat_template_name_is_a_name(models, tmp_path, name):
    base, dirs, secret = models
    ex = Experts.from_dirs(base, dirs, moments=False)
    with pytest.raises(CurvlensError, match="is not a template name") as err:
        merge(ex, "task_arithmetic", tmp_path / "o", tokenizer=TokenizerOptions(chat_template=name), **KW)
    assert SECRET not in str(err.value)
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base), "chat_template": name,
           "models": [{"model": str(d)} for d in dirs]}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(tmp_path / "c.yml"), str(tmp_path / "o"), "--quiet", "--device", "cpu"]) == 2
    assert not (tmp_path / "o").exists()


def test_an_unknown_template_name_lists_the_shipped_ones(models, tmp_path):
    base, dirs, _ = models
    with pytest.raises(CurvlensError, match="is not a template curvlens carries; expected one of alpaca, chatml"):
        merge(Experts.from_dirs(base, dirs, moments=False), "task_arithmetic", tmp_path / "o",
              tokenizer=TokenizerOptions(chat_template="no-such-template"), **KW)


def test_a_symlinked_config_json_is_not_read_for_the_layer_count(models, tmp_path):
    base, dirs, secret = models
    _link(secret / "config.json", base / "config.json")
    cfg = {"merge_method": "ties", "base_model": str(base), "models": [{"model": str(d)} for d in dirs],
           "parameters": {"density": [0.5, 1.0]}}  # a gradient needs the number of layers
    with pytest.raises(CurvlensError, match="resolves outside") as err:
        load_merge_config(text=yaml.safe_dump(cfg))
    assert SECRET not in str(err.value)


def test_estimate_fisher_checks_the_model_dir_before_transformers_reads_it(models, tmp_path):
    from curvlens.passes.fisher_estimate import estimate_fisher

    base, dirs, secret = models
    _link(secret / "config.json", dirs[0] / "config.json")
    batch = {"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([[1, 2, 3]])}
    with pytest.raises(CurvlensError, match="resolves outside"):
        estimate_fisher(dirs[0], [batch], tmp_path / "f", **KW)
    assert not (tmp_path / "f").exists()


# -------------------------------------------------------- writes: never onto an input
def test_merge_output_onto_or_into_the_tokenizer_source_is_refused(models, tmp_path):
    base, dirs, _ = models
    src = tmp_path / "tok"
    src.mkdir()
    _tokenizer(src)
    ex = Experts.from_dirs(base, dirs, moments=False)
    for out in (src, src / "inner", tmp_path):
        with pytest.raises(CurvlensError, match="(is|lies inside|contains) the input"):
            merge(ex, "task_arithmetic", out, tokenizer=TokenizerOptions(source=src), overwrite=True, **KW)
    assert sorted(p.name for p in src.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize("how", ["same", "dotdot", "symlink"])
def test_merge_output_naming_an_input_another_way_is_refused(models, tmp_path, how):
    base, dirs, _ = models
    out = {"same": dirs[1], "dotdot": base / ".." / dirs[1].name, "symlink": tmp_path / "link"}[how]
    if how == "symlink":
        out.symlink_to(dirs[1])
    with pytest.raises(CurvlensError, match="the input"):
        merge(Experts.from_dirs(base, dirs, moments=False), "linear", out, overwrite=True, **KW)
    assert Checkpoint.open(dirs[1]).keys()


def test_the_cli_never_writes_over_its_config(models, tmp_path, capsys):
    base, dirs, _ = models
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    cfg = {"merge_method": "linear", "models": [{"model": str(d)} for d in dirs]}
    (conf_dir / "c.yml").write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(conf_dir / "c.yml"), str(conf_dir), "--overwrite", "--quiet", "--device", "cpu"]) == 2
    assert "the input" in capsys.readouterr().err
    assert (conf_dir / "c.yml").is_file()


class _Counting:
    """Scores the merged ``model.norm.weight[0]``; counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, d):
        self.calls += 1
        return {"x": float(Checkpoint.open(d)["model.norm.weight"][0])}


def test_greedy_soup_never_writes_over_an_ingredient_it_tried(models, tmp_path):
    base, dirs, _ = models
    ex = Experts.from_dirs(None, dirs)
    for out in (dirs[0], dirs[1], dirs[1] / "export", tmp_path / "z"):
        ev = _Counting()
        with pytest.raises(CurvlensError, match="the input"):
            greedy_soup(ex, ev, out=out, overwrite=True, progress=False, device="cpu")
        assert ev.calls == 0  # refused before the first evaluation
    assert all((d / "export" / "exp_avg_sq.safetensors").is_file() for d in dirs)


def test_greedy_soup_never_writes_over_the_evaluators_data(models, tmp_path):
    base, dirs, _ = models
    data = tmp_path / "data"
    data.mkdir()

    class WithData(_Counting):
        def input_paths(self):
            return [data]

    for kwargs in ({"out": data}, {"out": data / "soup"}, {"work_dir": data / "w"}):
        ev = WithData()
        with pytest.raises(CurvlensError, match="the input"):
            greedy_soup(Experts.from_dirs(None, dirs, moments=False), ev, overwrite=True, progress=False,
                        device="cpu", **kwargs)
        assert ev.calls == 0
    with pytest.raises(CurvlensError, match="the input"):  # data the caller names
        greedy_soup(Experts.from_dirs(None, dirs, moments=False), _Counting(), out=tmp_path / "d2" / "s",
                    inputs=[tmp_path / "d2"], progress=False, device="cpu")


@pytest.mark.parametrize("out_dir", ["inside", "same", "symlink"])
def test_a_sweep_out_dir_in_an_input_is_refused_and_nothing_is_made(models, tmp_path, out_dir):
    base, dirs, _ = models
    target = {"inside": dirs[0] / "sweep", "same": dirs[0], "symlink": tmp_path / "ln" / "w"}[out_dir]
    if out_dir == "symlink":
        (tmp_path / "ln").symlink_to(dirs[0])
    before = sorted(p.name for p in dirs[0].iterdir())
    ev = _Counting()
    with pytest.raises(CurvlensError, match="the input"):
        sweep(Experts.from_dirs(base, dirs, moments=False), [{"method": "linear"}], ev, out_dir=target,
              progress=False, device="cpu")
    assert ev.calls == 0 and sorted(p.name for p in dirs[0].iterdir()) == before


def test_a_sweep_out_dir_may_contain_the_experts(models, tmp_path):
    """Jobs only add fresh dirs to out_dir: one above the experts replaces nothing."""
    base, dirs, _ = models
    df = sweep(Experts.from_dirs(base, dirs, moments=False), [{"method": "linear"}], _Counting(),
               out_dir=tmp_path, progress=False, device="cpu")
    assert list(df["status"]) == ["ok"]


def test_pareto_front_work_dir_is_checked_before_the_gram_pass(models, tmp_path):
    base, dirs, _ = models
    with pytest.raises(CurvlensError, match="lies inside the input"):
        pareto_front(Experts.from_dirs(base, dirs), _Counting(), predictor="curvature", n_samples=2, n_checks=0,
                     work_dir=base / "w", progress=False, device="cpu")
    assert not (base / "w").exists()


def test_sparse_soup_and_stack_never_write_over_an_input(models, tmp_path):
    base, dirs, _ = models
    ex = Experts.from_dirs(None, dirs, moments=False)
    with pytest.raises(CurvlensError, match="is the input"):
        sparse_soup(ex, dirs[0], overwrite=True, **KW)
    cfg = {"merge_method": "passthrough", "slices": [{"sources": [{"model": str(dirs[0]), "layer_range": [0, 2]}]}]}
    (tmp_path / "s.yml").write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(tmp_path / "s.yml"), str(dirs[0]), "--overwrite", "--quiet"]) == 2
    assert Checkpoint.open(dirs[0]).keys()


def test_estimate_fisher_never_writes_over_the_models_files(models, tmp_path):
    from curvlens.passes.fisher_estimate import estimate_fisher

    base, dirs, _ = models
    shard = sorted(dirs[0].glob("*.safetensors"))[0]
    before = shard.read_bytes()
    batch = {"input_ids": torch.tensor([[1, 2, 3]]), "labels": torch.tensor([[1, 2, 3]])}
    for out in (shard, dirs[0] / "sub" / "f.safetensors", dirs[0] / "config.json"):
        with pytest.raises(CurvlensError, match="(beside the weights|the input|inside the input model dir)"):
            estimate_fisher(dirs[0], [batch], out, overwrite=True, **KW)
    assert shard.read_bytes() == before and not (dirs[0] / "sub").exists()


def test_a_tensor_file_is_never_written_over_an_input_or_a_dir(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(CurvlensError, match="exists and is a dir"):
        write_tensor_file({"w": torch.ones(2)}, tmp_path / "d", overwrite=True)
    (tmp_path / "in.safetensors").write_bytes(b"x")
    with pytest.raises(CurvlensError, match="is the input"):
        write_tensor_file({"w": torch.ones(2)}, tmp_path / "in.safetensors", overwrite=True,
                          inputs=[tmp_path / "in.safetensors"])
    assert (tmp_path / "in.safetensors").read_bytes() == b"x"


def test_a_merge_may_write_beside_single_file_checkpoints(tmp_path):
    """Single-file experts: their dir is not an input, their files are."""
    from safetensors.torch import save_file

    for n, x in (("a", 1.0), ("b", 3.0)):
        save_file({"w": torch.full((2,), x)}, str(tmp_path / f"{n}.safetensors"))
    ex = Experts.from_dirs(None, [tmp_path / "a.safetensors", tmp_path / "b.safetensors"], moments=False)
    res = merge(ex, "linear", tmp_path / "merged", **KW)
    assert torch.equal(res.checkpoint["w"], torch.full((2,), 2.0))
    with pytest.raises(CurvlensError, match="is the input"):
        merge(ex, "linear", tmp_path / "a.safetensors", overwrite=True, **KW)
