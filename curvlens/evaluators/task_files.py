"""Local lm-eval task files, read as untrusted input.

lm-eval reads a task YAML with a loader that imports and runs the Python a
``!function`` tag names, follows ``include:`` to any file on disk, and hands
``dataset_kwargs.data_files`` to ``datasets``, which resolves relative names
against the current directory. A task dir from elsewhere is therefore code and a
path to anything. curvlens reads local task files itself and passes lm-eval each
task as a checked config dict:

* plain YAML only: ``!function`` (Python from the task dir) is refused, and so is a
  metric lm-eval does not implement itself (it would fetch and run one with
  ``evaluate.load``) and ``trust_remote_code``;
* ``include:``, ``data_files`` (a name, a list, or split -> names; globs expand
  inside the dir), ``data_dir`` and a local ``dataset_path`` dir are relative to
  the task's YAML file and must resolve, after symlinks, inside the include dir
  (:func:`curvlens.io.paths.contained`); the config handed on names them by
  absolute path, so the current directory never matters;
* ``dataset_path`` is either one of ``datasets``' local builders (``json``,
  ``csv``, ``parquet``, ``text``, ``arrow``) with data files, a local dir, or a
  hub dataset id (read from the local cache: evaluation runs offline).

A file that breaks a rule is not skipped: asking for its task raises a
:class:`~curvlens.errors.CurvlensError` naming the file, the key and the rule.
"""
from __future__ import annotations

import copy
import glob
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from curvlens.errors import CurvlensError
from curvlens.io.paths import contained

#: ``datasets`` builders that read local files.
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
#: ``dataset_kwargs`` that would write elsewhere, authenticate or run code.
_REFUSED_DATASET_KWARGS = ("cache_dir", "download_config", "storage_options", "token", "use_auth_token",
                           "trust_remote_code")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


@dataclass(frozen=True)
class _Function:
    """What a ``!function`` tag named (recorded, never imported)."""

    spec: str


class _TaskLoader(yaml.SafeLoader):
    """SafeLoader that records ``!function`` instead of refusing the whole file,
    so the error can name the key."""


_TaskLoader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))


@dataclass
class TaskIndex:
    """The single-task YAML files under some include dirs: task name -> file."""

    roots: tuple[Path, ...]
    files: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # task -> (file, its root)
    broken: dict[str, str] = field(default_factory=dict)               # task of a refused file -> why

    @classmethod
    def scan(cls, include_path) -> TaskIndex:
        """Index every ``*.yaml``/``*.yml`` under the dirs of ``include_path``
        (a path or a list of paths); a later dir's task of the same name wins, as in
        lm-eval."""
        paths = include_path if isinstance(include_path, (list, tuple)) else [include_path]
        roots = []
        for p in paths:
            root = Path(p).expanduser()
            if not root.is_dir():
                raise CurvlensError(f"include_path {p}: not a directory; expected a dir of lm-eval task YAMLs")
            roots.append(root.resolve())
        index = cls(tuple(roots))
        for root in roots:
            for f in sorted([*root.rglob("*.yaml"), *root.rglob("*.yml")]):
                try:
                    cfg = _read(root, f.relative_to(root).as_posix(), source=f"include_path {root}", seen=())
                except CurvlensError as err:
                    name = _own_task_name(f)  # a refused file's task is an error, not lm-eval's task
                    if name is not None:
                        index.broken[name] = str(err)
                        index.files.pop(name, None)
                    continue
                name = cfg.get("task")
                if isinstance(name, str) and "group" not in cfg:
                    index.files[name] = (f, root)
                    index.broken.pop(name, None)
        return index

    def __contains__(self, task: object) -> bool:
        return task in self.files or task in self.broken

    def config(self, task: str) -> dict:
        """The checked config dict of ``task``, paths made absolute."""
        if task in self.broken:
            raise CurvlensError(self.broken[task])
        if task not in self.files:
            raise CurvlensError(f"no local task {task!r} under {', '.join(map(str, self.roots))}")
        f, root = self.files[task]
        cfg = _read(root, f.relative_to(root).as_posix(), source=f"include_path {root}", seen=())
        return _checked(cfg, f, root)


def _own_task_name(f: Path) -> str | None:
    """The ``task:`` a file names itself, read without following anything."""
    try:
        cfg = yaml.load(f.read_text(encoding="utf-8"), Loader=_TaskLoader)  # noqa: S506 - a SafeLoader
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    name = cfg.get("task") if isinstance(cfg, dict) else None
    return name if isinstance(name, str) else None


def _read(root: Path, name: str, *, source: str, seen: tuple[Path, ...]) -> dict:
    """A task YAML inside ``root`` with its ``include:`` files merged (its own keys win)."""
    f = contained(root, name, source=source)
    real = f.resolve()
    if real in seen:
        raise CurvlensError(f"{f}: include cycle through {' -> '.join(map(str, seen))}")
    try:
        cfg = yaml.load(f.read_text(encoding="utf-8"), Loader=_TaskLoader)  # noqa: S506 - a SafeLoader
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise CurvlensError(f"{f}: not a readable YAML task file ({err})") from err
    if not isinstance(cfg, dict):
        raise CurvlensError(f"{f}: expected a YAML mapping (an lm-eval task config); got {type(cfg).__name__}")
    includes = cfg.pop("include", None)
    if includes is None:
        return cfg
    merged: dict = {}
    here = f.parent.relative_to(root) if f.parent != root else Path()
    for inc in includes if isinstance(includes, list) else [includes]:
        if not isinstance(inc, str):
            raise CurvlensError(f"{f}: include names {inc!r}; expected a YAML file name relative to {f.parent}")
        rel = (here / inc).as_posix() if not Path(inc).is_absolute() else inc
        part = _read(root, rel, source=f"{f}: include", seen=(*seen, real))
        part.pop("task_list", None)
        merged.update(part)
    merged.update(cfg)
    return merged


