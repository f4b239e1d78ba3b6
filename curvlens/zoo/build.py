"""Build the zoo (base + experts) once, cache it, and hand out :class:`Zoo` objects.

A zoo lives in ``<cache>/zoo-<config name>-seed<seed>-<key>/`` where ``<cache>`` is
``cache_dir``, else ``$CURVLENS_CACHE``, else ``~/.cache/curvlens``, and ``<key>``
hashes the whole config, the seed and :data:`~curvlens.zoo.config.CODE_VERSION`;
a zoo is rebuilt only when one of those changes (or with ``rebuild=True``).

A build writes into a hidden temporary directory beside its final place and renames
it into place only once everything, the ``zoo.json`` manifest last, is written.
An interrupted build therefore never leaves a directory that looks complete: its
temporary directory is removed (or, after a hard kill, ignored) and the next call
builds again.

Layout::

    zoo.json                      manifest: config, seed, experts, timings
    base/                         HF model dir (config, model.safetensors, tokenizer)
    <expert>/                     HF model dir, plus
    <expert>/export/exp_avg_sq.safetensors   name-keyed Adam second moments
    <expert>/optimizer.pt         the raw torch.optim state dict
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from curvlens.errors import CurvlensError
from curvlens.io.atomic import MARKER, make_partial
from curvlens.zoo import train
from curvlens.zoo.config import CODE_VERSION, EXPERT_CAPABILITIES, ZooConfig, resolve_config
from curvlens.runtime import torch_threads
from curvlens.zoo.runtime import hf_progress_bars_off
from curvlens.zoo.evaluate import evaluate_model
from curvlens.zoo.tasks import Task, eval_examples, make_tasks
from curvlens.zoo.tokenizer import make_tokenizer
from curvlens.runtime import cpu_has_avx2
from curvlens.zoo.pinning import build_environment

if TYPE_CHECKING:
    import pandas as pd

MANIFEST = "zoo.json"
#: The merge table's columns (:meth:`Zoo.score`).
MERGE_TABLE_COLUMNS = ["model", "method", "capability", "accuracy", "n", "correct"]


@dataclass(frozen=True)
class Zoo:
    """A built zoo on disk: a base model and capability experts in HF format.

    Attributes
    ----------
    root : Path
        The zoo's directory.
    config : ZooConfig
        The configuration it was built from.
    seed : int
        The seed it was built with.
    expert_dirs : mapping
        Expert name -> its HF model dir (with ``export/exp_avg_sq.safetensors``).
    capabilities : mapping
        Expert name -> the capability it was fine-tuned on.
    """

    root: Path
    config: ZooConfig
    seed: int
    expert_dirs: Mapping[str, Path]
    capabilities: Mapping[str, str]

    @property
    def base_dir(self) -> Path:
        """The base model's HF dir."""
        return self.root / "base"

    @classmethod
    def from_dir(cls, root: str | Path) -> "Zoo":
        """Open a built zoo from its directory (as written by :func:`build`)."""
        root = Path(root)
        try:
            manifest = json.loads((root / MANIFEST).read_text())
            fields = {
                k: tuple(v) if isinstance(v, list) else v for k, v in manifest["config"].items()
            }
            config = ZooConfig(**fields)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CurvlensError(f"{root / MANIFEST}: not a readable zoo manifest ({err})") from err
        return cls(
            root=root,
            config=config,
            seed=manifest["seed"],
            expert_dirs={name: root / name for name in manifest["experts"]},
            capabilities=dict(manifest["experts"]),
        )

    def experts(self):
        """The base and experts as a ``curvlens.Experts`` (with their second moments)."""
        from curvlens.passes.experts import Experts

        names = list(self.expert_dirs)
        return Experts.from_dirs(self.base_dir, [self.expert_dirs[n] for n in names], names=names)

    def evaluate(self, model, capabilities=None, **kwargs):
        """Score ``model`` on this zoo's capabilities; see :func:`curvlens.zoo.evaluate`."""
        return evaluate(model, capabilities, zoo=self, **kwargs)

    def evaluator(self, capabilities=None, *, device: str = "cpu"):
        """A picklable ``evaluate(model_dir) -> {capability: accuracy}`` on this zoo
        (:class:`curvlens.zoo.ZooEvaluator`), for ``cl.sweep`` and friends."""
        return ZooEvaluator(self, capabilities, device=device)

    def reference_scores(self, *, device: str = "auto"):
        """The base's and every expert's scores (merge-table rows), evaluated once
        and stored beside the zoo (``scores-<device>-<evaluation code hash>.csv``):
        every later call, in any process, reads them back."""
        import pandas as pd

        from curvlens.runtime import resolve_device

        kind = resolve_device(device).type
        stored = self.root / f"scores-{kind}-{_evaluation_version()}.csv"
        if stored.is_file():
            return pd.read_csv(stored, dtype={"correct": str})
        models = {"base": ("base", self.base_dir),
                  **{f"expert: {n}": ("expert", d) for n, d in self.expert_dirs.items()}}
        table = self._rows(models, device)
        tmp = stored.with_name(f".{stored.name}.{os.getpid()}.tmp")
        try:  # a read-only cache still works: the scores are just not stored
            table.to_csv(tmp, index=False)
            os.replace(tmp, stored)
        except OSError:
            tmp.unlink(missing_ok=True)
        return table

    def score(self, models, *, reference: bool = True, device: str = "auto"):
        """One merge table for any models: ``{label: model}`` -> rows ``model,
        method, capability, accuracy, n, correct`` (``correct``: each prompt's
        result, ``"T"``/``"F"``, for a bootstrap over items).

        Parameters
        ----------
        models : mapping
            Label -> an HF dir, a state dict, a ``Checkpoint`` or a ``MergeResult``
            (its method fills the ``method`` column; others read ``"model"``).
        reference : bool
            Put the base's and the experts' stored scores first
            (:meth:`reference_scores`).
        """
        import pandas as pd

        rows = {label: (getattr(m, "method", "model"), getattr(m, "checkpoint", m)) for label, m in models.items()}
        parts = ([self.reference_scores(device=device)] if reference else []) + [self._rows(rows, device)]
        return pd.concat(parts, ignore_index=True)

    def _rows(self, models, device):
        import pandas as pd

        rows = []
        for label, (method, model) in models.items():
            df = evaluate(model, zoo=self, device=device)
            rows += [{"model": label, "method": method, "capability": r.capability, "accuracy": r.accuracy,
                      "n": r.n, "correct": r.correct} for r in df.itertuples()]
        return pd.DataFrame(rows, columns=MERGE_TABLE_COLUMNS)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$CURVLENS_CACHE``, else ``~/.cache/curvlens``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("CURVLENS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "curvlens"


def zoo_dir(config: ZooConfig, seed: int, cache_dir: str | Path | None = None) -> Path:
    """Where the zoo of ``config`` and ``seed`` is cached."""
    return cache_root(cache_dir) / f"zoo-{config.name}-seed{seed}-{config.key(seed)}"


def build(config: str | ZooConfig = "quick", seed: int = 0, cache_dir: str | Path | None = None,
          progress: bool = True, rebuild: bool = False, *, seeds=None, isolated: bool = True):
    """Build the demo expert zoo, or reuse the cached one.

    Parameters
    ----------
    config : {"quick", "default"} or ZooConfig
        ``"quick"`` builds in well under a minute on a laptop CPU (tests, CI,
        notebooks); ``"default"`` in a few minutes (the demo: bigger model, harder
        tasks).
    seed : int
        Fixes the model initialisation, all sampled data, the fact table and the
        evaluation sets: the same seed gives the same weights.
    cache_dir : str or Path, optional
        Cache root; default ``$CURVLENS_CACHE`` or ``~/.cache/curvlens``.
    progress : bool
        Show progress bars.
    rebuild : bool
        Build even if a cached zoo exists (it is replaced once the new one is complete).
    seeds : sequence of int, optional
        Build one zoo per seed (instead of ``seed``) and return them all: results
        that hold for one seed may not for another (``docs/zoo.md`` gives ranges
        over seeds).
    isolated : bool
        Train in a fresh process whose CPU settings are pinned
        (:mod:`curvlens.zoo.worker`: one thread, ATen's and MKL's AVX2 kernels on
        x86), so that the same seed gives the same weights whatever this process
        or this machine's CPU would pick (measured in ``docs/zoo.md``). False
        trains in this process, with its settings.

    Returns
    -------
    Zoo, or a tuple of Zoo (one per seed, in order) with ``seeds``
    """
    if seeds is not None:
        seeds = list(dict.fromkeys(int(s) for s in seeds))
        if not seeds:
            raise CurvlensError("build: seeds is empty; give at least one seed")
        return tuple(build(config, s, cache_dir, progress, rebuild, isolated=isolated) for s in seeds)
    config = resolve_config(config)
    root = zoo_dir(config, seed, cache_dir)
    if not rebuild and (root / MANIFEST).is_file():
        return Zoo.from_dir(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    # marked as curvlens's own: a build killed outright is swept by the next one
    partial = make_partial(root.parent, root.name)
    try:
        if isolated:
            build_isolated(partial, config, seed, progress=progress)
        else:
            build_into(partial, config, seed, progress=progress)
        (partial / MARKER).unlink()  # complete: no longer a partial dir
        move_into_place(partial, root, replace=rebuild)
    finally:
        # Gone after a successful move; otherwise a half-built zoo, never to be reused.
        shutil.rmtree(partial, ignore_errors=True)
    return Zoo.from_dir(root)


def build_isolated(path: Path, config: ZooConfig, seed: int, *, progress: bool = True) -> None:
    """:func:`build_into` in a fresh interpreter under :func:`~curvlens.zoo.pinning.build_environment`."""
    env = {**os.environ, **build_environment(cpu_has_avx2())}
    cmd = [sys.executable, "-m", "curvlens.zoo.worker", str(path), json.dumps(dataclasses.asdict(config)),
           str(seed)] + (["--progress"] if progress else [])
    try:
        done = subprocess.run(cmd, env=env, check=False)
    except OSError as err:
        raise CurvlensError(f"building the {config.name!r} zoo (seed {seed}): could not start its build process "
                            f"{cmd[0]} ({err})") from err
    if done.returncode != 0:
        raise CurvlensError(f"building the {config.name!r} zoo (seed {seed}) failed in its build process "
                            f"(exit status {done.returncode}); its messages are above")


def _evaluation_version() -> str:
    """A short hash of the evaluation code: stored scores go stale when it changes."""
    import hashlib
    import importlib

    h = hashlib.sha1()
    for name in ("curvlens.zoo.evaluate", "curvlens.zoo.tasks", "curvlens.zoo.config"):
        h.update(Path(importlib.import_module(name).__file__).read_bytes())
    return h.hexdigest()[:10]


def load(config: str | ZooConfig = "quick", *, seed: int = 0, cache_dir=None, progress: bool = True, seeds=None):
    """The zoo ``config`` from the cache, built first when it is not there yet
    (:func:`build`; the default here is the quick zoo; ``seeds``: one per seed).

    Examples
    --------
    >>> import curvlens as cl                                     # doctest: +SKIP
    >>> zoo = cl.zoo.load("quick")                                # doctest: +SKIP
    >>> table = zoo.score({"average": cl.merge(zoo.experts(), "linear")})  # doctest: +SKIP
    """
    return build(config, seed=seed, cache_dir=cache_dir, progress=progress, seeds=seeds)


def move_into_place(partial: Path, root: Path, *, replace: bool) -> None:
    """Rename the complete zoo ``partial`` to ``root``.

    An existing complete zoo at ``root`` is kept (it was built from the same key,
    e.g. by a concurrent process) unless ``replace``; an incomplete one is replaced.
    """
    if root.exists():
        if (root / MANIFEST).is_file() and not replace:
            return
        trash = make_partial(root.parent, root.name, "old")
        root.rename(trash / "zoo")
        partial.rename(root)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        partial.rename(root)


def held_out_prompts(task: Task, config: ZooConfig, seed: int) -> frozenset[str]:
    """Prompts training must avoid: the evaluation set, unless the task is a closed table."""
    if task.fixed_examples() is not None:
        return frozenset()
    return frozenset(ex.prompt for ex in eval_examples(task, config.n_eval, seed))


def build_into(path: Path, config: ZooConfig, seed: int, *, progress: bool = True) -> None:
    """Train the base and every expert of ``config`` and save them under ``path``.

    One torch thread is used (see :mod:`curvlens.runtime`), which
    also makes the weights independent of the machine's core count; the CPU
    kernels are pinned only when this runs in :mod:`curvlens.zoo.worker`.
    """
    tokenizer = make_tokenizer()
    tasks = make_tasks(config, seed)
    held_out = {cap: held_out_prompts(task, config, seed) for cap, task in tasks.items()}
    timings = {}
    bar = tqdm(total=1 + len(config.experts), desc=f"curvlens zoo ({config.name})",
               disable=not progress)
    with bar, torch_threads(1), hf_progress_bars_off():
        start = time.perf_counter()
        base = train.pretrain_base(config, seed, tokenizer, tasks, held_out, progress=progress)
        train.save_model(base, tokenizer, path / "base")
        timings["base"] = round(time.perf_counter() - start, 2)
        bar.update()
        for name in config.experts:
            start = time.perf_counter()
            cap = EXPERT_CAPABILITIES[name]
            expert = copy.deepcopy(base)
            optimizer = train.finetune_expert(
                expert, tokenizer, tasks[cap], config, rng=random.Random(f"expert-{name}-{seed}"),
                held_out=held_out[cap], desc=name, progress=progress,
            )
            train.save_model(expert, tokenizer, path / name, optimizer)
            timings[name] = round(time.perf_counter() - start, 2)
            bar.update()
    manifest = {
        "config": dataclasses.asdict(config),
        "seed": seed,
        "code_version": CODE_VERSION,
        "key": config.key(seed),
        "experts": {e: EXPERT_CAPABILITIES[e] for e in config.experts},
        "n_parameters": sum(p.numel() for p in base.parameters()),
        # what decides the floats (docs/zoo.md): the kernels this build ran, and the pins it ran under
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "environment": {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "OMP_NUM_THREADS")},
        "torch": torch.__version__,
        "build_seconds": timings,
    }
    # Written last: its presence marks the directory complete.
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1))


