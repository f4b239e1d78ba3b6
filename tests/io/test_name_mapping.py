"""Saved names through transformers' own conversion mapping, on the meta device:
for every family of the architecture tier and more MoE / renamed families (no
training: shapes only), the layout curvlens builds splits tensors group by group
exactly as transformers' ``revert_weight_conversion`` splits the whole model; a
layout that matches no checkpoint is refused naming every layout tried; a
conversion that does more than move entries is refused."""
from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.core_model_loading", reason="needs transformers >= 5 (conversion mappings)")

from transformers.core_model_loading import revert_weight_conversion  # noqa: E402

from curvlens import Checkpoint, CurvlensError, Moments  # noqa: E402
from curvlens.io.architecture import architecture_orders, trainer_decay_names  # noqa: E402
from curvlens.io.name_mapping import IDENTITY, SavedLayout, saved_layouts  # noqa: E402
from tests.architectures.families import FAMILIES, config_of, model_class  # noqa: E402

_L = dict(num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
          vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=32)
#: Families beyond the trained tier, checked on the meta device only.
MORE = {
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(_L, num_experts=4, num_experts_per_tok=2)),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", dict(_L, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(_L, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8)),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(_L, num_local_experts=4, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(_L, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                         first_k_dense_replace=1, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4,
                         qk_nope_head_dim=4, v_head_dim=8, n_group=1, topk_group=1)),
    "dinov2": ("Dinov2Config", "Dinov2Model", dict(num_hidden_layers=2, hidden_size=16, intermediate_size=32,
                                                   num_attention_heads=2, image_size=16, patch_size=8)),
    "deit": ("DeiTConfig", "DeiTForImageClassification",
             dict(num_hidden_layers=2, hidden_size=16, intermediate_size=32, num_attention_heads=2, image_size=16,
                  patch_size=8)),
    "esm": ("EsmConfig", "EsmForMaskedLM", dict(num_hidden_layers=2, hidden_size=16, intermediate_size=32,
                                                num_attention_heads=2, vocab_size=33, pad_token_id=1,
                                                max_position_embeddings=32)),
}


