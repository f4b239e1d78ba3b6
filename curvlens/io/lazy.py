"""``LazyTensors``: the read-only mapping behind :class:`~curvlens.io.checkpoint.Checkpoint`
and :class:`~curvlens.io.moments.Moments`.

What is known of each tensor without reading it (a shape, a dtype, a file) lives
in ``entries``; ``m[name]`` reads that one tensor through ``reader``. Iteration,
length and membership never read data.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from curvlens.io.partial import gather_chunks


class LazyTensors(Mapping):
    """A lazy, read-only mapping ``name -> torch.Tensor``.

    Examples
    --------
    >>> m = LazyTensors({"w": (2,)}, lambda name: torch.ones(2))
    >>> list(m), "w" in m, m["w"]
    (['w'], True, tensor([1., 1.]))
    """

    def __init__(self, entries: dict[str, Any], reader: Callable[[str], torch.Tensor]):
        self._entries = entries
        self._reader = reader

    #: ``(name, starts, length) -> chunks`` reading only those bytes (set for
    #: safetensors files, :mod:`curvlens.io.partial`); None: cut from a whole read.
    _partial: Callable | None = None

    def _finish(self, t: torch.Tensor) -> torch.Tensor:
        """What every read returns of the stored values; subclasses post-process here."""
        return t

    def _load(self, name: str) -> torch.Tensor:
        """Read tensor ``name`` (known to exist)."""
        return self._finish(self._reader(name))

    @property
    def partial_reads(self) -> bool:
        """Whether :meth:`chunks` reads only the chunks (safetensors files)."""
        return self._partial is not None

    def chunks(self, name: str, starts, length: int) -> torch.Tensor:
        """``length`` consecutive flat entries of ``name`` at each of ``starts``, as a
        ``(len(starts), length)`` tensor, post-processed as every read: from
        safetensors files by ``pread`` of just those bytes, else cut from the tensor."""
        if name not in self._entries:
            raise KeyError(name)
        if self._partial is not None:
            return self._finish(self._partial(name, starts, length))
        return self._finish(gather_chunks(self._reader(name), starts, length))

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._entries:
            raise KeyError(name)
        return self._load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
