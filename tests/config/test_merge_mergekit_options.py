"""mergekit's config options honoured as mergekit does, or refused by name:
a base_model averaged by linear, dtype with out_dtype, tokenizer_source /
tokenizer, chat_template, and unknown keys at every level."""
import json
import sys

import pytest
import torch
import yaml

from curvlens import Checkpoint, CurvlensError, Experts
from curvlens.cli import main
from curvlens.config.chat_template import SHIPPED_TEMPLATES, shipped_template
from curvlens.config.merge import merge
from curvlens.config.merge_config import load_merge_config
from curvlens.io.writer import write_model
from tests.passes.mergekit_zoo import MERGEKIT_MISSING, make_llama_zoo, run_mergekit

KW = dict(device="cpu", progress=False)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama2")
    base, dirs, weights = make_llama_zoo(root, n_experts=2, layers=2)
    return root, base, dirs, weights


def _load(tmp_path, cfg):
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    return load_merge_config(tmp_path / "c.yml")


def _run(tmp_path, cfg, out=None):
    mc = _load(tmp_path, cfg)
    return mc, merge(mc.experts(), mc.method, out, **KW, **mc.merge_kwargs())


# ------------------------------------------------------------ base and linear
def _unlisted_base(llama):
    root, base, dirs, weights = llama
    return {"merge_method": "linear", "base_model": str(base), "parameters": {"weight": 0.5},
            "models": [{"model": str(dirs[0]), "parameters": {"weight": 1.0}},
                       {"model": str(dirs[1]), "parameters": {"weight": 2.0}}], "dtype": "float32"}


def test_linear_averages_an_unlisted_base(llama, tmp_path):
    weights = llama[3]
    mc, res = _run(tmp_path, _unlisted_base(llama))
    assert mc.names[-1] == "base" and mc.params["weight"] == [1.0, 2.0, 0.5]
    assert any("averaged as one more model" in n for n in mc.notes)
    name = "model.layers.1.mlp.up_proj.weight"
    want = (weights["expert0"][name] + 2 * weights["expert1"][name] + 0.5 * weights["base"][name]) / 3.5
    torch.testing.assert_close(res.checkpoint[name], want)


def test_linear_with_an_unlisted_base_matches_mergekit(llama, tmp_path):
    pytest.importorskip("mergekit", reason=MERGEKIT_MISSING)
    cfg = _unlisted_base(llama)
    _, res = _run(tmp_path, cfg)
    for n, t in run_mergekit(cfg, tmp_path / "mk").items():
        assert torch.equal(res.checkpoint[n], t), n


def test_linear_keeps_a_listed_base_once(llama, tmp_path):
    root, base, dirs, _ = llama
    cfg = {"merge_method": "linear", "base_model": str(base),
           "models": [{"model": str(base)}, {"model": str(dirs[0])}]}
    mc = _load(tmp_path, cfg)
    assert mc.names == ("base", "expert0") and not mc.notes


def test_task_vector_methods_leave_a_listed_base_out(llama, tmp_path):
    root, base, dirs, _ = llama
    cfg = {"merge_method": "ties", "base_model": str(base),
           "models": [{"model": str(base), "parameters": {"weight": 3}}, {"model": str(dirs[0])}]}
    mc = _load(tmp_path, cfg)
    assert mc.names == ("expert0",) and "left out of the merge as the reference" in mc.notes[0]


# --------------------------------------------------------------------- dtypes
def _bf16_in_fp32_out(llama):
    root, base, dirs, weights = llama
    return {"merge_method": "linear", "models": [{"model": str(d), "parameters": {"weight": w}}
                                                 for d, w in zip(dirs, (1.0, 3.0))],
            "dtype": "bfloat16", "out_dtype": "float32"}


