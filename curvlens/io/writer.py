"""Atomic, streaming writer of HF model dirs.

Tensors arrive one name at a time. When the writer knows every name, shape and
dtype up front (``plan=``, which the merge engine always gives), each shard's
safetensors header is written first and every tensor's bytes are appended the
moment it arrives: nothing is buffered, and writing overlaps computing. Without a
plan, tensors are buffered up to ``max_shard_size`` bytes and flushed per shard.
Every floating tensor is checked finite as it is added (:func:`check_finite`),
whatever made it: curvlens never writes a NaN or an Inf. Everything is written
into a partial dir beside the target
(:class:`curvlens.io.atomic.AtomicDir`), renamed into place only when complete:
an exception, SIGINT or SIGTERM half-way leaves nothing behind, an existing
target is never touched without ``overwrite=True``, and an output that is,
contains or lies inside an input (``inputs=``, and the config and tokenizer
files copied beside the weights) is refused. :func:`write_tensor_file` writes one
safetensors file (moments, a Fisher) under the same two rules.
"""
from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
from pathlib import Path

import torch

from curvlens.errors import CurvlensError
from curvlens.io.atomic import AtomicDir, check_output, os_error
from curvlens.io.checkpoint import SAFETENSORS_DTYPES, SAFETENSORS_INDEX, PathLike
from curvlens.io.paths import contained
from curvlens.runtime import Background

_ST_CODES = {dt: code for code, dt in SAFETENSORS_DTYPES.items() if dt is not None}

# Files a user expects beside the weights so that transformers can load the model.
REFERENCE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
    "chat_template.jinja",
)
_MODEL_FILES = ("config.json", "generation_config.json")  # the rest are the tokenizer's
_FINITE_CHUNK = 1 << 22  # entries per isfinite() chunk: a bounded temporary, whatever the tensor


def check_finite(name: str, tensor: torch.Tensor, *, out: object, made_by: str | None = None) -> None:
    """Refuse a floating ``tensor`` with a NaN or an Inf, naming the output, the
    tensor and (``made_by``) what made it, when the caller knows.

    The one finiteness check of everything curvlens writes (:class:`ModelWriter`,
    :func:`write_tensor_file`), whatever the dtype and whatever computed it.

    Examples
    --------
    >>> check_finite("w", torch.tensor([1.0, float("inf")]), out="merged", made_by="scale 1e39")
    Traceback (most recent call last):
    ...
    curvlens.errors.CurvlensError: merged: tensor 'w' has 1 non-finite value(s) of 2 (made by scale 1e39); curvlens never writes a NaN or an Inf
    """
    if not tensor.is_floating_point():
        return
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return
    # one read, no temporary: min and max are NaN when any entry is and +-Inf when
    # one is (30x faster than isfinite().all() on a CPU); the count only on failure
    lo, hi = torch.aminmax(flat)
    if math.isfinite(float(lo)) and math.isfinite(float(hi)):
        return
    bad = 0
    for start in range(0, flat.numel(), _FINITE_CHUNK):
        chunk = flat[start:start + _FINITE_CHUNK]
        if not bool(torch.isfinite(chunk).all()):
            bad += int((~torch.isfinite(chunk)).sum())
    if bad:
        by = f" (made by {made_by})" if made_by else ""
        raise CurvlensError(f"{out}: tensor {name!r} has {bad} non-finite value(s) of {flat.numel()}{by}; "
                            "curvlens never writes a NaN or an Inf")


def parse_size(size: int | str) -> int:
    """Parse ``"2GB"``, ``"500MB"``, ``"1GiB"`` or an int number of bytes.

    Examples
    --------
    >>> parse_size("2GB"), parse_size("1KiB"), parse_size(10)
    (2000000000, 1024, 10)
    """
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(size), flags=re.I)
    if not m:
        raise CurvlensError(f"max_shard_size={size!r} is not a size like '2GB' or '500MB'")
    unit = m.group(2).upper().rstrip("B")
    base = 1024 if unit.endswith("I") else 1000
    power = " KMGT".index(unit[:1] or " ") if unit else 0
    return int(float(m.group(1)) * base**power)


