"""The tiny Llama-like model, data and optimizer every distributed fixture trains.

Shapes are chosen so that flat partitions split tensors unevenly: odd numels
(hidden 7, vocab 33, intermediate 9) and two parameter groups (decay / no decay,
as the HF Trainer makes them), so ranks cut tensors in the middle and the last
rank is padded.
"""
from __future__ import annotations

import torch

STEPS = 3
LR = 1e-2
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 0.01
BATCH = 2
SEQ = 5


def config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=33, hidden_size=7, intermediate_size=9, num_hidden_layers=1,
                       num_attention_heads=1, num_key_value_heads=1, head_dim=4,
                       max_position_embeddings=16, tie_word_embeddings=False)


def model(seed: int = 0):
    """The tiny Llama, initialised from ``seed`` (identical on every rank)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(config()).float()


def no_decay(name: str) -> bool:
    """The HF Trainer's rule: no weight decay for biases and norm weights."""
    return name.endswith("bias") or "norm" in name


def param_groups(m: torch.nn.Module) -> list[dict]:
    """Decay and no-decay groups, each in model order."""
    named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if not no_decay(n)], "weight_decay": WEIGHT_DECAY},
            {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0}]


def batch(step: int, data_seed: int = 0) -> torch.Tensor:
    """The same token batch on every rank (so data-parallel averaging is exact);
    ``data_seed`` makes a different expert."""
    g = torch.Generator().manual_seed(1000 * (data_seed + 1) + step)
    return torch.randint(0, 33, (BATCH, SEQ), generator=g)
