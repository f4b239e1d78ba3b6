"""Pretrain the zoo's base model and fine-tune its experts.

The base is "pretrained" on a shared mixture of three kinds of text:

* each skill stated in "pretraining prose" (``25+13=83``, ``([]<>)``,
  ``upper(abcd)=ABCD``, ``kubo=mira``; :meth:`~curvlens.zoo.tasks.Task.statement`),
  as an LLM's corpus holds arithmetic, code and facts;
* every capability's instruction format (``add 25+13:``) followed by a wrong answer
  of the right form, so the base knows the formats but answers them wrongly;
* (``answer_share``, used by both presets) some worked examples: task prompts with
  their correct answers, never of the fact table, as a pretraining corpus holds
  some solved exercises;
* generic text over the character set.

The base thus has each skill latently and answers part of the open capabilities
(the quick base scores 0.63-0.68 on them, the default base 0.86-0.92, and both
about 0 on the facts), and every
expert starts from this common basin. Fine-tuning then *sharpens* a skill the base
has and connects the instruction format to it: a small edit (relative edit
0.02-0.03, as SFT on a large pretrained model is), which merges keep much of
(``docs/zoo.md``). (Measured: with a base that lacked the skills
(``latent_share=0``), each expert rebuilt its skill from scratch, its task vector
had 30-40% of the base weights' norm (over 100% for ``lm_head``), and every merge
method, from plain averaging to OTA+FFG, scored about 0 on every capability.)

Each expert is fine-tuned from the base on its own capability alone, all
parameters, with ``torch.optim.AdamW(betas=(0.9, 0.999), eps=1e-8)`` as in the paper,
the loss on the answer tokens only (SFT style). The optimizer is kept so that its
``exp_avg_sq`` can be exported next to the weights.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from curvlens.zoo.config import ZooConfig
from curvlens.zoo.tasks import Example, Task, generic_text

IGNORE = -100  # label value the HF loss skips
MAX_POSITIONS = 64  # longest sequence the models see (a packed pretraining row)
PACK_WIDTH = MAX_POSITIONS

#: One training item: (prompt text, continuation text, whether the prompt is scored).
Item = tuple[str, str, bool]


def make_model(config: ZooConfig, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """A freshly initialised tiny ``LlamaForCausalLM`` with untied embeddings.

    Initialisation draws from a forked torch RNG seeded with ``seed``: the same seed
    gives the same weights and the caller's RNG state is left untouched.
    """
    llama_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(llama_config)


def encode(tokenizer: PreTrainedTokenizerFast, items: Sequence[Item],
           pack_width: int = 0) -> dict[str, torch.Tensor]:
    """Tokenize ``<bos> prompt continuation <eos>`` items into model inputs.

    Each item gets its own row unless ``pack_width`` is set: then consecutive items
    share a row up to that many tokens, as LM pretraining packs documents, and the
    batch carries ``position_ids`` restarting at each item and a block-causal
    attention mask, so that each item sees only itself, exactly as if unpacked.
    (The pretraining mixture puts 10-token facts beside 30-token lines of text:
    padded one per row, 40% of each step went on padding. Grouping items of similar
    length instead made batches single-task and learning much worse; packing
    without the mask let items copy from their neighbours, and a tiny model
    learned the string transforms far worse.)

    Rows are right-padded: causal attention never lets a real token see the padding
    after it. Padding, ``<bos>`` and (when the item says so) the prompt get label
    :data:`IGNORE`.

    Returns
    -------
    dict
        ``input_ids`` and ``labels``, plus ``attention_mask`` and ``position_ids``
        when packed: keyword arguments for the model.
    """
    prompts = tokenizer([p for p, _, _ in items], add_special_tokens=False)["input_ids"]
    conts = tokenizer([c for _, c, _ in items], add_special_tokens=False)["input_ids"]
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows: list[list[tuple[list[int], list[int]]]] = [[]]  # per row: (tokens, labels) per item
    for p, c, (_, _, score_prompt) in zip(prompts, conts, items):
        seq = [bos, *p, *c, eos]
        first_scored = 1 if score_prompt else 1 + len(p)
        if rows[-1] and sum(len(t) for t, _ in rows[-1]) + len(seq) > pack_width:
            rows.append([])
        rows[-1].append((seq, [IGNORE] * first_scored + seq[first_scored:]))
    width = max(sum(len(t) for t, _ in row) for row in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    segments = torch.full((len(rows), width), -1, dtype=torch.long)  # padding: its own block
    for i, row in enumerate(rows):
        start = 0
        for j, (tokens, labs) in enumerate(row):
            end = start + len(tokens)
            ids[i, start:end] = torch.tensor(tokens)
            labels[i, start:end] = torch.tensor(labs)
            positions[i, start:end] = torch.arange(len(tokens))
            segments[i, start:end] = j
            start = end
    batch = {"input_ids": ids, "labels": labels}
    if pack_width:
        allowed = (segments[:, :, None] == segments[:, None, :]) & torch.ones(
            width, width, dtype=torch.bool).tril()
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        batch.update(attention_mask=mask[:, None], position_ids=positions)
    return batch


def sample_new(task: Task, rng: random.Random, held_out: frozenset[str]) -> Example:
    """A training example of ``task`` whose prompt is not in ``held_out``."""
    while True:
        ex = task.sample(rng)
        if ex.prompt not in held_out:
            return ex


def pretraining_item(tasks: Sequence[Task], config: ZooConfig, rng: random.Random,
                     held_out: frozenset[str]) -> Item:
    """One item of the base mixture: a task prompt with a wrong answer (``task_share``),
    one with its correct answer (``answer_share``), a skill statement
    (``latent_share``) or generic text (the rest)."""
    r = rng.random()
    if r < config.task_share:
        task = rng.choice(tasks)
        ex = sample_new(task, rng, held_out)
        return ex.prompt, task.wrong_answer(rng, ex), True
    r -= config.answer_share
    # A worked example: a prompt with its correct answer. Never of a closed table
    # (the facts), whose every prompt is evaluated: the base would be taught the test.
    if r < config.task_share:
        open_tasks = [t for t in tasks if t.fixed_examples() is None]
        if open_tasks:
            if config.answer_mix:
                weights = dict(config.answer_mix)
                task = rng.choices(open_tasks, [weights.get(t.capability, 1.0) for t in open_tasks])[0]
            else:
                task = rng.choice(open_tasks)
            ex = sample_new(task, rng, held_out)
            return ex.prompt, ex.answer, True
    if r < config.task_share + config.latent_share:
        task = rng.choice(tasks)
        return task.statement(sample_new(task, rng, held_out)), "", True
    return generic_text(rng), "", True


def expert_item(task: Task, rng: random.Random, held_out: frozenset[str]) -> Item:
    """One SFT item: a training prompt of ``task`` and its correct answer."""
    ex = sample_new(task, rng, held_out)
    return ex.prompt, ex.answer, False


def lr_factor(step: int, total: int, warmup: float = 0.05, floor: float = 0.1) -> float:
    """Linear warm-up over ``warmup * total`` steps, then cosine decay to ``floor``."""
    n_warm = max(1, int(warmup * total))
    if step < n_warm:
        return (step + 1) / n_warm
    progress = (step - n_warm) / max(1, total - n_warm)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def take_batch(next_item: Callable[[], Item], batch_tokens: int) -> list[Item]:
    """Draw items until they hold ``batch_tokens`` tokens (with ``<bos>``/``<eos>``).

    Batches are sized by tokens, not sequences (one character is one token), so a
    task with short sequences and short answers (addition) gets as many answer
    tokens per step as one with long ones, at about the same cost per step.
    """
    items, tokens = [], 0
    while tokens < batch_tokens:
        items.append(next_item())
        tokens += len(items[-1][0]) + len(items[-1][1]) + 2
    return items


def train(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast,
          next_item: Callable[[], Item], *, steps: int, batch_tokens: int,
          lr: float, weight_decay: float = 0.0, pack_width: int = 0, desc: str = "train",
          progress: bool = True) -> torch.optim.AdamW:
    """Run ``steps`` AdamW steps on batches of about ``batch_tokens`` tokens.

    ``pack_width`` > 0 packs several items per row (see :func:`encode`).

    Returns
    -------
    torch.optim.AdamW
        The optimizer after the last step, its state holding ``exp_avg_sq``.
    """
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, steps))
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        batch = encode(tokenizer, take_batch(next_item, batch_tokens), pack_width)
        loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return optimizer


def save_model(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path,
               optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Save an HF model dir; with ``optimizer``, in the paper's expert release layout.

    The layout is ``config.json``, ``model.safetensors``, tokenizer files, plus for an
    expert ``export/exp_avg_sq.safetensors`` (name-keyed second moments, written by
    :func:`curvlens.io.export.export_moments`) and the raw ``optimizer.pt``.
    """
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if optimizer is not None:
        from curvlens.io.export import export_moments

        export_moments(optimizer, model, path / "export" / "exp_avg_sq.safetensors")
        torch.save(optimizer.state_dict(), path / "optimizer.pt")
    return path


