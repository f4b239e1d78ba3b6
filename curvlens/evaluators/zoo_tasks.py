"""The demo zoo's capabilities as local lm-eval tasks (YAML + JSONL), scored exactly
as :func:`curvlens.zoo.evaluate` scores them.

What makes the harness's number equal the zoo's, item for item:

* the same items: each capability's held-out set (:func:`curvlens.zoo.evaluate.eval_sets`)
  in a JSONL file of ``{"prompt", "answer"}``;
* the same input ids: the prompt after ``<bos>`` and nothing else (the zoo's
  character tokenizer adds no special token itself; lm-eval sees the leading
  ``<bos>`` and adds none either), zero-shot (``num_fewshot: 0`` in the file, which
  lm-eval never overrides);
* the same decoding: greedy, for one token more than the longest answer, cut at
  the first ``<eos>``;
* the same rule: ``exact_match`` of the text against the answer, case and
  punctuation kept.

One difference is left, by design of lm-eval: it decodes an answer with special
tokens skipped, the zoo with them kept, so an answer with ``<pad>``/``<bos>``/
``<unk>`` *inside* it (a degenerate model) could count for the harness and not
for the zoo. The tests compare both on every zoo model they score.

The quick and default presets with seed 0 (the demo zoo) are shipped with
curvlens (:func:`zoo_tasks` without ``out``); any other zoo's are written on
request.
"""
from __future__ import annotations

import json
from pathlib import Path

from curvlens.errors import CurvlensError
from curvlens.io.atomic import AtomicDir

#: Where the shipped task dirs are (``<preset>-seed0/``).
SHIPPED = Path(__file__).resolve().parent / "zoo_task_files"

_YAML = """\
# The curvlens demo zoo's {capability!r} capability ({config} zoo, seed {seed}) as a
# local lm-eval task: the zoo's own held-out items ({data}), prompt after <bos>,
# greedy decoding cut at <eos>, exact match (curvlens.zoo.evaluate, item for item).
# Written by curvlens.evaluators.zoo_tasks; data_files is relative to this file.
task: {capability}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "<bos>{{{{prompt}}}}"
doc_to_target: answer
num_fewshot: 0
generation_kwargs:
  until: ["<eos>"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def zoo_tasks(zoo="quick", *, seed: int | None = None, out=None, overwrite: bool = False) -> Path:
    """The dir of lm-eval task files for a zoo's capabilities (``include_path=`` it).

    Parameters
    ----------
    zoo : Zoo, ZooConfig or {"quick", "default"}
        Whose held-out items to write (a :class:`curvlens.zoo.Zoo` brings its seed).
    seed : int, optional
        The zoo's seed (default: the Zoo's, else 0).
    out : path, optional
        Write the files here (atomically; never onto an input). Without it, the
        shipped files of the quick or default preset with seed 0.
    overwrite : bool
        Replace an existing ``out``.

    Returns
    -------
    Path
        A dir with ``<capability>.yaml`` and ``<capability>.jsonl`` per capability;
        each task is named after its capability (``addition``, ...), so the
        harness's scores carry the same keys as ``zoo.evaluator()``'s.

    Examples
    --------
    >>> sorted(p.name for p in zoo_tasks("quick").glob("*.yaml"))
    ['addition.yaml', 'brackets.yaml', 'facts.yaml', 'transform.yaml']
    """
    from curvlens.zoo.config import PRESETS, resolve_config

    config = resolve_config(getattr(zoo, "config", zoo))
    seed = getattr(zoo, "seed", 0) if seed is None else seed
    if out is None:
        shipped = SHIPPED / f"{config.name}-seed{seed}"
        if config.name not in PRESETS or config != PRESETS[config.name] or seed != 0 or not shipped.is_dir():
            raise CurvlensError(f"curvlens ships lm-eval tasks for the quick and default zoos with seed 0; for "
                                f"this zoo ({config.name}, seed {seed}) write them with zoo_tasks(zoo, out=DIR)")
        return shipped
    out = Path(out)
    with AtomicDir(out, overwrite=overwrite, inputs=[SHIPPED, getattr(zoo, "root", None)]) as tmp:
        for name, text in task_files(config, seed).items():
            (tmp / name).write_text(text, encoding="utf-8")
    return out


def task_files(config, seed: int) -> dict[str, str]:
    """File name -> text of every task file of the zoo ``config`` with ``seed``."""
    from curvlens.zoo.evaluate import eval_sets

    files = {}
    for capability, examples in eval_sets(config, seed).items():
        data = f"{capability}.jsonl"
        files[data] = "".join(json.dumps({"prompt": ex.prompt, "answer": ex.answer}) + "\n" for ex in examples)
        # as the zoo decodes: one token past the longest answer (room for <eos>)
        max_gen = max(len(ex.answer) for ex in examples) + 1
        files[f"{capability}.yaml"] = _YAML.format(capability=capability, config=config.name, seed=seed, data=data,
                                                   max_gen_toks=max_gen)
    return files
