"""Write a synthetic expert zoo of any size, one tensor at a time (bigger than RAM).

usage: python benchmarks/make_big_zoo.py OUT_DIR [--hidden 2048 --layers 31 --inter 5632 --vocab 32000
                                                  --experts 3 --shard-gb 2]

The layout and the statistics of ``../shared/bench/make_zoo.py`` (a Llama base in
bf16 sharded safetensors with its index and config, ``expert{i}/`` dirs with
``export/exp_avg_sq.safetensors`` fp32 moments; row/column-structured edits,
heavy-tailed moments shared across experts), but streamed: every file's header
is written first from the shapes, then each tensor's bytes as it is generated,
so peak memory is one tensor (the defaults make 1.53B parameters x 3 experts,
30.6 GB on disk). The random draws are cheaper than make_zoo's (each expert's
noise is a rolled copy of one draw per tensor), which changes nothing a reader
or a benchmark sees.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import torch

_ST = {torch.bfloat16: "BF16", torch.float32: "F32"}


def llama_shapes(h: int, layers: int, inter: int, vocab: int) -> dict[str, tuple]:
    kvh = max(1, (h // 64) // 4) * 64
    shapes = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kvh, h),
                       p + "self_attn.v_proj.weight": (kvh, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (vocab, h)
    return shapes


def config(h: int, layers: int, inter: int, vocab: int) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": max(1, h // 64),
            "num_key_value_heads": max(1, (h // 64) // 4), "vocab_size": vocab, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu",
            "rope_theta": 10000.0}


class StreamingFile:
    """A safetensors file written tensor by tensor in a fixed order: the header
    (every name, dtype, shape and offset) first, then the bytes as they come."""

    def __init__(self, path: Path, entries: list[tuple[str, tuple, torch.dtype]]):
        self.entries, self.pos = entries, 0
        head, off = {}, 0
        for name, shape, dtype in entries:
            n = math.prod(shape) * dtype.itemsize
            head[name] = {"dtype": _ST[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
            off += n
        head["__metadata__"] = {"format": "pt"}
        raw = json.dumps(head, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.fh = open(path, "wb")
        self.fh.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, name: str, t: torch.Tensor) -> None:
        want, shape, dtype = self.entries[self.pos]
        assert name == want and tuple(t.shape) == tuple(shape) and t.dtype == dtype, (name, want)  # noqa: S101
        self.fh.write(t.contiguous().view(torch.uint8).numpy().tobytes())
        self.pos += 1

    def close(self) -> None:
        assert self.pos == len(self.entries)  # noqa: S101
        self.fh.close()


def shard_plan(shapes: dict, shard_bytes: int) -> list[list[str]]:
    shards, cur, size = [], [], 0
    for k, s in shapes.items():
        nb = math.prod(s) * 2
        if cur and size + nb > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += nb
    return shards + ([cur] if cur else [])


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=31)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    shapes = llama_shapes(a.hidden, a.layers, a.inter, a.vocab)
    cfg = config(a.hidden, a.layers, a.inter, a.vocab)
    shards = shard_plan(shapes, int(a.shard_gb * 2**30))
    models = ["base"] + [f"expert{i}" for i in range(a.experts)]
    files: dict[str, dict[str, StreamingFile]] = {}
    for m in models:
        d = a.out / m
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(cfg, indent=1))
        wmap, per = {}, {}
        for j, names in enumerate(shards):
            fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
            per[fname] = StreamingFile(d / fname, [(n, shapes[n], torch.bfloat16) for n in names])
            wmap.update({n: fname for n in names})
        total = sum(math.prod(s) * 2 for s in shapes.values())
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": wmap}, indent=1))
        files[m] = {n: per[f] for n, f in wmap.items()}
        if m != "base":
            (d / "export").mkdir(exist_ok=True)
            files[m + "/v"] = StreamingFile(d / "export" / "exp_avg_sq.safetensors",
                                            [(n, shapes[n], torch.float32) for n in shapes])
    g = torch.Generator().manual_seed(a.seed)
    for k, s in shapes.items():
        base = (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
        files["base"][k].write(k, base)
        shared_v = torch.randn(s, generator=g).mul_(2.0).sub_(18.0)
        noise = torch.randn(s, generator=g)
        if len(s) == 2:
            scale = (0.2 + 4 * (torch.rand(s[0], 1, generator=g) ** 4) * (torch.rand(1, s[1], generator=g) ** 4))
        else:
            scale = torch.ones(s)
        for e in range(a.experts):
            rolled = torch.roll(noise, shifts=(e * 7919) % noise.numel() if noise.dim() == 1 else (e * 31,),
                                dims=0 if noise.dim() == 1 else (0,))
            w = (base.float() + rolled * 1e-3 * scale).to(torch.bfloat16)
            files[f"expert{e}"][k].write(k, w)
            v = torch.exp(shared_v + 0.7 * torch.roll(rolled, shifts=1, dims=-1))
            files[f"expert{e}/v"].write(k, v)
            del w, v, rolled
        del base, shared_v, noise, scale
    closed = set()
    for per in files.values():
        for f in (per.values() if isinstance(per, dict) else [per]):
            if id(f) not in closed:
                f.close()
                closed.add(id(f))
    n = sum(math.prod(s) for s in shapes.values())
    size = sum(p.stat().st_size for p in a.out.rglob("*.safetensors"))
    print(f"zoo at {a.out}: {n / 1e9:.2f}B params x {a.experts} experts, {size / 2**30:.1f} GiB on disk")
    os.sync()


if __name__ == "__main__":
    main()
