"""A synthetic expert zoo with Llama-3.1-8B layer shapes, generated on any device.

Used by ``benchmarks/gpu_check.py``: base + ``experts`` experts, bf16 weights as HF
sharded safetensors (+ index, ``config.json``), each expert with its fp32 Adam second
moments in the paper's layout (``export/exp_avg_sq.safetensors``). Tensors are made
on ``device`` (a GPU makes 30 GB in seconds) one at a time and streamed to disk, so
host memory holds one tensor per model at a time whatever the number of layers.

The numbers are shaped like real fine-tuning, so the selections and merges do real
work: base weights N(0, 0.02); each expert's edit is small (~1e-3 relative) and
concentrated on a random subset of rows (as FFG finds); second moments are
log-normal over ~6 decades and correlated across experts (a shared component plus
an expert's own), with a per-row level.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

#: Llama-3.1-8B (hidden 4096, intermediate 14336, 32 heads, GQA with 8 kv heads, vocab 128256).
LLAMA31_8B = dict(hidden=4096, inter=14336, heads=32, kv_heads=8, vocab=128256)
#: A small stand-in with the same structure, for ``--small`` runs on a CPU.
SMALL = dict(hidden=256, inter=896, heads=8, kv_heads=2, vocab=4096)

_ST_DTYPE = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}


def llama_shapes(hidden: int, inter: int, heads: int, kv_heads: int, vocab: int, layers: int) -> dict:
    """Parameter name -> shape of a Llama model, in the order HF saves it."""
    kv = hidden // heads * kv_heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden),
            p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden),
            p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        })
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def zoo_bytes(shapes: dict, experts: int) -> int:
    """Bytes on disk: bf16 weights for base + experts, fp32 moments per expert."""
    n = sum(torch.Size(s).numel() for s in shapes.values())
    return n * 2 * (experts + 1) + n * 4 * experts


def llama_config(hidden: int, inter: int, heads: int, kv_heads: int, vocab: int, layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "num_hidden_layers": layers, "vocab_size": vocab, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }


class SafetensorsStream:
    """Write one ``.safetensors`` file tensor by tensor (the header first, from a plan)."""

    def __init__(self, path: Path, plan: list[tuple[str, tuple, torch.dtype]]):
        header, offset = {}, 0
        for name, shape, dtype in plan:
            nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self._order = [name for name, _, _ in plan]
        self._fh = open(path, "wb")
        self._fh.write(struct.pack("<Q", len(raw)) + raw)

    def add(self, name: str, t: torch.Tensor) -> None:
        if not self._order or self._order[0] != name:
            raise ValueError(f"{name} is not the next planned tensor")
        self._order.pop(0)
        self._fh.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())  # buffer protocol: no copy

    def close(self) -> None:
        if self._order:
            raise ValueError(f"{len(self._order)} planned tensors were never written")
        self._fh.close()


def _write_model_dir(d: Path, shapes: dict, config: dict, shard_bytes: int):
    """Open a sharded HF dir for streaming: returns ``add(name, tensor)`` and ``close()``."""
    d.mkdir(parents=True, exist_ok=False)
    (d / "config.json").write_text(json.dumps(config, indent=1))
    shards, cur, size = [], [], 0
    for name, shape in shapes.items():
        nb = torch.Size(shape).numel() * 2
        if cur and size + nb > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nb
    shards.append(cur)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {n: f for f, names in zip(files, shards) for n in names}
    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    streams = {}

    def add(name, t):
        f = weight_map[name]
        if f not in streams:
            for other in list(streams):
                streams.pop(other).close()  # shards are filled in order
            names = shards[files.index(f)]
            streams[f] = SafetensorsStream(d / f, [(n, shapes[n], torch.bfloat16) for n in names])
        streams[f].add(name, t)

    def close():
        for s in streams.values():
            s.close()

    return add, close


def make_zoo(root: Path, *, layers: int, experts: int = 3, shapes_of: dict = LLAMA31_8B,
             device: str = "cpu", seed: int = 0, shard_bytes: int = 5 << 30) -> dict:
    """Write ``root/base``, ``root/expert{i}`` (+ ``export/exp_avg_sq.safetensors``).

    Returns a summary: shapes, params per model, bytes on disk.
    """
    root = Path(root)
    shapes = llama_shapes(**shapes_of, layers=layers)
    config = llama_config(**shapes_of, layers=layers)
    g = torch.Generator(device=device).manual_seed(seed)
    names = ["base"] + [f"expert{i}" for i in range(experts)]
    writers = {n: _write_model_dir(root / n, shapes, config, shard_bytes) for n in names}
    moments = {}
    for i in range(experts):
        (root / f"expert{i}" / "export").mkdir()
        moments[i] = SafetensorsStream(root / f"expert{i}" / "export" / "exp_avg_sq.safetensors",
                                       [(n, s, torch.float32) for n, s in shapes.items()])
    for name, shape in shapes.items():
        if len(shape) == 1:
            base = 1 + 0.02 * torch.randn(shape, generator=g, device=device)
        else:
            base = 0.02 * torch.randn(shape, generator=g, device=device)
        writers["base"][0](name, base.to(torch.bfloat16).cpu())
        # moments: a shared log-level, a per-row level, and each expert's own part
        rows = shape[0]
        shared = 2.0 * torch.randn(shape, generator=g, device=device)
        row_level = 1.5 * torch.randn((rows,) + (1,) * (len(shape) - 1), generator=g, device=device)
        for i in range(experts):
            # the edit: ~1e-3 of the weights' scale, on about a third of the rows
            on = (torch.rand((rows,) + (1,) * (len(shape) - 1), generator=g, device=device) < 0.35)
            tau = 2e-3 * torch.randn(shape, generator=g, device=device) * (on * 1.0 + 0.05)
            writers[f"expert{i}"][0](name, (base + tau).to(torch.bfloat16).cpu())
            own = torch.randn(shape, generator=g, device=device)
            v = torch.exp(shared + row_level + 0.7 * own - 20.0)
            moments[i].add(name, v.float().cpu())
            del tau, own, v
        del base, shared, row_level
    for n in names:
        writers[n][1]()
    for m in moments.values():
        m.close()
    n = sum(torch.Size(s).numel() for s in shapes.values())
    return {"layers": layers, "experts": experts, "params_per_model": n, "bytes": zoo_bytes(shapes, experts),
            "shapes": {k: v for k, v in shapes_of.items()}}