def test_dtype_is_read_and_out_dtype_written(llama, tmp_path):
    weights = llama[3]
    mc, res = _run(tmp_path, _bf16_in_fp32_out(llama))
    assert (mc.input_dtype, mc.dtype) == ("bfloat16", "float32")
    name = "model.layers.0.self_attn.q_proj.weight"
    got = res.checkpoint[name]
    assert got.dtype == torch.float32
    # inputs read in bf16, merged in fp32, the result in bf16 (as mergekit's methods return it), written fp32
    a, b = (weights[e][name].to(torch.bfloat16).float() for e in ("expert0", "expert1"))
    assert torch.equal(got, ((a * 1.0 + b * 3.0) / 4.0).to(torch.bfloat16).float())


def test_dtype_and_out_dtype_match_mergekit(llama, tmp_path):
    pytest.importorskip("mergekit", reason=MERGEKIT_MISSING)
    cfg = _bf16_in_fp32_out(llama)
    _, res = _run(tmp_path, cfg)
    for n, t in run_mergekit(cfg, tmp_path / "mk").items():
        assert t.dtype == torch.float32 and torch.equal(res.checkpoint[n], t), n


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    """Two experts stored in bf16 (as most released checkpoints are)."""
    root = tmp_path_factory.mktemp("llama_bf16")
    _, dirs, weights = make_llama_zoo(root / "fp32", n_experts=2, layers=2)
    out = {}
    for d in dirs:
        w = {n: t.to(torch.bfloat16) for n, t in weights[d.name].items()}
        path = write_model(w, root / d.name)
        (path / "config.json").write_text((d / "config.json").read_text())
        out[d.name] = (path, w)
    return out


def _out_fp16(bf16_llama, **top):
    return {"merge_method": "linear", "out_dtype": "float16", **top,
            "models": [{"model": str(path), "parameters": {"weight": w}}
                       for (path, _), w in zip(bf16_llama.values(), (0.3, 0.9))]}


def _fp16_ulps(got, a, b):
    """Largest distance of ``got`` from the exact merge, in fp16 spacings there."""
    exact = (a.double() * 0.3 + b.double() * 0.9) / 1.2
    ulp = 2.0 ** (torch.floor(torch.log2(exact.abs().clamp_min(2.0 ** -14))) - 10)
    return float(((got.double() - exact).abs() / ulp).max())


def test_out_dtype_without_dtype_rounds_the_fp32_merge_once(bf16_llama, tmp_path):
    # curvlens merges in fp32 and rounds once to the written dtype: fp16 correctly rounded
    # (up to the fp32 merge's own error, 2**-13 of an fp16 spacing)
    _, res = _run(tmp_path, _out_fp16(bf16_llama))
    (_, a), (_, b) = bf16_llama.values()
    for name in a:
        assert res.checkpoint[name].dtype == torch.float16
        assert _fp16_ulps(res.checkpoint[name], a[name], b[name]) <= 0.5 + 2 ** -12, name


def test_out_dtype_without_dtype_is_mergekits_merge_in_the_stored_dtype(bf16_llama, tmp_path):
    # mergekit without `dtype` merges in the inputs' stored dtype (bf16) and casts to out_dtype
    # only when writing: its fp16 values carry bf16's 8 significant bits, curvlens's fp16's 11
    # (above). Stating the stored dtype (`dtype: bfloat16`) gives mergekit's tensors bit for bit.
    pytest.importorskip("mergekit", reason=MERGEKIT_MISSING)
    cfg = _out_fp16(bf16_llama)
    theirs = run_mergekit(cfg, tmp_path / "mk")
    _, ours = _run(tmp_path, cfg)
    _, as_stated = _run(tmp_path, {**cfg, "dtype": "bfloat16"})
    differ = total = 0
    (_, a), (_, b) = bf16_llama.values()
    for name, t in theirs.items():
        assert t.dtype == torch.float16 and torch.equal(as_stated.checkpoint[name], t), name
        differ, total = differ + int((ours.checkpoint[name] != t).sum()), total + t.numel()
        assert _fp16_ulps(t, a[name], b[name]) <= 4 + 2 ** -12  # bf16's half spacing: 4 of fp16's
    assert differ / total > 0.5  # most entries show the rounding through bf16


