"""Evaluators for sweeps, soups, fronts and grafting: ``evaluate(model) -> {metric: score}``.

``cl.evaluators.lm_eval(tasks, ...)`` scores a merged model dir with
lm-evaluation-harness (the ``eval`` extra: ``pip install 'curvlens[eval]'``);
``zoo_tasks()`` is the demo zoo's capabilities as local lm-eval tasks, so the zoo
can be scored through the harness too (with the same numbers as
``zoo.evaluator()``); ``score_models`` is what ``curvlens eval`` runs.

Examples
--------
>>> import curvlens as cl                                                # doctest: +SKIP
>>> ev = cl.evaluators.lm_eval(["arc_easy", "gsm8k"], metric={"arc_easy": "acc_norm",
...                                                         "gsm8k": "exact_match,strict-match"})  # doctest: +SKIP
>>> cl.sweep(experts, cl.sweep_grid("ties", density=[0.3, 0.7]), ev, client="local")  # doctest: +SKIP
"""
from __future__ import annotations

from collections.abc import Mapping

from curvlens.evaluators.harness import TESTED_VERSION, LmEvalEvaluator, require_lm_eval
from curvlens.evaluators.table import score_models
from curvlens.evaluators.zoo_tasks import zoo_tasks

__all__ = ["LmEvalEvaluator", "TESTED_VERSION", "lm_eval", "require_lm_eval", "score_models", "zoo_tasks"]


def lm_eval(tasks, *, metric: str | Mapping[str, str] | None = None, limit: int | float | None = None,
            num_fewshot: int | None = None, batch_size: int | str = 64, device: str = "auto",
            model_args=None, include_path=None, base=None, keep_loaded: bool = True,
            quiet: bool = True) -> LmEvalEvaluator:
    """An lm-evaluation-harness evaluator: ``evaluate(model_dir) -> {task: score,
    task_stderr: its standard error}``, picklable, for :func:`curvlens.sweep`
    (serially or on a dask cluster), :func:`curvlens.greedy_soup`,
    :func:`curvlens.pareto_front` and :func:`curvlens.graft_sweep`.

    Parameters
    ----------
    tasks : list of str or "a,b"
        lm-eval task names: lm-eval's own (their data must be in the local
        ``datasets`` cache: evaluation is offline) or tasks in ``include_path``.
    metric : str, mapping or None
        Which of a task's metrics is its score: a name (``"acc"``), a name with
        its filter (``"exact_match,strict-match"``), or a dict task -> either.
        None: the task's only metric (a task with several must be told).
    limit : int or float, optional
        The first ``limit`` examples per task (a fraction below 1), as lm-eval's
        ``--limit``.
    num_fewshot : int, optional
        Few-shot examples (a task file that fixes ``num_fewshot: 0`` keeps it).
    batch_size : int or "auto"
        Prompts lm-eval runs together.
    device : str
        ``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda:0"``, ...
    model_args : dict or "k=v,k=v", optional
        ``dtype`` (``"auto"``: the config's, default; ``"float32"``,
        ``"bfloat16"``, ``"float16"``) and lm-eval's HFLM options
        ``max_length, add_bos_token, prefix_token_id, truncation, logits_cache,
        softmax_dtype, mixed_precision_dtype, max_batch_size``.
    include_path : path or list of paths, optional
        Dirs of local task YAMLs (e.g. :func:`zoo_tasks`), read as untrusted
        input (:mod:`curvlens.evaluators.task_files`): paths stay inside the dir,
        no ``!function``, templates rendered sandboxed.
    base : path, optional
        The HF dir whose config and tokenizer a state dict is laid onto (what
        :func:`curvlens.graft_sweep` passes); not needed for dirs.
    keep_loaded : bool
        Keep one model loaded per process and stream the next model's weights
        into it when the architecture and tokenizer match (the default), rather
        than loading each model afresh.
    quiet : bool
        Silence lm-eval's progress bars and warnings.

    Returns
    -------
    LmEvalEvaluator

    Raises
    ------
    CurvlensError
        Bad arguments, or lm-eval not installed (with the install line).
    """
    return LmEvalEvaluator(tasks, metric=metric, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                           device=device, model_args=model_args, include_path=include_path, base=base,
                           keep_loaded=keep_loaded, quiet=quiet)
