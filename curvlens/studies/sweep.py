"""``sweep``: many merge + evaluate jobs, serially or on a dask cluster, as one tidy frame.

A job is a dict ``{"method": ..., **params}`` (optionally ``"label"`` and
``"experts"``, a subset of the experts by name). Each job streams as every merge
does: :func:`curvlens.config.merge.merge` writes the merged model into a fresh
temporary dir, ``evaluate(model_dir)`` scores it, and the dir is deleted unless
the job is kept. A job that fails (a bad parameter, an evaluator error, a worker
that died) becomes a row with ``status == "error"`` and the error's text; it
never stops the sweep, and no job is left out of the frame.

``client=None`` runs the jobs one after another in this process. A
``dask.distributed.Client`` runs them on its cluster (any cluster: a
``LocalCluster``, dask-jobqueue's SLURM/PBS clusters, ...); ``client="local"``
starts a ``LocalCluster`` of ``n_workers`` single-threaded worker processes for
the sweep and closes it afterwards. Workers reopen the experts from their paths
(only headers are read), so the experts must be on disk where the workers can
read them, and ``evaluate`` must be picklable (a module-level function or class
instance, e.g. :class:`curvlens.zoo.ZooEvaluator`).
"""
from __future__ import annotations

import functools
import itertools
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from curvlens.arguments import bool_arg, callable_arg, int_arg, nonempty_arg
from curvlens.errors import CurvlensError
from curvlens.passes.experts import Expert, Experts
from curvlens.runtime import progress_bar
from curvlens.io.atomic import check_output, gather_inputs

#: Columns every sweep frame has, in order; the jobs' parameters come between
#: ``experts`` and ``metric``.
LEAD = ["job", "label", "method", "experts"]
TAIL = ["metric", "value", "status", "error", "merge_s", "eval_s", "seconds", "worker", "model_dir"]
_RESERVED = {"method", "label", "experts"}

Evaluate = Callable[[str], Mapping[str, float]]

def sweep_grid(method: str, **axes) -> list[dict]:
    """Jobs for every combination of ``axes`` (a product grid) of one method.

    A list or tuple value is an axis to sweep; anything else is held fixed. A
    per-expert parameter is swept by a list of lists (``weight=[[1, 0], [0.5, 0.5]]``).
    Concatenate grids of several methods with ``+``.

    Examples
    --------
    >>> sweep_grid("ties", density=[0.3, 0.7], **{"lambda": 1.0})
    [{'method': 'ties', 'density': 0.3, 'lambda': 1.0}, {'method': 'ties', 'density': 0.7, 'lambda': 1.0}]
    """
    if not isinstance(method, str):
        raise CurvlensError(f"sweep_grid: method must be a method name; got {method!r}")
    names = list(axes)
    values = [list(v) if isinstance(v, (list, tuple)) else [v] for v in axes.values()]
    for k, v in zip(names, values):
        nonempty_arg(f"sweep_grid: axis {k!r}", v, "value to sweep")
    return [{"method": method, **dict(zip(names, combo))} for combo in itertools.product(*values)]


@dataclass(frozen=True)
class ExpertsSpec:
    """What a worker needs to reopen an :class:`Experts` from disk: paths only."""

    base: str | None
    experts: tuple[tuple[str, str, str | None, bool], ...]  # name, model path, moments path, bias-corrected
    exclude: tuple[str, ...]

    @classmethod
    def of(cls, experts: Experts) -> ExpertsSpec:
        if experts.base is not None and experts.base.path is None:
            raise CurvlensError("sweep on a cluster: the base model is in memory; workers can only "
                                "reopen models from paths (write it with cl.write_model first)")
        rows = []
        for e in experts.experts:
            path = e.path or e.checkpoint.path
            if path is None:
                raise CurvlensError(f"sweep on a cluster: expert {e.name!r} is in memory; workers can only "
                                    "reopen models from paths")
            if e.moments is not None and e.moments.path is None:
                raise CurvlensError(f"sweep on a cluster: the moments of expert {e.name!r} are in memory")
            mom = str(e.moments.path) if e.moments is not None else None
            rows.append((e.name, str(path), mom, bool(e.moments.bias_corrected) if e.moments is not None else False))
        base = str(experts.base.path) if experts.base is not None else None
        return cls(base, tuple(rows), tuple(experts.exclude.patterns) if experts.exclude else ())

    def open(self) -> Experts:
        # reopened per worker process and cached, unless a file changed since
        paths = [self.base] + [p for _, path, mom, _ in self.experts for p in (path, mom)]
        return _open_spec(self, tuple(_stamp(p) for p in paths if p is not None))


