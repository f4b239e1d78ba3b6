"""Fine-tune the tiny Llama with the HF ``Trainer`` under DeepSpeed ZeRO (CPU, 2
processes) and check nothing itself: writes ``OUT/checkpoint-3/`` as the Trainer
does (model files, ``latest``, ``global_step3/``) and ``OUT.expected.safetensors``,
the live optimizer's full ``exp_avg_sq`` per name gathered at the end of training.

Run::

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 \
        tests/io/distributed/make_trainer_deepspeed.py --stage 2 --out OUT_DIR
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from tests.io.distributed import tiny  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, required=True, choices=[1, 2, 3])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    from deepspeed.utils import safe_get_full_optimizer_state
    from safetensors.torch import save_file
    from transformers import Trainer, TrainerCallback, TrainingArguments

    data = [{"input_ids": tiny.batch(s)[i], "labels": tiny.batch(s)[i]} for s in range(tiny.STEPS)
            for i in range(tiny.BATCH)]
    ds_config = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                 # ZeRO-3: the usual recipe, so the Trainer writes model.safetensors beside the shards
                 "zero_optimization": {"stage": args.stage, "stage3_gather_16bit_weights_on_model_save": True},
                 "zero_allow_untested_optimizer": True,
                 "bf16": {"enabled": False}, "fp16": {"enabled": False}}
    targs = TrainingArguments(output_dir=str(args.out), per_device_train_batch_size=1, max_steps=tiny.STEPS,
                              save_steps=tiny.STEPS, learning_rate=tiny.LR, weight_decay=tiny.WEIGHT_DECAY,
                              adam_beta1=tiny.BETAS[0], adam_beta2=tiny.BETAS[1], adam_epsilon=tiny.EPS,
                              lr_scheduler_type="constant", report_to=[], deepspeed=ds_config, logging_steps=100,
                              dataloader_drop_last=True, seed=0)
    live = {}

    class Gather(TrainerCallback):
        def on_train_end(self, a, state, control, model=None, **kw):
            engine = trainer.model_wrapped
            if hasattr(engine.optimizer, "_hp_optimizer_states_linked"):  # see make_deepspeed.py
                engine.optimizer._hp_optimizer_states_linked = False
                engine.optimizer._lazy_init_hp_params_optimizer_state()
            for n, p in engine.module.named_parameters():
                live[n] = safe_get_full_optimizer_state(p, "exp_avg_sq").detach().clone().contiguous()

    trainer = Trainer(model=tiny.model(), args=targs, train_dataset=data, callbacks=[Gather()])
    trainer.train()
    if torch.distributed.get_rank() == 0:
        save_file(live, str(args.out.with_name(args.out.name + ".expected.safetensors")),
                  metadata={"step": str(tiny.STEPS)})
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