class ModelWriter:
    """Write a model dir tensor by tensor; use as a context manager.

    Parameters
    ----------
    out : path
        Target dir. Must not exist unless ``overwrite=True``.
    reference_dir : path, optional
        Dir whose config and tokenizer files are copied beside the weights.
    max_shard_size : int or str
        Largest shard in bytes (also the writer's peak buffer).
    overwrite : bool
        Replace an existing ``out`` (only once the new one is complete).
    extra_files : dict, optional
        ``{filename: text}`` written beside the weights (e.g. the merge config).
    config_overrides : dict, optional
        Keys to set in the copied ``config.json`` (e.g. the dtype of the weights).
    plan : sequence of (name, shape, dtype), optional
        Every tensor that will be added, in order. Enables unbuffered streaming
        writes; ``add`` then checks each tensor against the plan.
    inputs : sequence of path, optional
        The models (and moments) the written tensors come from: ``out`` may not
        be, contain or lie inside any of them, even with ``overwrite`` (the
        config and tokenizer files copied from ``reference_dir`` and
        ``tokenizer_dir`` are inputs too, always).
    tokenizer_dir : path, optional
        Dir whose tokenizer files are copied instead of ``reference_dir``'s
        (a merge's ``tokenizer_source``).
    background : bool
        With a ``plan``: write the bytes from a second thread, in order, at
        most :data:`WRITE_BUDGET` bytes behind, so the next tensor is computed
        while this one is written. The caller hands each tensor over: it must
        not change it after ``add``. An error of the write is raised by a later
        ``add`` or when the block ends.

    Examples
    --------
    >>> import tempfile, torch, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()) / "merged"
    >>> with ModelWriter(d) as w:
    ...     w.add("a.weight", torch.ones(2, 2))
    >>> sorted(p.name for p in d.iterdir())
    ['model-00001-of-00001.safetensors', 'model.safetensors.index.json']
    """

    def __init__(self, out: PathLike, reference_dir: PathLike | None = None, *,
                 max_shard_size: int | str = "1GB", overwrite: bool = False,
                 extra_files: dict[str, str] | None = None, plan=None,
                 config_overrides: dict | None = None, inputs=(), tokenizer_dir: PathLike | None = None,
                 background: bool = False):
        self.out = Path(out)
        self._writes = (Background(True, WRITE_BUDGET, when_full="wait", name="curvlens-write")
                        if background and plan is not None else None)
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else None
        self._plan = _shard_plan(plan, parse_size(max_shard_size)) if plan is not None else None
        self._pos = 0
        self._fh = None
        self.reference_dir = Path(reference_dir) if reference_dir is not None else None
        self.max_shard_size = parse_size(max_shard_size)
        self.overwrite = overwrite
        self.extra_files = dict(extra_files or {})
        self.config_overrides = dict(config_overrides or {})
        # the files copied beside the weights are inputs too (their dirs may hold the output)
        copied = [d / f for d in (self.reference_dir, self.tokenizer_dir) if d is not None
                  for f in REFERENCE_FILES if os.path.lexists(d / f)]
        self._atomic = AtomicDir(self.out, overwrite=overwrite, inputs=[*inputs, *copied])
        self._tmp: Path | None = None
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._total = 0
        self._names: set[str] = set()

    def __enter__(self) -> ModelWriter:
        self._tmp = self._atomic.__enter__()
        return self

    def add(self, name: str, tensor: torch.Tensor, *, made_by: str | None = None) -> None:
        """Queue one tensor; flushes a shard when the buffer would exceed the limit.

        A floating tensor with a NaN or an Inf is refused (:func:`check_finite`;
        ``made_by`` says what computed it, for the message) and nothing is written.
        """
        if self._tmp is None:
            raise CurvlensError("ModelWriter.add called outside a 'with' block")
        if name in self._names:
            raise CurvlensError(f"{self.out}: tensor {name!r} written twice")
        check_finite(name, tensor, out=self.out, made_by=made_by)
        if self._plan is not None:
            try:
                self._write_planned(name, tensor)
            except OSError as err:
                raise os_error(self.out, err, f"write tensor {name!r}") from err
            return
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_size:
            try:
                self._flush()
            except OSError as err:
                raise os_error(self.out, err, "write a shard") from err
        self._names.add(name)
        self._buffer[name] = tensor.detach().to("cpu").contiguous()
        self._buffer_bytes += nbytes
        self._total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        path = self._tmp / f"shard-{len(self._shards):05d}.safetensors"
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        self._shards.append((path, list(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def _write_planned(self, name: str, tensor: torch.Tensor) -> None:
        if self._pos >= len(self._plan):
            raise CurvlensError(f"{self.out}: tensor {name!r} is not in the write plan")
        shard, pname, shape, dtype, header = self._plan[self._pos]
        if (pname, tuple(shape), dtype) != (name, tuple(tensor.shape), tensor.dtype):
            raise CurvlensError(
                f"{self.out}: expected tensor {pname!r} {tuple(shape)} {dtype} next, "
                f"got {name!r} {tuple(tensor.shape)} {tensor.dtype}")
        path = None
        if header is not None:  # first tensor of a new shard
            path = self._tmp / f"shard-{shard:05d}.safetensors"
            self._shards.append((path, []))
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        self._shards[-1][1].append(name)
        self._names.add(name)
        self._total += t.numel() * t.element_size()
        self._pos += 1
        if self._writes is None:
            self._write_bytes(path, header, t)
        else:
            self._writes.submit(lambda: self._write_job(path, header, t, name), t.numel() * t.element_size())

    def _write_bytes(self, path: Path | None, header: bytes | None, t: torch.Tensor) -> None:
        """One planned tensor's bytes (after its shard's header when it opens one)."""
        if path is not None:
            if self._fh is not None:
                self._fh.close()
            self._fh = open(path, "wb")
            self._fh.write(header)
        self._fh.write(memoryview(t.view(torch.uint8).numpy()))

    def _write_job(self, path: Path | None, header: bytes | None, t: torch.Tensor, name: str) -> None:
        """:meth:`_write_bytes` on the writer's thread: its OSError becomes the
        CurvlensError :meth:`add` would have raised, naming this tensor."""
        try:
            self._write_bytes(path, header, t)
        except OSError as err:
            raise os_error(self.out, err, f"write tensor {name!r}") from err

    def _finish(self) -> None:
        if self._writes is not None:
            self._writes.results()  # every byte written (or the first write's error raised)
            self._writes.close()
        if self._plan is not None:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
            if self._pos != len(self._plan):
                raise CurvlensError(f"{self.out}: {len(self._plan) - self._pos} planned tensor(s) were "
                                    f"never written, starting with {self._plan[self._pos][1]!r}")
        elif self._buffer or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, (path, names) in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(self._tmp / final)
            weight_map.update({k: final for k in names})
        index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))}
        (self._tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
        for fname in REFERENCE_FILES:
            d = self.reference_dir
            if self.tokenizer_dir is not None and fname not in _MODEL_FILES:
                d = self.tokenizer_dir
            if d is None:
                continue
            # a symlinked tokenizer.json must not smuggle an outside file into the output
            src = contained(d, fname, source=d)
            if src.is_file():
                shutil.copyfile(src, self._tmp / fname)
        cfg = self._tmp / "config.json"
        if self.config_overrides and cfg.is_file():
            try:
                data = json.loads(cfg.read_text())
            except ValueError as err:
                raise CurvlensError(f"{self.reference_dir / 'config.json'}: not valid JSON ({err})") from err
            if not isinstance(data, dict):
                raise CurvlensError(f"{self.reference_dir / 'config.json'}: expected a JSON object")
            data.update(self.config_overrides)
            cfg.write_text(json.dumps(data, indent=2))
        for fname, text in self.extra_files.items():
            (self._tmp / fname).write_text(text)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                try:
                    self._finish()
                except OSError as err:
                    raise os_error(self.out, err, "finish writing") from err
        except BaseException as err:
            self._close()
            self._atomic.__exit__(type(err), err, err.__traceback__)
            raise
        self._close()
        self._atomic.__exit__(exc_type, exc, tb)

    def _close(self) -> None:
        if self._writes is not None:  # stopped (queued writes dropped) before the temporary dir is removed
            self._writes.close()
            self._writes = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        self._buffer = {}
        self._tmp = None


#: Bytes of a background writer's queued tensors before ``add`` waits (a tensor
#: is always admitted when none is queued): enough to write one tensor beside the
#: next one's math, little enough not to raise a merge's peak memory much (a TIES
#: merge of a 250M x 3 zoo: 8.7 -> 7.5 s).
WRITE_BUDGET = 64 << 20


def _shard_plan(plan, max_bytes: int) -> list:
    """Assign planned tensors to shards and pre-build each shard's header.

    Returns one entry per tensor: ``(shard, name, shape, dtype, header_bytes or
    None)``; the header comes with the first tensor of each shard.
    """
    shards: list[list] = [[]]
    size = 0
    for name, shape, dtype in plan:
        if dtype not in _ST_CODES:
            raise CurvlensError(f"tensor {name!r}: dtype {dtype} cannot be written as safetensors")
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, tuple(shape), dtype, nbytes))
        size += nbytes
    out = []
    for i, items in enumerate(shards):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype, nbytes in items:
            header[name] = {"dtype": _ST_CODES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
        blob = len(raw).to_bytes(8, "little") + raw
        for j, (name, shape, dtype, _) in enumerate(items):
            out.append((i, name, shape, dtype, blob if j == 0 else None))
    return out


def write_tensor_file(tensors, file, *, metadata: dict | None = None, overwrite: bool = False,
                      inputs=()) -> Path:
    """Write ``{name: tensor}`` as one safetensors file, atomically.

    Each tensor is checked finite (:func:`check_finite`); the file may not be,
    or lie inside, any of ``inputs``; it is written to a hidden temporary beside
    its place and renamed in when complete (an existing file is replaced only
    with ``overwrite``); parent dirs this call created are removed on failure.
    Returns the file's path.
    """
    from safetensors.torch import save_file

    file = Path(file).expanduser()
    for name, t in tensors.items():
        check_finite(name, t, out=file)
    real = check_output(file, inputs, is_file=True)
    if (real.exists() or real.is_symlink()) and not overwrite:
        raise CurvlensError(f"{file} already exists; pass overwrite=True to replace it")
    created = [p for p in [real.parent, *real.parent.parents] if not p.exists()]
    tmp = real.with_name(f".{real.name}.partial-{secrets.token_hex(4)}")
    try:
        for p in reversed(created):
            p.mkdir()
        save_file(tensors, str(tmp), metadata=metadata)
        if (real.exists() or real.is_symlink()) and not overwrite:
            raise CurvlensError(f"{file} appeared while writing; pass overwrite=True to replace it")
        os.replace(tmp, real)
        created = []
    except OSError as err:
        raise os_error(file, err, "write the file") from err
    finally:
        tmp.unlink(missing_ok=True)
        for p in created:  # deepest first, only if still empty
            try:
                p.rmdir()
            except OSError:
                break
    return file


def write_model(tensors, out: PathLike, reference_dir: PathLike | None = None, **kwargs) -> Path:
    """Write ``(name, tensor)`` pairs (any iterable, consumed lazily) as an HF model dir.

    Keyword arguments are those of :class:`ModelWriter`. Returns ``out``.
    """
    items = tensors.items() if hasattr(tensors, "items") else tensors
    with ModelWriter(out, reference_dir, **kwargs) as w:
        for name, t in items:
            w.add(name, t)
    return Path(out)