def evaluate(model: Any, capabilities: Iterable[str] | None = None, *, zoo: Any = None,
             config: str | ZooConfig = "quick", batch_size: int = 256,
             device: str | torch.device = "cpu") -> pd.DataFrame:
    """Exact-match accuracy of ``model`` on the zoo's held-out prompts.

    Parameters
    ----------
    model : str, Path or mapping
        An HF model dir, or weights with the zoo's parameter names (a
        ``curvlens.Checkpoint``, a state dict, anything with ``keys()`` and
        ``[name]``), laid onto the architecture and tokenizer of the zoo's base.
    capabilities : iterable of str, optional
        Which capabilities to score (default: all of the zoo's), e.g.
        ``["addition", "facts"]``.
    zoo : Zoo, optional
        The zoo whose evaluation sets (and base, for weights) to use. Default: the
        cached zoo of ``config`` with seed 0, built if weights need its base.
    config : {"quick", "default"} or ZooConfig
        Used only when ``zoo`` is not given.
    batch_size : int
        Prompts decoded together.
    device : str or torch.device
        Where to run the model; ``"auto"`` picks CUDA when available.

    Returns
    -------
    pandas.DataFrame
        Columns ``capability, accuracy, n, correct``: one row per capability,
        accuracy in [0, 1] over ``n`` prompts, and each prompt's result
        (``correct``: ``"T"``/``"F"`` per prompt, in the evaluation set's fixed
        order, so that two models' results pair item by item).
    """
    if zoo is None:
        config, seed = resolve_config(config), 0
    else:
        config, seed = zoo.config, zoo.seed
    base_dir = None
    if not isinstance(model, (str, Path)):
        if zoo is None:
            zoo = build(config, seed=seed, progress=False)
        base_dir = zoo.base_dir
    return evaluate_model(model, capabilities, config, seed, base_dir, batch_size=batch_size, device=device)


