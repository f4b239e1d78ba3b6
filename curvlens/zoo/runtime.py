"""Context managers that set process-wide knobs for a block and restore them after."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the caller's count.

    The zoo's models are so small that one thread is as fast as two on an idle
    machine, and on a busy one extra threads mostly wait on each other (measured on
    a loaded 2-core machine: a training step took 9x longer with two threads).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def hf_progress_bars_off() -> Iterator[None]:
    """Silence transformers' own loading/saving bars (noise for these tiny models)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
