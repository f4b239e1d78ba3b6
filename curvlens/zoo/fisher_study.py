"""A data Fisher for every zoo expert, from its own task's training prompts, and
the Fisher-vs-Adam study on the zoo.

:func:`training_batches` draws an expert's SFT items exactly as its fine-tuning
did (a prompt of its task that is not held out for evaluation, and its correct
answer; the loss on the answer tokens only) from its own seeded stream;
:func:`fisher_study` estimates each expert's empirical Fisher on them
(:func:`curvlens.estimate_fisher`) and compares it with the expert's Adam
``exp_avg_sq`` (:func:`curvlens.fisher_vs_adam`), merges scored by the zoo.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from curvlens.errors import CurvlensError, check_choice
from curvlens.zoo.build import Zoo, held_out_prompts
from curvlens.zoo.tasks import make_tasks
from curvlens.zoo.tokenizer import make_tokenizer
from curvlens.zoo.train import encode, expert_item


def training_batches(zoo: Zoo, expert: str, n_examples: int = 256, batch_size: int = 32,
                     seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n_examples`` training items of ``expert``'s task as HF batches.

    Each batch holds ``input_ids``, ``attention_mask`` (1 on real tokens) and
    ``labels`` (-100 on ``<bos>``, the prompt and padding: the SFT loss of
    :mod:`curvlens.zoo.train`), one example per row, right-padded.

    Examples
    --------
    >>> import curvlens as cl                                                # doctest: +SKIP
    >>> b = training_batches(cl.zoo.load("quick"), "math", 8, batch_size=4)  # doctest: +SKIP
    >>> len(b), sorted(b[0])                                                 # doctest: +SKIP
    (2, ['attention_mask', 'input_ids', 'labels'])
    """
    check_choice("expert", expert, zoo.capabilities)
    if isinstance(n_examples, bool) or not isinstance(n_examples, int) or n_examples < 1:
        raise CurvlensError(f"n_examples must be an int >= 1; got {n_examples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CurvlensError(f"batch_size must be an int >= 1; got {batch_size!r}")
    task = make_tasks(zoo.config, zoo.seed)[zoo.capabilities[expert]]
    held_out = held_out_prompts(task, zoo.config, zoo.seed)
    rng = random.Random(f"fisher-{expert}-{zoo.seed}-{seed}")
    tokenizer = make_tokenizer()
    batches = []
    for start in range(0, n_examples, batch_size):
        items = [expert_item(task, rng, held_out) for _ in range(min(batch_size, n_examples - start))]
        b = encode(tokenizer, items)
        lengths = torch.tensor([len(tokenizer(p + c, add_special_tokens=False)["input_ids"]) + 2
                                for p, c, _ in items])
        b["attention_mask"] = (torch.arange(b["input_ids"].shape[1])[None] < lengths[:, None]).long()
        batches.append(b)
    return batches


def fisher_study(zoo: Zoo, out, *, n_examples: int = 256, chunk_size: int = 16, density: float = 0.3,
                 evaluate: bool = True, fisher_merge: bool = True, device="auto", overwrite: bool = False,
                 progress: bool = True):
    """Estimate every expert's Fisher on its training prompts and compare it with Adam v.

    Parameters
    ----------
    zoo : Zoo
    out : path
        Dir receiving one Fisher per expert, ``out/<expert>/export/exp_avg_sq.safetensors``
        (an existing Fisher of ``n_examples`` examples is reused unless ``overwrite``;
        any other file there is an error).
    n_examples, chunk_size
        Examples per expert, and examples per vmapped chunk.
    density : float
        FFG density of the masks and of the OTA+FFG merges compared.
    evaluate : bool
        Score an OTA+FFG merge (``ffg_density=density``) with each curvature on the
        zoo's tasks.
    fisher_merge : bool
        Also score Fisher-weighted averaging (``fisher``) with each curvature.

    Returns
    -------
    pandas.DataFrame
        :func:`curvlens.fisher_vs_adam`'s frame; ``.attrs["fisher_seconds"]`` holds
        the estimation time per expert (absent for reused files).
    """
    from curvlens.io.moments import Moments
    from curvlens.passes.fisher_estimate import estimate_fisher, fisher_path
    from curvlens.studies.fisher_vs_adam import OTA_FFG, fisher_vs_adam

    out = Path(out)
    fishers, seconds = {}, {}
    for name, d in zoo.expert_dirs.items():
        target = out / name
        if fisher_path(target).is_file() and not overwrite:
            found = Moments.open(target)
            meta = found.metadata
            if meta.get("kind") != "empirical_fisher" or meta.get("n_examples") != str(n_examples):
                raise CurvlensError(f"{fisher_path(target)} exists but is not a Fisher of {n_examples} examples "
                                    f"(kind={meta.get('kind')!r}, n_examples={meta.get('n_examples')!r}); "
                                    "pass overwrite=True to replace it")
            fishers[name] = found
            continue
        start = time.perf_counter()
        fishers[name] = estimate_fisher(d, training_batches(zoo, name, n_examples), target,
                                        chunk_size=chunk_size, device=device, overwrite=overwrite,
                                        progress=progress)
        seconds[name] = round(time.perf_counter() - start, 2)
    experts = zoo.experts()
    merges = {"OTA+FFG": ("ota", {**OTA_FFG, "ffg_density": density})}
    if fisher_merge:
        merges["Fisher"] = ("fisher", {})
    df = fisher_vs_adam(experts, fishers, density=density,
                        evaluate=(lambda m: zoo.evaluate(m, device=device)) if evaluate else None,
                        merges=merges, device=device, progress=progress)
    df.attrs["fisher_seconds"] = seconds
    return df