def _meta_model(fam: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fam in FAMILIES:
            config, cls = config_of(fam), model_class(fam)
        else:
            cc, mc, kw = MORE[fam]
            config, cls = getattr(transformers, cc)(**kw), getattr(transformers, mc)
        with torch.device("meta"):
            return cls(config)


@pytest.mark.parametrize("fam", [*FAMILIES, *MORE])
def test_layouts_split_group_by_group_as_transformers_splits_the_whole_model(fam):
    model = _meta_model(fam)
    layouts, notes = saved_layouts(model)
    assert layouts[0].label == IDENTITY and not notes
    params = dict(model.named_parameters())
    assert set(layouts[0].sources) <= set(params)
    g = torch.Generator().manual_seed(0)
    tensors = {n: torch.randn(p.shape, generator=g) for n, p in params.items()}
    whole = revert_weight_conversion(model, dict(tensors))
    converted = [lay for lay in layouts if "conversion mapping" in lay.label and "legacy" not in lay.label]
    for layout in converted:
        assert layout.renames
        read = layout.reader(tensors.__getitem__, fam)
        assert set(layout.shapes) <= set(whole)
        for name in sorted(layout.shapes):  # the order a safetensors file lists them
            assert torch.equal(read(name), whole[name]), (fam, name)
    # a family with a conversion layout is exactly one whose saved names differ
    assert len(converted) == (set(whole) != set(tensors)), fam
    # the legacy variants rename without moving any entry
    for layout in layouts:
        if "legacy" in layout.label:
            read = layout.reader(tensors.__getitem__, fam)
            assert all(read(n).shape == layout.shapes[n] for n in layout.shapes)


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_the_trainer_decay_rule_restated_equals_the_installed_one(fam, monkeypatch):
    model = _meta_model(fam)
    installed = trainer_decay_names(model)
    assert installed and installed != set(dict(model.named_parameters()))
    import transformers as tf

    # without a callable Trainer (no accelerate), the restated rule gives the same groups
    monkeypatch.setattr(tf.Trainer, "get_decay_parameter_names", None)
    assert trainer_decay_names(model) == installed


def _tiny_mixtral(tmp_path):
    """A Mixtral saved as transformers saves it, with an index-keyed AdamW state beside."""
    cfg = transformers.MixtralConfig(**dict(_L, num_local_experts=4, num_experts_per_tok=2))
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(3, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model.save_pretrained(tmp_path)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    return model, opt


def test_a_fused_moment_is_split_as_the_weights_in_one_optimizer_step(tmp_path):
    model, opt = _tiny_mixtral(tmp_path)
    m = Moments.open(tmp_path)
    live = {n: opt.state[p]["exp_avg_sq"] for n, p in model.named_parameters()}
    saved = revert_weight_conversion(model, live)
    assert sorted(m) == sorted(saved) and "fused" in m.source.names
    for n, v in saved.items():
        assert torch.equal(m[n], v), n
    m.validate(tmp_path)


LEGACY = {
    "bert": (lambda: transformers.BertForSequenceClassification(transformers.BertConfig(
        num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2, vocab_size=64)),
        [("LayerNorm.weight", "LayerNorm.gamma"), ("LayerNorm.bias", "LayerNorm.beta")],
        lambda m: {"input_ids": torch.randint(3, 64, (2, 8)), "labels": torch.tensor([0, 1])}),
    "wav2vec2": (lambda: transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(
        num_hidden_layers=1, hidden_size=16, intermediate_size=32, num_attention_heads=2, conv_dim=(8, 8),
        conv_stride=(4, 4), conv_kernel=(8, 8), num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
        vocab_size=16, pad_token_id=0)),
        [("parametrizations.weight.original0", "weight_g"), ("parametrizations.weight.original1", "weight_v")],
        lambda m: {"input_values": torch.randn(2, 400), "labels": torch.randint(3, 16, (2, 4))}),
}


@pytest.mark.parametrize("fam", list(LEGACY))
def test_a_model_loaded_from_legacy_names_saves_them_back_and_opens(tmp_path, fam):
    """A transformers 4 checkpoint (``LayerNorm.gamma``, weight-norm ``weight_g``)
    loaded, fine-tuned and saved by transformers 5 keeps its old names."""
    from safetensors.torch import load_file, save_file

    build, renames, batch = LEGACY[fam]
    torch.manual_seed(0)
    build().save_pretrained(tmp_path / "v4")
    old = {}
    for k, v in load_file(str(tmp_path / "v4" / "model.safetensors")).items():
        for new, legacy in renames:
            k = k.replace(new, legacy)
        old[k] = v
    save_file(old, str(tmp_path / "v4" / "model.safetensors"), metadata={"format": "pt"})
    model = type(build()).from_pretrained(tmp_path / "v4")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(**batch(model)).loss.backward()
    opt.step()
    model.save_pretrained(tmp_path / "ft")
    torch.save(opt.state_dict(), tmp_path / "ft" / "optimizer.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Wav2Vec2's masked_spec_embed gets no gradient: never updated
        m = Moments.open(tmp_path / "ft")
    assert "legacy names" in m.source.names and any(legacy in n for n in m for _, legacy in renames)
    live = {n: opt.state[p]["exp_avg_sq"] for n, p in model.named_parameters() if p in opt.state}
    want = revert_weight_conversion(model, live)
    assert sorted(m) == sorted([*want, *m.never_updated])
    for n, v in want.items():
        assert torch.equal(m[n], v), n
    assert all(not m[n].any() for n in m.never_updated)
    m.validate(tmp_path / "ft")


def test_no_layout_that_checks_out_is_refused_naming_every_layout_tried(tmp_path):
    from safetensors.torch import load_file, save_file

    _tiny_mixtral(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    key = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    weights["model.layers.1.moe.experts.2.w2.weight"] = weights.pop(key)
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CurvlensError) as err:
        Moments.open(tmp_path)
    msg = str(err.value)
    assert "cannot map optimizer indices" in msg and "saved as in memory:" in msg
    assert "transformers conversion mapping of MixtralForCausalLM" in msg and repr(key) in msg
    assert "pass checkpoint=" in msg


def test_a_conversion_that_does_more_than_move_entries_is_refused():
    layout = SavedLayout("scaling", {"w": ("p",)}, {"w": torch.Size([3])},
                         split=lambda t: {"w": 2 * t["p"]})
    with pytest.raises(CurvlensError, match="does not only move entries"):
        layout.reader(lambda n: torch.ones(3), "moments")("w")
    dropped = SavedLayout("drop", {"a": ("p",), "b": ("p",)}, {"a": torch.Size([1]), "b": torch.Size([1])},
                          split=lambda t: {"a": t["p"][:1]})
    with pytest.raises(CurvlensError, match=r"gave \['a'\], expected \['a', 'b'\]"):
        dropped.reader(lambda n: torch.ones(2), "moments")("a")


def test_a_split_group_is_converted_once_and_released(tmp_path):
    calls = []

    def split(t):
        calls.append(sorted(t))
        return {"a": t["p"][:2], "b": t["p"][2:]}

    layout = SavedLayout("chunk", {"a": ("p",), "b": ("p",)}, {"a": torch.Size([2]), "b": torch.Size([2])},
                         split=split)
    read = layout.reader(lambda n: torch.arange(4.0), "m")
    assert read("a").tolist() == [0.0, 1.0] and read("b").tolist() == [2.0, 3.0]
    assert calls == [["p"]]
    read("b")  # read again: converted again, nothing kept between passes
    assert len(calls) == 2


def test_architecture_orders_offer_the_conversion_layout_only_when_names_differ(tmp_path):
    _tiny_mixtral(tmp_path)
    (arch,) = architecture_orders(tmp_path)[0]
    assert arch.name == "MixtralForCausalLM" and [lay.label.split(" (")[0] for lay in arch.layouts] == [
        IDENTITY, "transformers conversion mapping of MixtralForCausalLM"]
    assert Checkpoint.open(tmp_path).keys() >= set(arch.layouts[1].shapes)


def test_frozen_parameters_are_refused_with_the_reason(tmp_path):
    """A speech fine-tune with its feature encoder frozen: the optimizer lacks those
    parameters, and nothing records which; refused, never guessed."""
    build, _, batch = LEGACY["wav2vec2"]
    torch.manual_seed(0)
    model = build()
    model.freeze_feature_encoder()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model(**batch(model)).loss.backward()
    opt.step()
    model.save_pretrained(tmp_path)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    with pytest.raises(CurvlensError, match=r"(?s)cannot map optimizer indices.*Wav2Vec2ForCTC parameter order: "
                                            r"optimizer has \d+ parameters, the model has \d+ \(fewer: parameters "
                                            r"frozen"):
        Moments.open(tmp_path)
