import pytest

from curvlens import ROLES, param_role

CASES = [
    # Llama / Mistral / Qwen2 / Gemma
    ("model.embed_tokens.weight", None, "embed"),
    ("model.layers.0.self_attn.q_proj.weight", 0, "q"),
    ("model.layers.11.self_attn.k_proj.weight", 11, "k"),
    ("model.layers.2.self_attn.v_proj.bias", 2, "v"),  # Qwen2 has q/k/v biases
    ("model.layers.2.self_attn.o_proj.weight", 2, "o"),
    ("model.layers.3.mlp.gate_proj.weight", 3, "gate"),
    ("model.layers.3.mlp.up_proj.weight", 3, "up"),
    ("model.layers.3.mlp.down_proj.weight", 3, "down"),
    ("model.layers.3.input_layernorm.weight", 3, "norm"),
    ("model.layers.3.post_attention_layernorm.weight", 3, "norm"),
    ("model.layers.3.pre_feedforward_layernorm.weight", 3, "norm"),  # Gemma 2
    ("model.layers.3.self_attn.q_norm.weight", 3, "norm"),  # Gemma 3 / Qwen3
    ("model.norm.weight", None, "norm"),
    ("lm_head.weight", None, "lm_head"),
    # GPT-2
    ("transformer.wte.weight", None, "embed"),
    ("transformer.wpe.weight", None, "embed"),
    ("transformer.h.4.attn.c_attn.weight", 4, "qkv"),
    ("transformer.h.4.attn.c_proj.weight", 4, "o"),
    ("transformer.h.4.mlp.c_fc.weight", 4, "up"),
    ("transformer.h.4.mlp.c_proj.weight", 4, "down"),
    ("transformer.h.4.ln_1.weight", 4, "norm"),
    ("transformer.ln_f.bias", None, "norm"),
    # BERT
    ("bert.embeddings.word_embeddings.weight", None, "embed"),
    ("bert.embeddings.LayerNorm.weight", None, "norm"),
    ("bert.encoder.layer.5.attention.self.query.weight", 5, "q"),
    ("bert.encoder.layer.5.attention.self.key.bias", 5, "k"),
    ("bert.encoder.layer.5.attention.self.value.weight", 5, "v"),
    ("bert.encoder.layer.5.attention.output.dense.weight", 5, "o"),
    ("bert.encoder.layer.5.attention.output.LayerNorm.weight", 5, "norm"),
    ("bert.encoder.layer.5.intermediate.dense.weight", 5, "up"),
    ("bert.encoder.layer.5.output.dense.weight", 5, "down"),
    ("bert.encoder.layer.5.output.LayerNorm.weight", 5, "norm"),
    ("bert.pooler.dense.weight", None, "other"),
    # unknown names never fail
    ("something.completely.different", None, "other"),
    ("", None, "other"),
]


@pytest.mark.parametrize("name,layer,role", CASES)
def test_param_role(name, layer, role):
    assert param_role(name) == (layer, role)
    assert role in ROLES


def test_real_llama_names_cover_every_role():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    import torch

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    roles = {param_role(n)[1] for n, _ in model.named_parameters()}
    assert roles == {"embed", "q", "k", "v", "o", "gate", "up", "down", "norm", "lm_head"}
