"""Context managers that set process-wide knobs for a block and restore them after."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator



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