class ZooEvaluator:
    """A picklable ``evaluate(model_dir) -> {capability: accuracy}`` for the zoo,
    as :func:`curvlens.sweep`, :func:`curvlens.greedy_soup` and
    :func:`curvlens.pareto_front` take it (also on dask workers, which reopen
    the zoo from ``root``).

    Parameters
    ----------
    zoo : Zoo or path
        A built zoo, or its directory.
    capabilities : iterable of str, optional
        Which capabilities to score (default all).
    device : str
        Where the model runs (``"auto"``: CUDA when present).
    batch_size : int
        Prompts decoded together.

    Examples
    --------
    >>> import pickle
    >>> ev = ZooEvaluator("/zoos/quick", ["addition"])
    >>> pickle.loads(pickle.dumps(ev))
    ZooEvaluator(root='/zoos/quick', capabilities=('addition',), device='cpu')
    """

    def __init__(self, zoo: Any, capabilities: Iterable[str] | None = None, *, device: str = "cpu",
                 batch_size: int = 256):
        self.root = str(getattr(zoo, "root", zoo))
        self.capabilities = tuple(capabilities) if capabilities is not None else None
        self.device = device
        self.batch_size = batch_size

    def input_paths(self) -> list[str]:
        """The data this evaluator reads (the zoo's dir): no sweep or soup output
        may be, or lie inside, it."""
        return [self.root]

    def __call__(self, model_dir) -> dict[str, float]:
        df = evaluate(model_dir, self.capabilities, zoo=Zoo.from_dir(self.root), device=self.device,
                      batch_size=self.batch_size)
        return {str(r.capability): float(r.accuracy) for r in df.itertuples()}

    def __repr__(self) -> str:
        return f"ZooEvaluator(root={self.root!r}, capabilities={self.capabilities!r}, device={self.device!r})"
