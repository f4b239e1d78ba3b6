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

    def _load(self, name: str) -> torch.Tensor:
        """Read tensor ``name`` (known to exist); subclasses post-process here."""
        return self._reader(name)

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
