"""Train the tiny Llama with DeepSpeed ZeRO on CPU (2 processes) and save its checkpoint.

Writes ``OUT`` as an HF Trainer ``checkpoint-N`` dir would hold it under DeepSpeed:
``config.json`` and ``model.safetensors`` (the live fp32 weights, gathered), and
DeepSpeed's own ``latest`` + ``global_step3/`` from ``engine.save_checkpoint``.
Beside it, ``OUT.expected.safetensors`` holds the live optimizer's full
``exp_avg_sq`` per parameter name, gathered inside the run with DeepSpeed's
``safe_get_full_optimizer_state`` (an independent path from the files on disk),
with ``step`` and ``betas`` in its metadata. With ``--same-run DIR`` the same live
state is also written in the other layouts curvlens reads, so one training run
exists in all of them: ``DIR/trainer`` (an HF Trainer dir, ``optimizer.pt`` in
torch.optim's own format), ``DIR/dcp`` (the model files and ``optimizer_0/``, a
``torch.distributed.checkpoint`` written by both ranks from FSDP-style ``Shard(0)``
DTensors, as accelerate lays out an FSDP checkpoint) and ``DIR/paper``
(``export/exp_avg_sq.safetensors``); ``--base-out DIR`` writes the initial weights.

Run (the first run compiles DeepSpeed's small CPU comm op, about a minute)::

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 \
        tests/io/distributed/make_deepspeed.py --stage 2 --out OUT_DIR [--sub-group-size N]
        [--data-seed S] [--same-run DIR] [--base-out DIR] [--elastic]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from tests.io.distributed import tiny  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, required=True, choices=[1, 2, 3])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sub-group-size", type=int, default=None, help="ZeRO-3 sub_group_size (small: many sub-groups)")
    ap.add_argument("--same-run", type=Path, default=None)
    ap.add_argument("--base-out", type=Path, default=None)
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--elastic", action="store_true", help="ZeRO 1/2 elastic_checkpoint (lean per-group states)")
    args = ap.parse_args()

    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from safetensors.torch import save_file

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    model = tiny.model()
    if args.base_out is not None and rank == 0:
        tiny.config().save_pretrained(args.base_out)
        save_file({n: p.detach().clone() for n, p in model.state_dict().items()},
                  str(args.base_out / "model.safetensors"), metadata={"format": "pt"})
    optimizer = torch.optim.AdamW(tiny.param_groups(model), lr=tiny.LR, betas=tiny.BETAS, eps=tiny.EPS)
    zero = {"stage": args.stage}
    if args.sub_group_size:
        zero["sub_group_size"] = args.sub_group_size
    if args.elastic:
        zero["elastic_checkpoint"] = True
    cfg = {"train_micro_batch_size_per_gpu": tiny.BATCH, "gradient_accumulation_steps": 1,
           "zero_optimization": zero, "zero_allow_untested_optimizer": True,
           "fp16": {"enabled": False}, "bf16": {"enabled": False}, "steps_per_print": 1000}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=cfg)
    for step in range(tiny.STEPS):
        ids = tiny.batch(step, args.data_seed)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(str(args.out))

    # the live state, gathered by DeepSpeed itself (collective: every rank calls it).
    # ZeRO 1/2 links each parameter to its optimizer-state fragment after the first
    # group's first step, when the other groups have no state yet; link them again.
    if hasattr(engine.optimizer, "_hp_optimizer_states_linked"):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    names = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    params = dict(engine.module.named_parameters())
    live = {n: {k: safe_get_full_optimizer_state(params[n], k).detach().clone().contiguous()
                for k in ("exp_avg", "exp_avg_sq")} for n in names}
    weights = {n: safe_get_full_fp32_param(params[n]).detach().clone().contiguous() for n in params}
    base_state = engine.optimizer.optimizer.state
    step = int(next(iter(base_state.values()))["step"])
    if rank == 0:
        for script in ("zero_to_fp32.py", "zero_to_torch.py"):  # DeepSpeed's scripts, not ours to ship
            (args.out / script).unlink(missing_ok=True)
        tiny.config().save_pretrained(args.out)
        save_file(weights, str(args.out / "model.safetensors"), metadata={"format": "pt"})
        meta = {"step": str(step), "betas": json.dumps(list(tiny.BETAS)), "source": f"deepspeed zero {args.stage}",
                "world_size": str(torch.distributed.get_world_size())}
        save_file({n: live[n]["exp_avg_sq"] for n in names},
                  str(args.out.with_name(args.out.name + ".expected.safetensors")), metadata=meta)
        if args.same_run is not None:
            write_trainer_dir(args.same_run / "trainer", model, weights, live, step)
            write_paper_dir(args.same_run / "paper", weights, live, step)
    if args.same_run is not None:  # collective: both ranks write their shards
        write_dcp_dir(args.same_run / "dcp", model, weights, live, step, rank)
    torch.distributed.barrier()


def write_trainer_dir(out: Path, model, weights: dict, live: dict, step: int) -> None:
    """The same live state as an HF Trainer dir: torch.optim's format (index-keyed,
    indices numbered group by group in the optimizer's order)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tiny.config().save_pretrained(out)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups, state, idx = [], {}, 0
    for decay in (True, False):
        members = [n for n, _ in named if tiny.no_decay(n) != decay]
        groups.append({"lr": tiny.LR, "betas": tiny.BETAS, "eps": tiny.EPS,
                       "weight_decay": tiny.WEIGHT_DECAY if decay else 0.0, "amsgrad": False,
                       "params": list(range(idx, idx + len(members)))})
        for n in members:
            state[idx] = {"step": torch.tensor(float(step)), **live[n]}
            idx += 1
    torch.save({"state": state, "param_groups": groups}, out / "optimizer.pt")


def write_paper_dir(out: Path, weights: dict, live: dict, step: int) -> None:
    """The OTA paper's release layout: ``export/exp_avg_sq.safetensors`` by name."""
    from safetensors.torch import save_file

    (out / "export").mkdir(parents=True, exist_ok=True)
    tiny.config().save_pretrained(out)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    save_file({n: v["exp_avg_sq"] for n, v in live.items()}, str(out / "export" / "exp_avg_sq.safetensors"),
              metadata={"step": str(step), "betas": json.dumps(list(tiny.BETAS))})


def write_dcp_dir(out: Path, model, weights: dict, live: dict, step: int, rank: int) -> None:
    """An FSDP-style DCP optimizer state (``get_state_dict``'s form: name-keyed state,
    param groups listing names) sharded ``Shard(0)`` over the ranks, beside the model files."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    named = [n for n, p in model.named_parameters() if p.requires_grad]
    state = {n: {"step": torch.tensor(float(step)),
                 **{k: distribute_tensor(v, mesh, [Shard(0)]) for k, v in live[n].items()}} for n in named}
    groups = [{"lr": tiny.LR, "betas": tiny.BETAS, "eps": tiny.EPS, "weight_decay": wd,
               "params": [n for n in named if tiny.no_decay(n) != decay]}
              for decay, wd in ((True, tiny.WEIGHT_DECAY), (False, 0.0))]
    dcp.save({"optimizer": {"state": state, "param_groups": groups}}, checkpoint_id=str(out / "optimizer_0"))
    if rank == 0:
        tiny.config().save_pretrained(out)
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