def _checked(cfg: dict, f: Path, root: Path) -> dict:
    """Refuse code and outside paths in ``cfg``; make its local paths absolute."""
    _no_functions(cfg, f, ())
    cfg = copy.deepcopy(cfg)
    kwargs = cfg.get("dataset_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise CurvlensError(f"{f}: dataset_kwargs is a {type(kwargs).__name__}; expected a mapping")
    for key in _REFUSED_DATASET_KWARGS:
        if key in kwargs:
            raise CurvlensError(f"{f}: dataset_kwargs.{key} is not accepted in a local task file "
                                f"(curvlens refuses {', '.join(_REFUSED_DATASET_KWARGS)})")
    base = f.parent
    path = cfg.get("dataset_path")
    if not isinstance(path, str) or not path:
        raise CurvlensError(f"{f}: dataset_path is {path!r}; expected one of {', '.join(LOCAL_BUILDERS)} with "
                            "dataset_kwargs.data_files, a dataset dir beside the task, or a hub dataset id")
    if path in LOCAL_BUILDERS:
        if "data_files" not in kwargs and "data_dir" not in kwargs:
            raise CurvlensError(f"{f}: dataset_path {path!r} reads local files; expected "
                                "dataset_kwargs.data_files naming them")
    elif _looks_local(path, base):
        cfg["dataset_path"] = str(_inside(root, base, path, f, "dataset_path", want_dir=True))
    elif not _HUB_ID.match(path) or ".." in path:
        raise CurvlensError(f"{f}: dataset_path {path!r} is neither a local builder ({', '.join(LOCAL_BUILDERS)}), "
                            "a dir beside the task, nor a hub dataset id")
    if "data_files" in kwargs:
        kwargs["data_files"] = _data_files(kwargs["data_files"], root, base, f)
    if "data_dir" in kwargs:
        kwargs["data_dir"] = str(_inside(root, base, kwargs["data_dir"], f, "dataset_kwargs.data_dir",
                                         want_dir=True))
    if kwargs:
        cfg["dataset_kwargs"] = kwargs
    _check_metrics(cfg, f)
    return cfg


def _no_functions(obj, f: Path, where: tuple) -> None:
    if isinstance(obj, _Function):
        raise CurvlensError(f"{f}: {'.'.join(map(str, where)) or 'the file'} is '!function {obj.spec}'; "
                            "curvlens does not import Python from a task dir (it would run it). Use templates "
                            "and lm-eval's own filters and metrics, or run the task by its lm-eval name")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _no_functions(v, f, (*where, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _no_functions(v, f, (*where, i))


def _looks_local(path: str, base: Path) -> bool:
    return path.startswith((".", "/", "~", "\\")) or (base / path).exists()


def _inside(root: Path, base: Path, name, f: Path, key: str, *, want_dir: bool = False) -> Path:
    """``name`` (relative to the task file's dir ``base``) checked inside ``root``; absolute."""
    if not isinstance(name, str) or not name:
        raise CurvlensError(f"{f}: {key} is {name!r}; expected a path relative to {base}")
    rel = (base.relative_to(root) / name).as_posix() if base != root else name
    p = contained(root, rel, source=f, entry=key)
    real = p.resolve()
    if not real.exists():
        raise CurvlensError(f"{f}: {key} names {name!r}, which does not exist ({real})")
    if want_dir and not real.is_dir():
        raise CurvlensError(f"{f}: {key} names {name!r}, which is not a directory")
    if not want_dir and not real.is_file():
        raise CurvlensError(f"{f}: {key} names {name!r}, which is not a file")
    return real


def _data_files(spec, root: Path, base: Path, f: Path):
    """``data_files`` in any of its forms, every entry checked and absolute."""
    def one(name, key):
        if isinstance(name, str) and any(c in name for c in "*?["):
            if Path(name).is_absolute() or name.startswith(("~", "\\")):
                raise CurvlensError(f"{f}: {key} names {name!r}; expected a pattern relative to {base}")
            matches = sorted(glob.glob(str(base / name), recursive=True))
            if not matches:
                raise CurvlensError(f"{f}: {key} pattern {name!r} matches no file under {base}")
            return [str(_inside(root, base, str(Path(m).relative_to(base)), f, key)) for m in matches]
        return [str(_inside(root, base, name, f, key))]

    def many(value, key):
        items = value if isinstance(value, list) else [value]
        return [p for i, v in enumerate(items) for p in one(v, f"{key}[{i}]" if isinstance(value, list) else key)]

    if isinstance(spec, dict):
        return {str(split): many(v, f"dataset_kwargs.data_files.{split}") for split, v in spec.items()}
    return many(spec, "dataset_kwargs.data_files")


def _check_metrics(cfg: dict, f: Path) -> None:
    from lm_eval.api import registry

    known = registry.metric_registry
    if not len(known):
        import lm_eval.api.metrics  # noqa: F401 - registers lm-eval's own metrics

    for i, m in enumerate(cfg.get("metric_list") or []):
        if not isinstance(m, dict) or not isinstance(m.get("metric"), str):
            raise CurvlensError(f"{f}: metric_list[{i}] is {m!r}; expected a mapping with a metric name")
        if m.get("hf_evaluate") or m["metric"] not in known:
            raise CurvlensError(f"{f}: metric_list[{i}] is {m['metric']!r}, which lm-eval does not implement "
                                "itself (it would download and run it with evaluate.load); expected one of "
                                f"{', '.join(sorted(known.keys()))}")