def test_the_saved_config_of_an_api_merge_says_out_dtype(llama, tmp_path):
    root, base, dirs, _ = llama
    ex = Experts.from_dirs(base, dirs, moments=False)
    merge(ex, "task_arithmetic", tmp_path / "o", dtype="bfloat16", **KW)
    saved = yaml.safe_load((tmp_path / "o" / "curvlens_merge.yml").read_text())
    assert saved["dtype"] == "float32" and saved["out_dtype"] == "bfloat16"
    assert json.loads((tmp_path / "o" / "config.json").read_text())["torch_dtype"] == "bfloat16"


# ------------------------------------------------------------------ tokenizer
def _tokenizers(dirs, vocabs, templates=None):
    for i, (d, vocab) in enumerate(zip(dirs, vocabs)):
        (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": vocab},
                                                      "added_tokens": []}))
        cfg = {"model_max_length": 8, "who": d.name}
        if templates and templates[i]:
            cfg["chat_template"] = templates[i]
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))


VOCAB = {f"t{i}": i for i in range(16)}


@pytest.fixture
def toks(tmp_path):
    base, dirs, weights = make_llama_zoo(tmp_path / "z", n_experts=2, layers=1)
    _tokenizers([base, *dirs], [VOCAB] * 3)
    return base, dirs


def _linear(base, dirs, **top):
    return {"merge_method": "linear", "base_model": str(base),
            "models": [{"model": str(d)} for d in dirs], **top}


@pytest.mark.parametrize("source", ["base", "union", "expert1"])
def test_tokenizer_source_copies_that_tokenizer(toks, tmp_path, source):
    base, dirs = toks
    src = str(dirs[1]) if source == "expert1" else source
    _run(tmp_path, _linear(base, dirs, tokenizer_source=src), tmp_path / "o")
    who = json.loads((tmp_path / "o" / "tokenizer_config.json").read_text())["who"]
    assert who == ("expert1" if source == "expert1" else "base")


def test_tokenizer_section_with_pad_that_adds_no_rows(toks, tmp_path):
    base, dirs = toks
    _run(tmp_path, _linear(base, dirs, tokenizer={"source": "base", "pad_to_multiple_of": 8}), tmp_path / "o")
    assert (tmp_path / "o" / "tokenizer.json").is_file()


