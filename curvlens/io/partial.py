"""Reading a few small pieces of a tensor without reading the tensor.

A model-wide selection can be bracketed from a sample of each tensor's entries
(:mod:`curvlens.passes.scout`) for a fraction of a full read, but only if the
sample costs what it reads: through a memory map every page fault pulls in the
kernel's read-ahead window (128 KB or more), so a sample spread over a tensor
reads all of it. :func:`read_chunks` reads each piece with ``pread`` at the
offset the safetensors header gives, nothing more.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np
import torch

from curvlens.errors import CurvlensError

__all__ = ["read_chunks", "gather_chunks"]

_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8}
_HEADERS: dict[tuple[str, int, int], tuple[int, dict]] = {}
_LOCK = threading.Lock()


def _header(file: Path) -> tuple[int, dict]:
    """(data start, header dict) of a safetensors file, cached by path, size and mtime."""
    st = file.stat()
    key = (str(file), st.st_size, st.st_mtime_ns)
    with _LOCK:
        if key in _HEADERS:
            return _HEADERS[key]
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n <= 0 or n > st.st_size - 8:
            raise CurvlensError(f"{file}: corrupt safetensors header length {n}")
        try:  # the file was opened once already; this guards a file changed since
            head = json.loads(fh.read(n))
        except ValueError as err:
            raise CurvlensError(f"{file}: corrupt safetensors header ({err})") from err
    if not isinstance(head, dict):
        raise CurvlensError(f"{file}: corrupt safetensors header (not a JSON object)")
    with _LOCK:
        _HEADERS[key] = (8 + n, head)
    return 8 + n, head


def read_chunks(file: Path, key: str, starts, length: int) -> torch.Tensor:
    """``length`` consecutive flat entries of tensor ``key`` at each of ``starts``
    (0-based flat indices), as a ``(len(starts), length)`` tensor of its dtype.

    Raises
    ------
    CurvlensError
        An unknown key or dtype, or a chunk outside the tensor's bytes.
    """
    start, head = _header(file)
    info = head.get(key)
    if not isinstance(info, dict) or info.get("dtype") not in _NP:
        raise CurvlensError(f"{file}: no readable tensor {key!r} for a partial read")
    npt = np.dtype(_NP[info["dtype"]])
    lo, hi = (int(x) for x in info["data_offsets"])
    item = npt.itemsize
    starts = np.asarray(starts, dtype=np.int64)
    out = np.empty((len(starts), length), dtype=npt)
    fd = os.open(file, os.O_RDONLY)
    try:
        for row, s in enumerate(starts.tolist()):
            a = start + lo + s * item
            b = a + length * item
            if s < 0 or b > start + hi:
                raise CurvlensError(f"{file}: chunk {s}..{s + length} of {key!r} lies outside the tensor")
            buf = os.pread(fd, b - a, a)
            if len(buf) != b - a:
                raise CurvlensError(f"{file}: truncated while reading {key!r}")
            out[row] = np.frombuffer(buf, dtype=npt)
    finally:
        os.close(fd)
    t = torch.from_numpy(out)
    return t.view(torch.bfloat16) if info["dtype"] == "BF16" else t


def gather_chunks(flat: torch.Tensor, starts, length: int) -> torch.Tensor:
    """The same pieces cut from a tensor already in memory (or memory-mapped)."""
    idx = torch.as_tensor(np.asarray(starts, dtype=np.int64))[:, None] + torch.arange(length)
    return flat.reshape(-1)[idx]
