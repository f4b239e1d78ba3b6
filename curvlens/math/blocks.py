"""Block-wise loops over flat tensors: the unit of work of every elementwise pass.

A pass over a 100M-entry tensor written as one torch expression allocates a
100M-entry temporary per operation; on a CPU each of them faults in fresh pages
and streams through main memory. The same pass over blocks of 64K entries keeps
every temporary (256 KB in fp32) in the CPU cache and reuses the allocator's
memory, which on the 2-core benchmark machine is several times faster. On a GPU
kernel launches dominate instead, so blocks there are large.

Functions that loop over blocks give the same result whatever the block size
whenever every output entry depends only on the inputs at that entry; those
that also need whole-tensor quantities (top-k thresholds, L1 norms) compute them
in a first pass over the same blocks.
"""
from __future__ import annotations

import zlib
from typing import Iterator

import torch

__all__ = ["block_size", "blocks"]

#: Entries per block by device type.
BLOCK = {"cpu": 1 << 16, "cuda": 1 << 24}


def block_size(device: torch.device | str) -> int:
    """Entries per block for work on ``device``.

    Examples
    --------
    >>> block_size("cpu")
    65536
    """
    return BLOCK.get(torch.device(device).type, 1 << 22)


def blocks(n: int, size: int) -> Iterator[slice]:
    """Consecutive slices covering ``range(n)``, each at most ``size`` long.

    An empty range yields one empty slice, so a loop over blocks always runs
    once (and code after it sees initialised accumulators).

    Examples
    --------
    >>> list(blocks(5, 2))
    [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    >>> list(blocks(0, 2))
    [slice(0, 0, None)]
    """
    for start in range(0, max(n, 1), size):
        yield slice(start, min(n, start + size))


class Workspace:
    """Reusable scratch buffers, so a model-wide pass does not page-fault fresh
    memory for every temporary of every tensor (on a CPU that costs as much as
    the arithmetic). Buffers grow to the largest tensor seen and are reused."""

    def __init__(self):
        self._bufs: dict[tuple, torch.Tensor] = {}

    def get(self, key, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        k = (key, dtype, device)
        buf = self._bufs.get(k)
        if buf is None or buf.numel() < n:
            self._bufs.pop(k, None)
            buf = torch.empty(n, dtype=dtype, device=device)
            self._bufs[k] = buf
        return buf[:n]


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed stable across processes (unlike ``hash``): the same seed
    and tensor name give the same random draws in any order and on any machine.

    Examples
    --------
    >>> tensor_seed(0, "a") == tensor_seed(0, "a") != tensor_seed(1, "a")
    True
    """
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)
