"""Score a model on the zoo's capabilities: exact match of greedy answers.

Each capability has a held-out evaluation set fixed by the zoo's config and seed
(:func:`curvlens.zoo.tasks.eval_examples`): prompts the experts never trained on,
except for the fact table, which is evaluated whole because recall of a fixed table
is the capability. A model answers by greedy decoding; the answer is everything it
writes before ``<eos>`` and counts only if it equals the target exactly.

Decoding batches prompts of equal token length together, so no padding is needed
and a prompt's answer never depends on which other prompts share its batch.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import groupby
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from curvlens.errors import CurvlensError, check_choice
from curvlens.zoo.config import ZooConfig
from curvlens.runtime import torch_threads
from curvlens.zoo.runtime import hf_progress_bars_off
from curvlens.zoo.tasks import Example, eval_examples, make_tasks

#: A function from a list of prompts to the list of answers a model gives.
GenerateFn = Callable[[Sequence[str]], list[str]]


def score(generate: GenerateFn, eval_sets: Mapping[str, Sequence[Example]]) -> pd.DataFrame:
    """Exact-match accuracy of ``generate`` on each evaluation set.

    Parameters
    ----------
    generate : callable
        Maps a list of prompts to the list of answers (same length, same order).
    eval_sets : mapping
        Capability name -> its examples.

    Returns
    -------
    pandas.DataFrame
        Columns ``capability, accuracy, n, correct``, one row per capability;
        ``correct`` holds each prompt's result in the order of its set, ``"T"``
        right and ``"F"`` wrong (what a bootstrap over items resamples:
        :func:`curvlens.studies.item_bootstrap.item_matrix`).

    Examples
    --------
    >>> sets = {"echo": [Example("a:", "a"), Example("b:", "b")]}
    >>> score(lambda prompts: [p[0] for p in prompts], sets)
      capability  accuracy  n correct
    0       echo       1.0  2      TT
    >>> score(lambda prompts: ["a", "c"], sets)["correct"].item()
    'TF'
    """
    rows = []
    for capability, examples in eval_sets.items():
        answers = generate([ex.prompt for ex in examples])
        if len(answers) != len(examples):
            raise CurvlensError(
                f"generate returned {len(answers)} answers for {len(examples)} "
                f"{capability!r} prompts; expected one answer per prompt"
            )
        right = [a == ex.answer for a, ex in zip(answers, examples)]
        rows.append((capability, sum(right) / len(examples), len(examples), encode_correct(right)))
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


#: What :func:`score` and :func:`evaluate` return.
SCORE_COLUMNS = ["capability", "accuracy", "n", "correct"]


def encode_correct(right: Sequence[bool]) -> str:
    """Per-item results as one string, ``"T"`` right and ``"F"`` wrong (letters, so
    that a CSV reader keeps it a string, leading results included).

    Examples
    --------
    >>> encode_correct([True, False, True])
    'TFT'
    """
    return "".join("T" if r else "F" for r in right)


@torch.inference_mode()
def greedy_answers(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], *,
                   max_new_tokens: int, batch_size: int = 256,
                   device: str | torch.device = "cpu") -> list[str]:
    """Greedy-decode an answer for every prompt (``<bos>`` is prepended).

    Generation runs for ``max_new_tokens`` steps with a KV cache; each answer is cut
    at its first ``<eos>``.
    """
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    answers: list[str] = [""] * len(prompts)
    eos = tokenizer.eos_token_id
    for _, group in groupby(order, key=lambda i: len(encoded[i])):
        group = list(group)
        for start in range(0, len(group), batch_size):
            rows = group[start : start + batch_size]
            ids = torch.tensor([[tokenizer.bos_token_id, *encoded[i]] for i in rows], device=device)
            out = model(input_ids=ids, use_cache=True)
            generated = []
            for _ in range(max_new_tokens):
                next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
                generated.append(next_ids)
                out = model(input_ids=next_ids, past_key_values=out.past_key_values, use_cache=True)
            for i, seq in zip(rows, torch.cat(generated, 1).tolist()):
                seq = seq[: seq.index(eos)] if eos in seq else seq
                answers[i] = tokenizer.decode(seq, skip_special_tokens=False)
    return answers


def eval_sets(config: ZooConfig, seed: int,
              capabilities: Iterable[str] | None = None) -> dict[str, tuple[Example, ...]]:
    """Capability -> held-out examples, for the zoo built from ``config`` and ``seed``."""
    tasks = make_tasks(config, seed)
    names = list(tasks) if capabilities is None else [
        check_choice("capabilities", c, tasks) for c in capabilities
    ]
    return {c: eval_examples(tasks[c], config.n_eval, seed) for c in names}


def load_model(model: Any, base_dir: Path | None, device: str | torch.device = "cpu"):
    """(model, tokenizer) from an HF dir, or from weights laid onto the base architecture.

    ``model`` is an HF model dir, or any mapping name -> tensor with ``keys()`` and
    ``[name]`` (a ``curvlens.Checkpoint``, a state dict); in the latter case the
    config and tokenizer come from ``base_dir``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(model, (str, Path)):
        if not Path(model).is_dir():
            raise CurvlensError(f"evaluate: {model} is not a directory; expected an HF model dir")
        # a dir from elsewhere may carry auto_map: never run it, never ask
        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
        net = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=False)
    elif hasattr(model, "keys") and hasattr(model, "__getitem__"):
        tokenizer = AutoTokenizer.from_pretrained(base_dir, trust_remote_code=False)
        net = AutoModelForCausalLM.from_pretrained(base_dir, trust_remote_code=False)
        expected = set(net.state_dict())
        got = set(model.keys())
        if got != expected:
            raise CurvlensError(
                "evaluate: the weights do not match the zoo's architecture; "
                f"missing {sorted(expected - got)[:5]}, unexpected {sorted(got - expected)[:5]}"
            )
        net.load_state_dict({name: model[name] for name in expected})
    else:
        raise CurvlensError(
            f"evaluate: model is a {type(model).__name__}; expected an HF model dir, "
            "a curvlens.Checkpoint or a state dict"
        )
    # fp32 whatever the weights were stored in (a merge may write bf16).
    return net.to(device=device, dtype=torch.float32).eval(), tokenizer


def evaluate_model(model: Any, capabilities: Iterable[str] | None, config: ZooConfig, seed: int,
                   base_dir: Path | None, *, batch_size: int = 256,
                   device: str | torch.device = "cpu") -> pd.DataFrame:
    """Exact-match accuracy of ``model`` on the held-out prompts of the zoo of
    ``config`` and ``seed`` (:func:`curvlens.zoo.evaluate` with the zoo resolved):
    weights are laid onto the architecture and tokenizer in ``base_dir``."""
    sets = eval_sets(config, seed, capabilities)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    frames = []
    # One thread on CPU: see curvlens.runtime (a loaded machine is 10x slower with more).
    threads = 1 if torch.device(device).type == "cpu" else torch.get_num_threads()
    with torch_threads(threads), hf_progress_bars_off():
        net, tokenizer = load_model(model, base_dir, device)
        for capability, examples in sets.items():
            # One token past the longest target: room for <eos>, or for the extra
            # character that makes an over-long answer wrong.
            max_new = max(len(ex.answer) for ex in examples) + 1
            frames.append(score(
                lambda prompts: greedy_answers(net, tokenizer, prompts, max_new_tokens=max_new,
                                               batch_size=batch_size, device=device),
                {capability: examples},
            ))
    return pd.concat(frames, ignore_index=True)