@pytest.mark.parametrize("change, top, match", [
    ("vocab", {"tokenizer_source": "union"}, "vocabulary differs"),
    (None, {"tokenizer": {"source": "union", "pad_to_multiple_of": 5}}, "would add padding rows"),
    (None, {"tokenizer": {"source": "base", "tokens": {"t1": {"source": "base"}}}}, "tokenizer.tokens"),
    (None, {"tokenizer": {"source": "base", "pad": 8}}, r"tokenizer: unknown key\(s\) \['pad'\]"),
    (None, {"tokenizer_source": "base", "tokenizer": {"source": "base"}}, "not both"),
    ("rows", {"tokenizer_source": "base"}, "has 16 rows but the vocabulary 15 tokens"),
    (None, {"chat_template": "no-such-template"}, "not a template curvlens carries"),
    (None, {"chat_template": "../chatml"}, "not a template name"),
    (None, {"chat_template": "{{ x }}"}, "neither 'auto', a template name"),
])
def test_tokenizer_cases_mergekit_would_resize_are_refused(toks, tmp_path, change, top, match):
    base, dirs = toks
    if change == "vocab":
        _tokenizers([dirs[1]], [{**{f"t{i}": i for i in range(15)}, "new": 15}])
    if change == "rows":
        _tokenizers([base, *dirs], [{f"t{i}": i for i in range(15)}] * 3)
    with pytest.raises(CurvlensError, match=match):
        _run(tmp_path, _linear(base, dirs, **top), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_chat_template_is_written_into_tokenizer_config(toks, tmp_path):
    base, dirs = toks
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    _run(tmp_path, _linear(base, dirs, chat_template=jinja), tmp_path / "o")
    assert json.loads((tmp_path / "o" / "tokenizer_config.json").read_text())["chat_template"] == jinja


def test_chat_template_auto_takes_the_most_common(toks, tmp_path):
    base, dirs = toks
    a, b = "{{ 'A' }}{# a template #}", "{{ 'B' }}{# b template #}"
    _tokenizers([base, *dirs], [VOCAB] * 3, templates=[a, b, b])
    _run(tmp_path, _linear(base, dirs, chat_template="auto"), tmp_path / "o")
    assert json.loads((tmp_path / "o" / "tokenizer_config.json").read_text())["chat_template"] == b


@pytest.mark.parametrize("name", SHIPPED_TEMPLATES)
def test_chat_template_by_name_needs_no_mergekit(toks, tmp_path, monkeypatch, name):
    monkeypatch.setitem(sys.modules, "mergekit", None)  # any import of mergekit fails
    base, dirs = toks
    _run(tmp_path, _linear(base, dirs, chat_template=name), tmp_path / "o")
    got = json.loads((tmp_path / "o" / "tokenizer_config.json").read_text())["chat_template"]
    assert got == shipped_template(name)  # what tests/config/test_chat_template.py checks renders as mergekit's


def test_tokenizer_options_need_an_output_dir(toks, tmp_path):
    base, dirs = toks
    with pytest.raises(CurvlensError, match="give an output directory"):
        _run(tmp_path, _linear(base, dirs, tokenizer_source="base"))


# ----------------------------------------------------------- unknown keys
@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(foo=1), r"unknown key\(s\) \['foo'\]"),
    (lambda c: c.update(modules={}), "'modules': mergekit's per-module configs"),
    (lambda c: c["models"][0].update(lora="x"), r"models\[0\]: unknown key\(s\) \['lora'\]"),
    (lambda c: c["models"][0].update(model={"model": c["models"][0]["model"], "lora": "x"}), "no LoRA"),
    (lambda c: c["models"][0].update(parameters={"weight": [{"filter": "mlp", "valu": 1}]}), "filter: SUBSTRING"),
    (lambda c: c["models"][0].update(parameters={"wieght": 1}), "unknown parameter 'wieght'"),
    (lambda c: c.update(parameters={"densty": 0.5}), "unknown parameter 'densty'"),
    (lambda c: c.update(tensors=[{"filter": "lm_head", "action": "drop", "x": 1}]), r"tensors\[0\] must be"),
    (lambda c: c.update(chat_template=3), "chat_template must be a string"),
    (lambda c: c.update(merge_method="passthrough"), r"passthrough takes at most 1 model\(s\); got 3 \(mergekit counts"),
    (lambda c: c.update(slices=[]), "exactly one of 'models' and 'slices'"),
])
def test_every_unknown_key_is_refused(llama, tmp_path, edit, match):
    root, base, dirs, _ = llama
    cfg = {"merge_method": "ties", "base_model": str(base), "models": [{"model": str(d)} for d in dirs]}
    edit(cfg)
    with pytest.raises(CurvlensError, match=match):
        _load(tmp_path, cfg)


def test_cli_prints_the_notes(llama, tmp_path, capsys):
    root, base, dirs, _ = llama
    cfg = {"merge_method": "linear", "base_model": str(base), "models": [{"model": str(d)} for d in dirs]}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    assert main(["merge", str(tmp_path / "c.yml"), str(tmp_path / "o"), "--device", "cpu", "--quiet"]) == 0
    assert "note: base_model is averaged as one more model" in capsys.readouterr().out
    assert Checkpoint.open(tmp_path / "o").keys()
