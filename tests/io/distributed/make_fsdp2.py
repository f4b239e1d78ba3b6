"""Train the tiny Llama with FSDP2 (``fully_shard``, gloo, CPU, 2 processes) and save
it with ``torch.distributed.checkpoint`` from ``get_state_dict(model, optimizer)``.

Writes ``OUT`` as an expert dir: ``config.json`` and ``model.safetensors`` (the live
weights, gathered) and ``OUT/dcp/`` (``.metadata`` + ``__R_0.distcp``, holding
``{"model": ..., "optim": ...}`` as FSDP2 shards them: uneven ``Shard(0)`` pieces).
Beside it, ``OUT.expected.safetensors`` holds the full ``exp_avg_sq`` per name
gathered from the live optimizer's DTensors (``full_tensor()``), with ``step`` and
``betas`` in its metadata.

Run::

    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 tests/io/distributed/make_fsdp2.py --out OUT_DIR
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from tests.io.distributed import tiny  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = tiny.model()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(tiny.param_groups(model), lr=tiny.LR, betas=tiny.BETAS, eps=tiny.EPS)
    for step in range(tiny.STEPS):
        ids = tiny.batch(step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(args.out / "dcp"))

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    live = {n: osd["state"][n]["exp_avg_sq"].full_tensor().detach().clone() for n in names}
    weights = {n: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone() for n, v in msd.items()}
    step = int(osd["state"][names[0]]["step"])
    if rank == 0:
        tiny.config().save_pretrained(args.out)
        save_file(weights, str(args.out / "model.safetensors"), metadata={"format": "pt"})
        meta = {"step": str(step), "betas": json.dumps(list(tiny.BETAS)), "source": "fsdp2 dcp",
                "world_size": str(dist.get_world_size())}
        save_file(live, str(args.out.with_name(args.out.name + ".expected.safetensors")), metadata=meta)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
