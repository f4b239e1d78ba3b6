"""Hand-made analysis frames with the exact columns of ``curvlens.passes.analysis``.

Values are synthetic but shaped like the real thing (curvature decades apart by
role, FFG keeping early q/k and the embeddings, FFG beating magnitude pruning),
so the same builder serves the tests (tiny sizes) and visual checks (8 layers).
"""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

MATRIX_ROLES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
                "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
                "down": "mlp.down_proj"}
CAPABILITIES = {"math": "addition", "code": "brackets", "instruct": "transform",
                "knowledge": "facts"}
ROLE_LEVEL = {"embed": -11.0, "q": -9.5, "k": -9.7, "v": -10.3, "o": -10.6, "gate": -10.8,
              "up": -10.9, "down": -11.2, "norm": -8.5, "lm_head": -10.0}


def tensors(n_layers: int = 2, hidden: int = 64, inter: int = 128, vocab: int = 256):
    """(name, layer, role, shape) of a Llama-like model."""
    out = [("model.embed_tokens.weight", None, "embed", (vocab, hidden))]
    for i in range(n_layers):
        for role, mod in MATRIX_ROLES.items():
            shape = {"gate": (inter, hidden), "up": (inter, hidden),
                     "down": (hidden, inter)}.get(role, (hidden, hidden))
            out.append((f"model.layers.{i}.{mod}.weight", i, role, shape))
        out.append((f"model.layers.{i}.input_layernorm.weight", i, "norm", (hidden,)))
        out.append((f"model.layers.{i}.post_attention_layernorm.weight", i, "norm", (hidden,)))
    out.append(("model.norm.weight", None, "norm", (hidden,)))
    out.append(("lm_head.weight", None, "lm_head", (vocab, hidden)))
    return out