def _stamp(path: str) -> int:
    p = Path(path)
    files = [p] if p.is_file() else sorted(p.iterdir()) if p.is_dir() else []
    return hash(tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in files if f.is_file()))


@functools.lru_cache(maxsize=4)
def _open_spec(spec: ExpertsSpec, stamp: tuple) -> Experts:
    from curvlens.io.checkpoint import Checkpoint
    from curvlens.io.moments import Moments

    experts = []
    for name, path, mom, bias in spec.experts:
        ckpt = Checkpoint.open(path)
        moments = Moments.open(mom, checkpoint=ckpt, bias_correction=bias) if mom is not None else None
        experts.append(Expert(name, ckpt, moments, Path(path)))
    return Experts(spec.base, experts, exclude=list(spec.exclude) or None)


def _label(job: Mapping) -> str:
    if "label" in job:
        return str(job["label"])
    parts = [job["method"]]
    if "experts" in job:
        parts.append("+".join(job["experts"]))
    parts += [f"{k}={_short(v)}" for k, v in job.items() if k not in _RESERVED]
    return " ".join(parts)


def _short(v) -> str:
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_short(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _check_jobs(grid) -> list[dict]:
    if isinstance(grid, Mapping) or not isinstance(grid, Sequence):
        raise CurvlensError("grid must be a list of job dicts ({'method': ..., **params}; see sweep_grid)")
    nonempty_arg("grid", grid, "job ({'method': ..., **params}; see sweep_grid)")
    jobs = []
    for i, job in enumerate(grid):
        if not isinstance(job, Mapping) or not isinstance(job.get("method"), str):
            raise CurvlensError(f"grid[{i}] must be a dict with a 'method' name; got {job!r}")
        job = dict(job)
        if "experts" in job:
            if isinstance(job["experts"], str) or not isinstance(job["experts"], Sequence):
                raise CurvlensError(f"grid[{i}]['experts'] must be a list of expert names; got {job['experts']!r}")
            job["experts"] = tuple(job["experts"])
        jobs.append(job)
    return jobs


def _column_value(v):
    # list-valued parameters (per-expert weights) as tuples: hashable, groupable
    return tuple(v) if isinstance(v, list) else v


def run_job(source: Experts | ExpertsSpec, index: int, job: Mapping, evaluate: Evaluate, *,
            out_dir: str | None = None, keep: bool = False, merge_kwargs: Mapping | None = None) -> list[dict]:
    """Run one job (merge into a temp dir, evaluate, clean up): its rows.

    Every exception but an interrupt becomes one ``status == "error"`` row whose
    ``error`` names its type and message; the job's dir is removed unless
    ``keep`` and the job succeeded. Runs wherever it is called: in this process
    or on a dask worker (``source`` is then an :class:`ExpertsSpec`).
    """
    from curvlens.config.merge import merge

    start = time.perf_counter()
    info = {"job": index, "label": _label(job), "method": job["method"],
            "experts": job.get("experts"), "worker": f"{socket.gethostname()}:{os.getpid()}"}
    params = {k: v for k, v in job.items() if k not in _RESERVED}
    merge_s = eval_s = float("nan")
    tmp = None
    model_dir = None
    try:
        experts = source.open() if isinstance(source, ExpertsSpec) else source
        if info["experts"] is None:
            info["experts"] = tuple(experts.names)
        else:
            experts = experts.subset(list(info["experts"]))
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"job{index:03d}-", dir=out_dir))
        model_dir = tmp / "model"
        t0 = time.perf_counter()
        merge(experts, job["method"], model_dir, progress=False, **{**dict(merge_kwargs or {}), **params})
        merge_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores = evaluate(str(model_dir))
        eval_s = time.perf_counter() - t0
        values = _scores(scores)
    except Exception as err:  # noqa: BLE001 - a job's failure is a result, never the sweep's end
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        return [{**info, "metric": None, "value": float("nan"), "status": "error",
                 "error": f"{type(err).__name__}: {err}", "merge_s": merge_s, "eval_s": eval_s,
                 "seconds": time.perf_counter() - start, "model_dir": None, "_params": params}]
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not keep:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - start
    return [{**info, "metric": m, "value": v, "status": "ok", "error": None, "merge_s": merge_s,
             "eval_s": eval_s, "seconds": seconds, "model_dir": str(model_dir) if keep else None,
             "_params": params} for m, v in values.items()]


