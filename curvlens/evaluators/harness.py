"""An lm-evaluation-harness evaluator for sweeps, soups, fronts and grafting.

:class:`LmEvalEvaluator` scores a model dir with lm-eval's own Python API (the
steps of ``lm_eval.simple_evaluate``, :func:`run_harness`, on an ``HFLM`` wrapped
around the loaded model): no subprocess, no network
(:mod:`curvlens.evaluators.session`), ``trust_remote_code=False``. It is a plain picklable object, so dask workers
receive it with the job, and each process keeps one model loaded across a sweep
(:mod:`curvlens.evaluators.loaded`).

Its scores are lm-eval's metric values, one per task, and each value's standard
error as the metric ``<task>_stderr``: ``{"arc_easy": 0.71, "arc_easy_stderr":
0.009}``. :func:`curvlens.sweep` keeps both as rows (and :func:`wide_scores` as
columns); greedy soups and Pareto fronts pool only the scores by default.
"""
from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch

from curvlens.errors import CurvlensError, check_choice
from curvlens.evaluators import loaded, session
from curvlens.evaluators.task_files import TaskIndex
from curvlens.runtime import threads_for, torch_threads
from curvlens.studies.scores import STDERR_SUFFIX

#: The lm-eval this module is tested with (the ``eval`` extra pins it).
TESTED_VERSION = "0.4.13"
INSTALL = "pip install 'curvlens[eval]'"
#: HFLM options that make sense for a model curvlens loads (``dtype`` is for loading).
MODEL_ARGS = ("dtype", "max_length", "add_bos_token", "prefix_token_id", "truncation", "logits_cache",
              "softmax_dtype", "mixed_precision_dtype", "max_batch_size")
DTYPES = ("auto", "float32", "bfloat16", "float16")
#: Columns of :meth:`LmEvalEvaluator.scores`.
SCORE_COLUMNS = ["task", "metric", "filter", "value", "stderr", "n", "selected", "status", "error", "load",
                 "seconds"]


def require_lm_eval() -> None:
    """Raise a CurvlensError with the install line when lm-eval is not installed."""
    if importlib.util.find_spec("lm_eval") is None:
        raise CurvlensError(f"scoring with lm-evaluation-harness needs lm-eval (tested: {TESTED_VERSION}): {INSTALL}")


def _model_args(model_args) -> dict:
    if model_args is None:
        return {}
    if isinstance(model_args, str):  # lm-eval's "k=v,k=v" form
        pairs = [p for p in model_args.split(",") if p.strip()]
        if any("=" not in p for p in pairs):
            raise CurvlensError(f"model_args {model_args!r}: expected 'key=value,key=value'")
        model_args = dict(p.split("=", 1) for p in pairs)
        model_args = {k.strip(): _literal(v.strip()) for k, v in model_args.items()}
    if not isinstance(model_args, Mapping):
        raise CurvlensError(f"model_args is a {type(model_args).__name__}; expected a dict or 'k=v,k=v'")
    for k in model_args:
        check_choice("model_args key", k, MODEL_ARGS)
    out = dict(model_args)
    if "dtype" in out:
        check_choice("model_args dtype", out["dtype"], DTYPES)
    return out


def _literal(v: str):
    low = v.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(v)
    except ValueError:
        return v


