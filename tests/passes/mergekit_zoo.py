"""Tiny Llama checkpoints mergekit itself can read (a config.json each), and a
way to run mergekit's own merge on them (tests skip, with the reason, where
mergekit is absent)."""
import json

import torch

from curvlens.io.writer import write_model


def llama_config(layers: int, vocab: int = 16) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8,
            "num_hidden_layers": layers, "intermediate_size": 12, "vocab_size": vocab,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
            "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "torch_dtype": "float32"}


def llama_shapes(layers: int, vocab: int = 16) -> dict:
    h, kv, inter = 8, 4, 12
    shapes = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (vocab, h)
    return shapes


def make_llama_zoo(root, n_experts: int = 3, layers: int = 5, seed: int = 0, names=None):
    """base + experts with config.json; returns (base_dir, [expert dirs], {model: {name: tensor}})."""
    g = torch.Generator().manual_seed(seed)
    shapes = llama_shapes(layers)
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    out = {"base": base}
    dirs = []
    for d, w in [("base", base)] + [(names[i] if names else f"expert{i}",
                                     {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()})
                                    for i in range(n_experts)]:
        path = write_model(w, root / d)
        (path / "config.json").write_text(json.dumps(llama_config(layers)))
        out[d] = w
        if d != "base":
            dirs.append(path)
    return root / "base", dirs, out


#: Why a comparison with mergekit is skipped (never passed) where mergekit is absent.
MERGEKIT_MISSING = "mergekit is not installed: pip install -e '.[parity]' (CI installs it) to compare with it"


def run_mergekit(cfg: dict, out) -> dict:
    """mergekit's own merge of ``cfg`` (paths as given); returns its tensors.
    Skips the calling test, with the reason, where mergekit is absent."""
    import logging

    import pytest

    pytest.importorskip("mergekit", reason=MERGEKIT_MISSING)

    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    from curvlens import Checkpoint

    logging.disable(logging.WARNING)
    try:
        run_merge(MergeConfiguration.model_validate(cfg), str(out),
                  MergeOptions(device="cpu", copy_tokenizer=False, quiet=True))
    finally:
        logging.disable(logging.NOTSET)
    return dict(Checkpoint.open(out).items())
