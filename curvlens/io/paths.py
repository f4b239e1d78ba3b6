"""Containment: a file that a model dir names stays inside that model dir.

Checkpoints come from strangers. An index's ``weight_map``, a Trainer dir's
``optimizer.pt``, a tokenizer file copied beside a merge: each is a name *inside*
a model dir, and after following symlinks it must still be there. Otherwise a
crafted ``model.safetensors.index.json`` naming ``../../secret.safetensors`` (or a
symlinked ``tokenizer.json``) would make curvlens read, or copy into its output,
files the user never pointed it at.

One layout legitimately points elsewhere: the Hugging Face hub cache, whose
``<repo>/snapshots/<revision>/`` files are symlinks into ``<repo>/blobs/``. Those
targets are allowed, and nothing else is.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from curvlens.errors import CurvlensError


def _roots(root: Path) -> list[Path]:
    """The real dirs files of ``root`` may resolve into."""
    real = root.resolve()
    roots = [real]
    # HF hub cache: models--org--name/snapshots/<rev>/ -> models--org--name/blobs/
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        roots.append(real.parent.parent / "blobs")
    return roots


def is_inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (resolved) is ``root`` or lies under it (``root`` resolved).

    Examples
    --------
    >>> is_inside(Path("/a/b/c"), Path("/a/b")), is_inside(Path("/a/bc"), Path("/a/b"))
    (True, False)
    """
    path, root = Path(path), Path(root)
    return path == root or root in path.parents


def contained(root: Path, name: object, *, source: object, entry: str | None = None) -> Path:
    """The file ``name`` that ``source`` names, relative to the model dir ``root``.

    Parameters
    ----------
    root : Path
        The model dir.
    name : str
        A relative file name as the source gives it (``"model-00001.safetensors"``,
        ``"export/exp_avg_sq.safetensors"``).
    source : path or str
        What names the file (an index, a config, the model dir itself), for the
        error message.
    entry : str, optional
        Which entry of ``source`` names it (e.g. the tensor name of an index).

    Returns
    -------
    Path
        ``root / name``, checked to resolve (after symlinks) inside ``root`` (or
        the hub cache's ``blobs`` dir of a snapshot).

    Raises
    ------
    CurvlensError
        If ``name`` is not a non-empty relative path, or resolves outside.

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> contained(d, "model.safetensors", source="index") == d / "model.safetensors"
    True
    >>> contained(d, "../x.safetensors", source="index", entry="w")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    curvlens.errors.CurvlensError: index: entry 'w' names '../x.safetensors', which resolves outside the model dir ...
    """
    where = f"{source}: entry {entry!r}" if entry is not None else f"{source}"
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CurvlensError(f"{where} names {name!r}; expected a file name relative to the model dir")
    if os.path.isabs(name) or Path(name).is_absolute() or name.startswith(("\\", "~")):
        raise CurvlensError(f"{where} names the absolute path {name!r}; expected a file name relative "
                            f"to the model dir {root}")
    candidate = Path(root) / name
    try:
        real = candidate.resolve()
    except (OSError, RuntimeError) as err:  # symlink loops
        raise CurvlensError(f"{where} names {name!r}, which cannot be resolved ({err})") from err
    if not any(is_inside(real, r) for r in _roots(Path(root))):
        raise CurvlensError(f"{where} names {name!r}, which resolves outside the model dir {root} "
                            f"(to {real}); curvlens reads only files inside a model dir")
    return candidate


def model_file(root: Path, name: str, *, source: object = None) -> Path | None:
    """The file ``name`` of the model dir ``root`` when it exists, else None.

    Every file curvlens reads by a name a model dir implies (``tokenizer.json``,
    ``chat_template.jinja``, ``tokenizer_config.json``, ``config.json``) comes
    through here: it must resolve inside ``root`` (:func:`contained`), so a
    symlink pointing elsewhere is an error, never read.

    Examples
    --------
    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> model_file(d, "tokenizer.json") is None
    True
    >>> (d / "tokenizer.json").symlink_to("/etc/hostname")
    >>> model_file(d, "tokenizer.json")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    curvlens.errors.CurvlensError: ... names 'tokenizer.json', which resolves outside the model dir ...
    """
    path = contained(Path(root), name, source=source if source is not None else root)
    return path if path.is_file() else None


def read_model_text(root: Path, name: str, *, source: object = None) -> str | None:
    """The text of the model dir's file ``name`` (:func:`model_file`), or None when absent."""
    path = model_file(root, name, source=source)
    if path is None:
        return None
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise CurvlensError(f"{path}: cannot read ({err})") from err


def read_model_json(root: Path, name: str, *, source: object = None) -> Any:
    """The parsed JSON of the model dir's file ``name`` (:func:`model_file`), or None when absent."""
    text = read_model_text(root, name, source=source)
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as err:
        raise CurvlensError(f"{Path(root) / name}: not valid JSON ({err})") from err


def plain_name(value: object, what: str) -> str:
    """``value`` if it is a plain name (a file stem of a fixed set, never a path).

    A name chosen from a shipped set (a chat template's) must not reach outside
    that set: no separators, no ``.``/``..``, no NUL, nothing absolute.

    Examples
    --------
    >>> plain_name("chatml", "chat_template")
    'chatml'
    >>> plain_name("../secret", "chat_template")
    Traceback (most recent call last):
    ...
    curvlens.errors.CurvlensError: chat_template '../secret' is not a name: it contains a path separator or '..'; expected one of the shipped names
    """
    if not isinstance(value, str) or not value or "\x00" in value:
        raise CurvlensError(f"{what} {value!r} is not a name; expected a non-empty string")
    if any(sep in value for sep in ("/", "\\", os.sep)) or value in (".", "..") or ".." in value \
            or os.path.isabs(value) or value.startswith("~"):
        raise CurvlensError(f"{what} {value!r} is not a name: it contains a path separator or '..'; "
                            "expected one of the shipped names")
    return value


def expert_names(dirs: Sequence[str | os.PathLike]) -> list[str]:
    """Readable, unique names for expert dirs: the dir name, prefixed by as many
    parent dirs as needed to tell equal names apart.

    Examples
    --------
    >>> expert_names(["runs/a/checkpoint-188", "runs/b/checkpoint-188", "math"])
    ['a/checkpoint-188', 'b/checkpoint-188', 'math']
    """
    parts = [Path(d).expanduser().resolve().parts for d in dirs]
    depth = [1] * len(parts)
    while True:
        names = ["/".join(p[-k:]) for p, k in zip(parts, depth)]
        clash = {n for n in names if names.count(n) > 1}
        grow = [i for i, n in enumerate(names) if n in clash and depth[i] < len(parts[i])]
        if not grow:
            return names
        for i in grow:
            depth[i] += 1