def _scores(scores) -> dict[str, float]:
    if not isinstance(scores, Mapping):
        raise CurvlensError(f"evaluate must return a dict metric -> float; got a {type(scores).__name__}")
    if not scores:
        raise CurvlensError("evaluate returned no metrics")
    out = {}
    for k, v in scores.items():
        if isinstance(v, (str, bytes, bool)):
            raise CurvlensError(f"evaluate returned {v!r} for metric {k!r}; expected a number")
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError):
            raise CurvlensError(f"evaluate returned {v!r} for metric {k!r}; expected a number") from None
        if not np.isfinite(out[str(k)]):
            raise CurvlensError(f"evaluate returned {v!r} for metric {k!r}; expected a finite number")
    return out


def sweep(experts: Experts, grid: Sequence[Mapping], evaluate: Evaluate, out_dir=None, client=None, *,
          n_workers: int = 2, keep: bool = False, progress: bool = True, inputs=(), **merge_kwargs) -> pd.DataFrame:
    """Merge and evaluate every job of ``grid``; one tidy row per job and metric.

    Parameters
    ----------
    experts : Experts
        The base, experts and moments the jobs merge.
    grid : list of dict
        Jobs: ``{"method": name, **params}``, optionally ``"label"`` (default: the
        method and its parameters) and ``"experts"`` (names of the experts to merge;
        default all). :func:`sweep_grid` builds product grids.
    evaluate : callable
        ``evaluate(model_dir) -> {metric: float}``; picklable for a cluster (e.g.
        :class:`curvlens.zoo.ZooEvaluator`).
    out_dir : path, optional
        Where the jobs' temporary dirs go (default: the system's temp dir; on a
        cluster, a path every worker can write when ``keep``).
    client : None, "local" or dask.distributed.Client
        None: serially in this process. ``"local"``: a ``LocalCluster`` of
        ``n_workers`` worker processes (one thread each), closed afterwards. A
        Client: its cluster, whatever it is.
    keep : bool
        Keep each successful job's merged model (its path in ``model_dir``).
    inputs : path or list of path
        Other files the jobs read (an evaluator's data; an evaluator with an
        ``input_paths()`` method declares its own): ``out_dir`` may not be or lie
        inside them, nor inside the experts' dirs. Checked before any job runs.
    **merge_kwargs
        Passed to every :func:`curvlens.merge` (``device``, ``dtype``, ``threads``,
        ``tensors``); a job's own parameters win.

    Returns
    -------
    pandas.DataFrame
        Columns ``job, label, method, experts``, one column per parameter any job
        sets (NaN where a job leaves it at the default; per-expert lists as tuples),
        ``metric, value, status, error, merge_s, eval_s, seconds, worker,
        model_dir``. A failed job has one row, ``status == "error"``, ``metric``
        None and the error's text. ``df.attrs["wall_s"]`` is the sweep's wall time.

    Examples
    --------
    >>> import torch, curvlens as cl
    >>> ex = cl.Experts(None, [cl.Expert(n, cl.Checkpoint.open({"w": torch.tensor([x])}))
    ...                        for n, x in (("a", 1.0), ("b", 3.0))])
    >>> df = sweep(ex, [{"method": "linear"}],
    ...            lambda d: {"w": float(cl.Checkpoint.open(d)["w"])}, progress=False)
    >>> df[["label", "metric", "value", "status"]].values.tolist()
    [['linear', 'w', 2.0, 'ok']]
    """
    if not isinstance(experts, Experts):
        raise CurvlensError(f"sweep takes an Experts; got a {type(experts).__name__}")
    callable_arg("evaluate", evaluate, "model_dir -> {metric: float}")
    if bool_arg("keep", keep) and out_dir is None:
        raise CurvlensError("keep=True needs out_dir (where the kept models go)")
    int_arg("n_workers", n_workers, lo=1)
    jobs = _check_jobs(grid)
    check_work_dir(out_dir, experts, evaluate, inputs)
    out = str(out_dir) if out_dir is not None else None
    t0 = time.perf_counter()
    if client is None:
        rows = []
        bar = progress_bar(len(jobs), "sweep", progress)
        for i, job in enumerate(jobs):
            rows += run_job(experts, i, job, evaluate, out_dir=out, keep=keep, merge_kwargs=merge_kwargs)
            bar.update(1)
        bar.close()
    else:
        rows = _on_cluster(experts, jobs, evaluate, client, n_workers, out, keep, merge_kwargs, progress)
    df = _frame(rows, jobs)
    df.attrs["wall_s"] = time.perf_counter() - t0
    return df