class LmEvalEvaluator:
    """``evaluate(model) -> {task: score, task_stderr: its standard error}`` with
    lm-evaluation-harness; build it with :func:`curvlens.evaluators.lm_eval`.

    ``model`` is an HF model dir (what :func:`curvlens.sweep`,
    :func:`curvlens.greedy_soup` and :func:`curvlens.pareto_front` hand over) or a
    state dict laid onto ``base`` (what :func:`curvlens.graft_sweep` hands over).
    A task that cannot be scored makes the call raise, naming it; so a sweep job
    becomes an error row. :meth:`scores` returns every task's row instead, failed
    ones with ``status == "error"``.

    Examples
    --------
    >>> import pickle, pytest
    >>> _ = pytest.importorskip("lm_eval")  # the eval extra
    >>> ev = LmEvalEvaluator(["arc_easy"], metric="acc", limit=50)
    >>> pickle.loads(pickle.dumps(ev))
    LmEvalEvaluator(tasks=('arc_easy',), metric='acc', limit=50, include_path=None)
    """

    def __init__(self, tasks, *, metric: str | Mapping[str, str] | None = None, limit: int | float | None = None,
                 num_fewshot: int | None = None, batch_size: int | str = 64, device: str = "auto",
                 model_args=None, include_path=None, base=None, keep_loaded: bool = True, quiet: bool = True):
        if isinstance(tasks, str):
            tasks = [t.strip() for t in tasks.split(",")]
        if isinstance(tasks, Mapping) or not isinstance(tasks, Sequence) or not tasks \
                or not all(isinstance(t, str) and t for t in tasks):
            raise CurvlensError(f"tasks must be lm-eval task names (a list, or 'a,b'); got {tasks!r}")
        if len(set(tasks)) != len(tasks):
            raise CurvlensError(f"tasks {list(tasks)} name a task twice")
        self.tasks = tuple(tasks)
        if metric is not None and not isinstance(metric, str):
            if not isinstance(metric, Mapping) or not all(isinstance(v, str) for v in metric.values()):
                raise CurvlensError(f"metric must be a name ('acc'), 'name,filter', or task -> name; got {metric!r}")
            unknown = set(metric) - set(self.tasks)
            if unknown:
                raise CurvlensError(f"metric names tasks {sorted(unknown)} that are not among {list(self.tasks)}")
            metric = dict(metric)
        self.metric = metric
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
            raise CurvlensError(f"limit must be a positive number of examples (or a fraction < 1); got {limit!r}")
        self.limit = int(limit) if isinstance(limit, float) and limit >= 1 and limit.is_integer() else limit
        if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int)
                                        or num_fewshot < 0):
            raise CurvlensError(f"num_fewshot must be an int >= 0; got {num_fewshot!r}")
        self.num_fewshot = num_fewshot
        if not (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1) \
                and not (isinstance(batch_size, str) and batch_size.startswith("auto")):
            raise CurvlensError(f"batch_size must be an int >= 1 or 'auto'; got {batch_size!r}")
        self.batch_size = batch_size
        if not isinstance(device, str):
            raise CurvlensError(f"device must be a string ('auto', 'cpu', 'cuda:0', ...); got {device!r}")
        self.device = device
        self.model_args = _model_args(model_args)
        paths = include_path if isinstance(include_path, (list, tuple)) else [include_path]
        self.include_path = None if include_path is None else tuple(str(Path(p).expanduser().resolve())
                                                                    for p in paths)
        self.base = None if base is None else str(Path(base).expanduser().resolve())
        self.keep_loaded = bool(keep_loaded)
        self.quiet = bool(quiet)
        require_lm_eval()

    def __repr__(self) -> str:
        inc = self.include_path if self.include_path is None or len(self.include_path) > 1 else self.include_path[0]
        return (f"LmEvalEvaluator(tasks={self.tasks!r}, metric={self.metric!r}, limit={self.limit!r}, "
                f"include_path={inc!r})")

    # -- the evaluator contract ------------------------------------------------------
    def __call__(self, model) -> dict[str, float]:
        df = self.scores(model)
        bad = df[df["status"] == "error"]
        if len(bad):
            raise CurvlensError(f"lm-eval could not score {_name(model)}: "
                                + "; ".join(f"task {r.task!r}: {r.error}" for r in bad.itertuples()))
        chosen = df[df["selected"]]
        missing = [t for t in self.tasks if t not in set(chosen["task"])]
        if missing:
            raise CurvlensError(f"lm-eval scored {_name(model)}, but no metric was chosen for {missing}: "
                                + "; ".join(self._choices(df, t) for t in missing))
        out: dict[str, float] = {}
        for r in chosen.itertuples():
            out[r.task] = float(r.value)
            out[r.task + STDERR_SUFFIX] = float(r.stderr)
        return out

    def scores(self, model) -> pd.DataFrame:
        """Every metric lm-eval reports for each task, as a tidy frame.

        Returns
        -------
        pandas.DataFrame
            ``task, metric, filter, value, stderr, n, selected, status, error, load,
            seconds``: one row per task x metric x filter (``selected``: the one
            the evaluator returns for the task); a task that failed has one row,
            ``status == "error"`` and the error's text. ``load`` says how the model
            was made ready (``"loaded"``, or ``"swapped"``: weights replaced in the
            kept model); ``seconds`` is the whole evaluation's wall time.
        """
        require_lm_eval()
        t0 = time.perf_counter()
        device = self._device()
        spec = loaded.LoadSpec(device, str(self.model_args.get("dtype", "auto")), self.batch_size,
                               tuple(sorted((k, v) for k, v in self.model_args.items() if k != "dtype")))
        with loaded.LOCK, torch_threads(threads_for(torch.device(device))), \
                session.offline(), session.sandboxed_templates(), session.quiet(self.quiet):
            specs, rows = self._task_specs()
            if specs:
                lm, how = loaded.harness_model(model, spec, base=self.base, keep=self.keep_loaded)
                rows += self._run(lm, specs)
            else:
                how = None
        seconds = time.perf_counter() - t0
        df = pd.DataFrame(rows, columns=SCORE_COLUMNS[:-2])
        df["load"] = how
        df["seconds"] = seconds
        order = {t: i for i, t in enumerate(self.tasks)}
        return df.sort_values("task", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)

    @staticmethod
    def release() -> None:
        """Free the model this process keeps loaded between evaluations."""
        with loaded.LOCK:
            loaded.release()

    # -- internals -------------------------------------------------------------------
    def _device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def _task_specs(self) -> tuple[dict[str, object], list[dict]]:
        """Task -> what lm-eval loads (a checked local config dict, or the name of one
        of lm-eval's tasks); tasks that cannot be read are error rows."""
        index = TaskIndex.scan(list(self.include_path)) if self.include_path else None
        specs, rows = {}, []
        for task in self.tasks:
            try:
                specs[task] = index.config(task) if index is not None and task in index else task
            except CurvlensError as err:
                rows.append(_error_row(task, str(err)))
        return specs, rows

    def _run(self, lm, specs: dict[str, object]) -> list[dict]:
        """Score every task in one harness run; if that fails, task by task, so one
        broken task is one error row."""
        manager = task_manager(all(isinstance(s, dict) for s in specs.values()))
        loaded_tasks, rows = {}, []
        for task, spec in specs.items():
            try:
                got = manager.load([spec])["tasks"]
                if list(got) != [task]:
                    raise CurvlensError(f"{task!r} is an lm-eval group or tag ({sorted(got)}); list its tasks")
                loaded_tasks[task] = got[task]
            except Exception as err:  # noqa: BLE001 - a task that cannot load is a row, not the run's end
                rows.append(_error_row(task, _text(err)))
        if not loaded_tasks:
            return rows
        try:
            return rows + self._evaluate(lm, manager, loaded_tasks)
        except Exception as err:  # noqa: BLE001 - one task's failure must not hide the others' scores
            if len(loaded_tasks) == 1:
                return rows + [_error_row(next(iter(loaded_tasks)), _text(err))]
        for task in loaded_tasks:
            rows += self._one(lm, manager, task, specs[task])
        return rows

    def _one(self, lm, manager, task: str, spec) -> list[dict]:
        try:
            return self._evaluate(lm, manager, manager.load([spec])["tasks"])
        except Exception as err:  # noqa: BLE001
            return [_error_row(task, _text(err))]

    def _evaluate(self, lm, manager, tasks: dict) -> list[dict]:
        res = run_harness(lm, manager, list(tasks.values()), num_fewshot=self.num_fewshot, limit=self.limit)
        rows = []
        for task in tasks:
            n = res.get("n-samples", {}).get(task, {}).get("effective")
            rows += self._metric_rows(task, res["results"][task], n)
        return rows

    def _metric_rows(self, task: str, result: Mapping, n) -> list[dict]:
        keys = [k for k in result if "," in k and not k.split(",", 1)[0].endswith(STDERR_SUFFIX)]
        want = self.metric.get(task) if isinstance(self.metric, dict) else self.metric
        chosen = _choose(keys, want)
        rows = []
        for k in keys:
            name, filt = k.split(",", 1)
            err = result.get(f"{name}{STDERR_SUFFIX},{filt}")
            rows.append({"task": task, "metric": name, "filter": filt, "value": _number(result[k]),
                         "stderr": _number(err), "n": n, "selected": k == chosen, "status": "ok", "error": None})
        return rows

    def _choices(self, df: pd.DataFrame, task: str) -> str:
        got = df[df["task"] == task]
        keys = [f"{m},{f}" for m, f in zip(got["metric"], got["filter"])]
        want = self.metric.get(task) if isinstance(self.metric, dict) else self.metric
        return (f"{task!r} reports {keys}" + (f", none of which is {want!r}" if want else "; choose one with "
                "metric= (a name, 'name,filter', or a dict task -> name)"))


