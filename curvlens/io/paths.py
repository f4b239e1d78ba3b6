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

import os
from pathlib import Path

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