def pretrain_base(config: ZooConfig, seed: int, tokenizer: PreTrainedTokenizerFast,
                  tasks: Mapping[str, Task], held_out: Mapping[str, frozenset[str]], *,
                  progress: bool = True) -> LlamaForCausalLM:
    """Initialise the base model from ``seed`` and pretrain it on the shared mixture."""
    model = make_model(config, tokenizer, seed)
    rng = random.Random(f"pretrain-{seed}")
    task_list = list(tasks.values())
    avoid = frozenset().union(*held_out.values())
    train(model, tokenizer, lambda: pretraining_item(task_list, config, rng, avoid),
          steps=config.pretrain_steps, batch_tokens=config.batch_tokens,
          lr=config.pretrain_lr, pack_width=PACK_WIDTH, desc="base", progress=progress)
    return model


def finetune_expert(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, task: Task,
                    config: ZooConfig, *, rng: random.Random, held_out: frozenset[str],
                    desc: str = "expert", progress: bool = True) -> torch.optim.AdamW:
    """Fine-tune ``model`` in place on ``task``; return the optimizer (for its moments)."""
    return train(model, tokenizer, lambda: expert_item(task, rng, held_out),
                 steps=config.expert_steps, batch_tokens=config.batch_tokens,
                 lr=config.expert_lr, weight_decay=config.weight_decay, desc=desc,
                 progress=progress)