def _choose(keys: list[str], want: str | None) -> str | None:
    """The result key ``want`` picks: the only metric when None, ``name`` when it has
    one filter, ``name,filter`` exactly; None when ambiguous or absent."""
    if want is None:
        return keys[0] if len(keys) == 1 else None
    if "," in want:
        return want if want in keys else None
    hits = [k for k in keys if k.split(",", 1)[0] == want]
    return hits[0] if len(hits) == 1 else None


def _number(v) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):  # lm-eval writes "N/A" where it has no stderr
        return math.nan
    return x


def _error_row(task: str, error: str) -> dict:
    return {"task": task, "metric": None, "filter": None, "value": math.nan, "stderr": math.nan, "n": None,
            "selected": False, "status": "error", "error": error}


def _text(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _name(model) -> str:
    return str(model) if isinstance(model, (str, Path)) else f"a state dict of {len(model)} tensors"


def run_harness(lm, manager, tasks: list, *, num_fewshot: int | None, limit) -> dict:
    """lm-eval's results for ``tasks`` on ``lm``, as ``lm_eval.simple_evaluate`` computes them.

    The same steps as ``simple_evaluate`` (lm-eval 0.4.13), through lm-eval's
    lower-level ``lm_eval.evaluate``: its seeds (0 for ``random``, 1234 for numpy,
    torch and the few-shot sampler), ``num_fewshot`` set on every task whose file
    does not fix it at 0 (0 where a task leaves it unset), then ``evaluate``.
    What ``simple_evaluate`` adds and this leaves out is its run report
    (``pip list``, ``git describe`` and other subprocesses, 1.3-4.7 s a call, and
    a hub lookup of the model's revision): here nothing starts a process or opens
    a connection. The caller's random states are restored afterwards.
    """
    import random

    import lm_eval
    import numpy as np
    from lm_eval.defaults import DEFAULT_OTHER_SEED, DEFAULT_RANDOM_SEED

    state, np_state = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        try:
            random.seed(DEFAULT_RANDOM_SEED)
            np.random.seed(DEFAULT_OTHER_SEED)
            torch.manual_seed(DEFAULT_OTHER_SEED)
            loaded_tasks = manager.load(tasks)
            for task in loaded_tasks["tasks"].values():
                fixed = task.get_config("num_fewshot")
                if num_fewshot is not None and fixed != 0:
                    task.set_config(key="num_fewshot", value=num_fewshot)
                elif fixed is None:
                    task.set_config(key="num_fewshot", value=0)
                task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)
            return lm_eval.evaluate(lm=lm, task_dict=loaded_tasks, limit=limit, log_samples=False,
                                    fewshot_as_multiturn=True)
        finally:
            random.setstate(state)
            np.random.set_state(np_state)


_MANAGERS: dict[bool, object] = {}


def task_manager(local_only: bool):
    """lm-eval's TaskManager, one per process: without lm-eval's own task index when
    every task is local (indexing its thousands of YAMLs costs seconds)."""
    if local_only not in _MANAGERS:
        from lm_eval.tasks import TaskManager

        _MANAGERS[local_only] = TaskManager(include_defaults=not local_only)
    return _MANAGERS[local_only]
