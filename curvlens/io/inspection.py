"""``inspect``: what each dir holds, from headers only — the first thing to run on your dirs.

For every path: the weights (format, files, tensors, parameters, dtypes), the
architecture its ``config.json`` declares (read as data), and the second moments:
where they come from (:class:`~curvlens.io.moments_source.MomentsSource`: format,
file, how parameter names were found — the tier — and stored dtypes), step and
betas, the saved tensors no optimizer state covers. Nothing is read beyond
headers, pickled metadata over a memory map and ``config.json``; a path that
cannot be read gets its error in the row instead of stopping the others.
"""
from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from curvlens.errors import CurvlensError
from curvlens.io.architecture import read_config
from curvlens.io.checkpoint import Checkpoint, PathLike
from curvlens.io.moments import Moments
from curvlens.io.moments_source import dtype_names
from curvlens.io.paths import contained

INSPECT_COLUMNS = ["path", "weights_format", "weight_files", "tensors", "params", "weight_dtypes", "model_type",
                   "architectures", "moments_format", "moments_file", "names_from", "moment_dtypes", "moments",
                   "step", "beta1", "beta2", "untrained", "never_updated", "note"]


def inspect(paths: PathLike | Sequence[PathLike]) -> pd.DataFrame:
    """Describe model dirs, Trainer checkpoints and moments files without reading tensor data.

    Parameters
    ----------
    paths : path or sequence of paths
        HF model dirs, ``checkpoint-N`` dirs, a Trainer run dir (one row per
        ``checkpoint-N`` inside), weights or moments files.

    Returns
    -------
    pandas.DataFrame
        One row per model: ``path, weights_format, weight_files, tensors, params,
        weight_dtypes, model_type, architectures, moments_format, moments_file,
        names_from`` (how the optimizer's parameters got their names: the tier
        and how the names are saved), ``moment_dtypes, moments, step, beta1,
        beta2, untrained, never_updated, note`` (what could not be read, and why).
    """
    if isinstance(paths, (str, Path)) or hasattr(paths, "__fspath__"):
        paths = [paths]
    rows = []
    for p in paths:
        for target, problem in _targets(Path(p)):
            rows.append(_row(target) if problem is None else {"path": str(target), "note": problem})
    df = pd.DataFrame(rows, columns=INSPECT_COLUMNS)
    for col in ("tensors", "params", "moments", "step", "untrained", "never_updated"):
        df[col] = df[col].astype("Int64")
    return df


def _targets(path: Path) -> list[tuple[Path, str | None]]:
    """The path itself, or the ``checkpoint-N`` dirs of a Trainer run dir (by N),
    each with why it cannot be read (a link out of the run dir)."""
    if path.is_dir() and not any((path / f).exists() for f in ("config.json", "model.safetensors",
                                                              "model.safetensors.index.json", "optimizer.pt")):
        found = sorted((c for c in path.iterdir() if re.fullmatch(r"checkpoint-\d+", c.name)),
                       key=lambda c: int(c.name.split("-")[1]))
        out = []
        for c in found:
            try:
                out.append((contained(path, c.name, source=path), None))
            except CurvlensError as err:
                out.append((c, str(err)))
        if out:
            return out
    return [(path, None)]


def _holds_moments_only(path: Path) -> bool:
    """A file named as second moments (``optimizer*.pt``, ``*exp_avg_sq*``): its
    tensors are not a model's weights."""
    return path.is_file() and (path.name.startswith("optimizer") or "exp_avg_sq" in path.name)


def _row(path: Path) -> dict:
    row: dict = {"path": str(path)}
    notes = []
    try:
        if _holds_moments_only(path):
            raise CurvlensError("a moments file: no weights")
        ckpt = Checkpoint.open(path)
        files = sorted({str(ckpt.file(n).name) for n in ckpt.keys() if ckpt.file(n) is not None})
        row.update(weights_format=_weights_format(ckpt, path, files), weight_files=len(files), tensors=len(ckpt),
                   params=ckpt.numel, weight_dtypes=", ".join(dtype_names(ckpt.dtype(n) for n in ckpt.keys())))
    except CurvlensError as err:
        ckpt = None
        if not _holds_moments_only(path):
            notes.append(f"weights: {err}")
    if path.is_dir():
        try:
            cfg = read_config(path)
        except CurvlensError as err:
            cfg = None
            notes.append(str(err))
        if cfg is not None:
            archs = cfg.get("architectures")
            row.update(model_type=str(cfg.get("model_type")),
                       architectures=", ".join(a for a in archs if isinstance(a, str))
                       if isinstance(archs, list) else None)
    if not (path.is_dir() or _holds_moments_only(path)):
        row["note"] = " | ".join(notes) or None
        return row
    try:
        with warnings.catch_warnings():  # the counts below say it
            warnings.simplefilter("ignore")
            m = Moments.open(path, checkpoint=ckpt if ckpt is not None and path.is_dir() else None)
        src = m.source
        betas = src.betas or (None, m.beta2)
        row.update(moments_format=src.format, moments_file=str(src.file) if src.file is not None else None,
                   names_from=src.names, moment_dtypes=", ".join(src.dtypes), moments=len(m), step=m.step,
                   beta1=betas[0], beta2=m.beta2 if m.beta2 is not None else betas[1],
                   untrained=len(m.untrained), never_updated=len(m.never_updated))
        if ckpt is not None and path.is_dir():
            problems = m.shape_problems(ckpt)
            if problems:
                notes.append(f"moments do not line up with the weights: {'; '.join(problems[:3])}"
                             + (f" ({len(problems)} problems)" if len(problems) > 3 else ""))
    except CurvlensError as err:
        notes.append(f"moments: {err}")
    row["note"] = " | ".join(" ".join(n.split()) for n in notes) or None
    return row


def _weights_format(ckpt: Checkpoint, path: Path, files: list[str]) -> str:
    kinds = sorted({Path(f).suffix.lstrip(".") for f in files}) or ["in memory"]
    kind = "safetensors" if kinds == ["safetensors"] else "/".join(kinds)
    index = path.is_dir() and any((path / n).is_file() for n in ("model.safetensors.index.json",
                                                                  "pytorch_model.bin.index.json"))
    if index:
        return f"{kind}, {len(files)} shards + index"
    return f"{kind}, {len(files)} file" + ("s" if len(files) != 1 else "")