def _on_cluster(experts, jobs, evaluate, client, n_workers, out, keep, merge_kwargs, progress) -> list[dict]:
    try:
        from distributed import Client, as_completed
    except ImportError:
        raise CurvlensError("sweep with a client needs dask.distributed: pip install 'curvlens[dask]'") from None
    spec = ExpertsSpec.of(experts)
    owned = None
    if isinstance(client, str):
        if client != "local":
            raise CurvlensError(f"client must be None, 'local' or a dask.distributed.Client; got {client!r}")
        owned = local_client(n_workers)
        client = owned
    elif not isinstance(client, Client):
        raise CurvlensError(f"client must be None, 'local' or a dask.distributed.Client; got a "
                            f"{type(client).__name__}")
    try:
        rows, futures = [], {}
        for i, job in enumerate(jobs):
            try:  # the job is pickled here: an unpicklable evaluate fails at submit
                fut = client.submit(run_job, spec, i, job, evaluate, out_dir=out, keep=keep,
                                    merge_kwargs=dict(merge_kwargs), pure=False)
            except Exception as err:  # noqa: BLE001
                rows.append(_lost(i, job, f"could not send the job to the cluster: {_root(err)}"))
            else:
                futures[fut] = i
        bar = progress_bar(len(jobs), "sweep", progress)
        bar.update(len(rows))
        for fut in as_completed(list(futures)):
            i = futures[fut]
            try:
                rows += fut.result()
            except Exception as err:  # noqa: BLE001 - a lost worker (KilledWorker), a cancelled job
                rows.append(_lost(i, jobs[i], f"{type(err).__name__}: {err}"))
            bar.update(1)
        bar.close()
        return rows
    finally:
        if owned is not None:
            cluster = owned.cluster
            owned.close()
            cluster.close()


def _root(err: BaseException) -> str:
    """``Type: message`` of the innermost cause (dask wraps a pickling error twice)."""
    seen = [err]
    while (nxt := seen[-1].__cause__ or seen[-1].__context__) is not None and nxt not in seen:
        seen.append(nxt)
    inner = seen[-1]
    text = f"{type(inner).__name__}: {inner}"
    return text if inner is err else f"{text} (raised as {type(err).__name__})"


def _lost(i: int, job: Mapping, error: str) -> dict:
    """The error row of a job that never ran to its end on the cluster."""
    return {"job": i, "label": _label(job), "method": job["method"], "experts": job.get("experts"),
            "metric": None, "value": float("nan"), "status": "error", "error": error,
            "merge_s": float("nan"), "eval_s": float("nan"), "seconds": float("nan"), "worker": None,
            "model_dir": None, "_params": {k: v for k, v in job.items() if k not in _RESERVED}}


def local_client(n_workers: int = 2):
    """A ``dask.distributed`` Client on a new ``LocalCluster`` of ``n_workers``
    single-threaded worker processes (no dashboard). Close it (and its
    ``.cluster``) when done; ``sweep(client="local")`` does."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise CurvlensError("a local cluster needs dask.distributed: pip install 'curvlens[dask]'") from None
    if n_workers < 1:
        raise CurvlensError(f"n_workers must be >= 1; got {n_workers}")
    cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                           dashboard_address=None)
    return Client(cluster)


def _frame(rows: list[dict], jobs: list[dict]) -> pd.DataFrame:
    params = list(dict.fromkeys(k for job in jobs for k in job if k not in _RESERVED))
    flat = []
    for r in sorted(rows, key=lambda r: r["job"]):
        p = r.pop("_params", {})
        flat.append({**{k: r.get(k) for k in LEAD}, **{k: _column_value(p.get(k, np.nan)) for k in params},
                     **{k: r.get(k) for k in TAIL}})
    df = pd.DataFrame(flat, columns=[*LEAD, *params, *TAIL])
    for col in ("value", "merge_s", "eval_s", "seconds"):
        df[col] = df[col].astype(float)
    return df


def check_work_dir(out_dir, *sources) -> None:
    """Refuse a jobs' ``out_dir`` that is or lies inside an input (the experts'
    dirs, an evaluator's declared data, extra paths): before any job, nothing made."""
    if out_dir is not None:
        check_output(out_dir, gather_inputs(*sources), replaces=False)
