"""Map a parameter name to ``(layer index or None, role)``.

Roles are the coarse functional groups the paper's analyses are laid out by
(layer x role grids): ``embed, q, k, v, o, gate, up, down, norm, lm_head, other``.
GPT-2 stores q, k and v in one fused matrix (``attn.c_attn``); it gets the role
``qkv`` so nobody mistakes it for a q projection. Unknown names get ``other``:
a new architecture must never make an analysis fail.
"""
from __future__ import annotations

import re

ROLES = ("embed", "q", "k", "v", "qkv", "o", "gate", "up", "down", "norm", "lm_head", "other")

# The first layer index in a name: ``model.layers.3.``, ``transformer.h.3.``,
# ``encoder.layer.3.``, ``blocks.3.`` ...
_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")

# Ordered (pattern, role) rules: first match wins. Patterns are searched in the
# full dotted name, so they cover Llama/Mistral/Qwen2/Gemma (``self_attn.q_proj``,
# ``mlp.gate_proj``), GPT-2 (``attn.c_attn``, ``mlp.c_fc``) and BERT
# (``attention.self.query``, ``intermediate.dense``).
_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"(^|\.)lm_head\.", "lm_head"),
        (r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|embed_positions)\.", "embed"),
        (r"(^|\.)(q_proj|query|wq)\.", "q"),
        (r"(^|\.)(k_proj|key|wk)\.", "k"),
        (r"(^|\.)(v_proj|value|wv)\.", "v"),
        (r"(^|\.)(qkv_proj|c_attn|query_key_value|Wqkv)\.", "qkv"),
        (r"(^|\.)(o_proj|out_proj|wo)\.", "o"),
        (r"(^|\.)attn\.c_proj\.", "o"),
        (r"(^|\.)attention\.output\.dense\.", "o"),
        (r"(^|\.)(gate_proj|w1)\.", "gate"),
        (r"(^|\.)(up_proj|w3|c_fc|fc1)\.", "up"),
        (r"(^|\.)intermediate\.dense\.", "up"),
        (r"(^|\.)(down_proj|w2|fc2)\.", "down"),
        (r"(^|\.)mlp\.c_proj\.", "down"),
        (r"(^|\.)output\.dense\.", "down"),
        (r"(norm|ln_\w+|LayerNorm|ln_f)(\.|$)", "norm"),
    )
)


def param_role(name: str) -> tuple[int | None, str]:
    """Return ``(layer, role)`` for a parameter name.

    Parameters
    ----------
    name : str
        A parameter name as it appears in a state dict.

    Returns
    -------
    layer : int or None
        The transformer block index, or None for parameters outside the blocks
        (embeddings, final norm, LM head).
    role : str
        One of :data:`ROLES`.

    Examples
    --------
    >>> param_role("model.layers.3.self_attn.k_proj.weight")
    (3, 'k')
    >>> param_role("transformer.h.0.attn.c_attn.weight")
    (0, 'qkv')
    >>> param_role("bert.encoder.layer.2.attention.self.query.weight")
    (2, 'q')
    >>> param_role("model.embed_tokens.weight")
    (None, 'embed')
    >>> param_role("something.unknown")
    (None, 'other')
    """
    m = _LAYER.search(name)
    layer = int(m.group(1)) if m else None
    for pattern, role in _RULES:
        if pattern.search(name):
            return layer, role
    return layer, "other"