def make_frames(n_layers: int = 2, experts=("math", "code", "instruct"),
                densities=(0.05, 0.1, 0.2, 0.3, 0.5, 1.0), blocks: int = 4, seed: int = 0):
    """Every frame the views take, keyed like ``render_all`` expects."""
    rng = np.random.default_rng(seed)
    ts = tensors(n_layers)
    experts = list(experts)
    pairs = list(itertools.combinations(experts, 2))

    def depth(layer):
        return 0.0 if layer is None else layer / max(n_layers - 1, 1)

    stats, pl, ov, inter, mo, ms, pooled, hist = [], [], [], [], [], [], [], []
    for e_i, e in enumerate(experts):
        for name, layer, role, shape in ts:
            numel = int(np.prod(shape))
            level = ROLE_LEVEL[role] - 0.8 * depth(layer) + 0.2 * e_i + rng.normal(0, 0.1)
            q = level + np.array([-2.5, -1.2, 0.0, 1.1, 2.2])
            stats.append(dict(expert=e, name=name, layer=layer, role=role, numel=numel,
                              mean_log10=level + 0.1, median_log10=level, q01=q[0], q10=q[1],
                              q50=q[2], q90=q[3], q99=q[4], frac_zero=float(rng.uniform(0, 0.01)),
                              bias_corrected=False, sampled=numel > 10_000))
            pl.append(dict(expert=e, name=name, layer=layer, role=role, numel=numel,
                           predicted_loss_increase=10 ** (level + 7 + rng.normal(0, 0.3))))
            # FFG keeps early attention and embeddings; magnitude spreads evenly
            focus = {"embed": 2.5, "q": 2.0, "k": 2.0}.get(role, 0.7) * (1.5 - depth(layer))
            for crit in ("fisher", "magnitude"):
                for d in densities:
                    if crit == "fisher":
                        kept = float(np.clip(d * focus * rng.uniform(0.8, 1.2), 0, 1))
                    else:
                        kept = float(np.clip(d * rng.uniform(0.9, 1.1), 0, 1))
                    if d >= 1:
                        kept = 1.0
                    rows_, cols_ = (shape + (1,))[:2]
                    rank = min(rows_, cols_)
                    ms.append(dict(expert=e, criterion=crit, density=d, name=name, layer=layer,
                                   role=role, numel=numel, threshold=10 ** (level - 3 * d),
                                   kept_frac=kept,
                                   row_sparsity=float(np.clip(1 - kept * 1.3, 0, 1)),
                                   col_sparsity=float(np.clip(1 - kept * 1.1, 0, 1)),
                                   mask_rank=int(max(1, round(rank * kept))),
                                   mask_effective_rank=float(1 + (rank - 1) * kept ** 2),
                                   stable_rank=float(1 + 2 * kept),
                                   saliency_kept=float(min(1.0, kept ** 0.3)),
                                   rank_method="exact"))
            if len(shape) == 2:
                br, bc = blocks, blocks
            else:
                br, bc = 1, blocks
            base = level + rng.normal(0, 0.3, (br, bc)) + np.linspace(0.8, -0.8, br)[:, None]
            for r, c in itertools.product(range(br), range(bc)):
                pooled.append(dict(expert=e, name=name, layer=layer, role=role, row_block=r,
                                   col_block=c, log10_v=float(base[r, c]),
                                   mask_frac=float(np.clip(base[r, c] - level + 0.5, 0, 1))))
        edges = np.arange(-16.0, -4.0 + 1e-9, 0.25)
        for role in ROLE_LEVEL:
            centers = (edges[:-1] + edges[1:]) / 2
            dens = np.exp(-0.5 * ((centers - ROLE_LEVEL[role] - 0.2 * e_i) / 1.2) ** 2)
            counts = np.round(dens * 10_000 * rng.uniform(0.9, 1.1, dens.shape)).astype(int)
            for lo, hi, n in zip(edges[:-1], edges[1:], counts):
                hist.append(dict(expert=e, role=role, bin_left=lo, bin_right=hi, count=int(n)))
    for a, b in pairs:
        sim = 0.97 - 0.05 * abs(experts.index(a) - experts.index(b))
        for name, layer, role, shape in ts:
            numel = int(np.prod(shape))
            p = float(np.clip(sim - 0.1 * depth(layer) + rng.normal(0, 0.02), -1, 1))
            ov.append(dict(expert_a=a, expert_b=b, name=name, layer=layer, role=role,
                           numel=numel, cosine=min(1.0, p + 0.02), pearson_log=p,
                           spearman_log=p - 0.01, jaccard_top1=p * 0.5, jaccard_top10=p * 0.7))
            inter.append(dict(expert_a=a, expert_b=b, name=name, layer=layer, role=role,
                              numel=numel, tv_cosine=float(rng.normal(0.05, 0.1)),
                              sign_conflict=float(rng.uniform(0.3, 0.5)),
                              curvature_weighted_conflict=float(rng.uniform(0.1, 0.4))))
            for crit in ("fisher", "magnitude"):
                for d in densities:
                    mo.append(dict(expert_a=a, expert_b=b, criterion=crit, density=d, name=name,
                                   layer=layer, role=role, numel=numel,
                                   jaccard=float(min(1, d * (1.5 if crit == "fisher" else 1.0)
                                                     + rng.uniform(0, 0.05)))))
    sweep = []
    for e_i, e in enumerate(experts):
        full = 0.9 - 0.05 * e_i
        for crit in ("fisher", "magnitude"):
            for d in densities:
                keep = 1 - np.exp(-d / (0.04 if crit == "fisher" else 0.25))
                for cap in CAPABILITIES.values():
                    own = cap == CAPABILITIES.get(e)
                    score = full * keep if own else 0.1 + 0.05 * rng.uniform()
                    sweep.append(dict(expert=e, criterion=crit, density=d, capability=cap,
                                      score=float(score)))
    merge = []
    models = [("base", "base")] + [(f"expert: {e}", "expert") for e in experts] + [
        ("linear (average)", "linear"), ("TIES", "ties"), ("OTA", "ota"), ("OTA+FFG", "ota")]
    for m_i, (model, method) in enumerate(models):
        for c_i, cap in enumerate(CAPABILITIES.values()):
            if method == "base":
                acc = 0.05
            elif method == "expert":
                acc = 0.9 if CAPABILITIES[model.split(": ")[1]] == cap else 0.1
            else:
                acc = 0.4 + 0.1 * m_i - 0.1 * c_i
            merge.append(dict(model=model, method=method, capability=cap,
                              accuracy=float(np.clip(acc, 0, 1)), n=200))
    return {
        "curvature_stats": pd.DataFrame(stats),
        "curvature_overlap": pd.DataFrame(ov),
        "mask_stats": pd.DataFrame(ms),
        "mask_overlap": pd.DataFrame(mo),
        "interference": pd.DataFrame(inter),
        "predicted_loss": pd.DataFrame(pl),
        "graft_sweep": pd.DataFrame(sweep),
        "pooled_moments": pd.DataFrame(pooled),
        "log10_histogram": pd.DataFrame(hist),
        "merge_table": pd.DataFrame(merge),
    }
