"""Process-wide settings for one lm-eval run, set for the run and restored after.

* **Offline.** ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` are read once, when
  ``huggingface_hub`` and ``datasets`` are imported, which in a notebook or a
  sweep has long happened; the run sets the variables *and* the flags those
  modules keep, so neither the hub nor ``datasets`` opens a connection (a hub
  dataset is then read from the local cache or fails as an error row).
* **Sandboxed templates.** lm-eval renders a task's Jinja templates
  (``doc_to_text``, ``doc_to_target``, ...) with a plain ``jinja2.Environment``,
  in which a template can reach Python internals (``{{ x.__class__ ... }}``).
  For the run, lm-eval's environment is replaced by Jinja's
  ``ImmutableSandboxedEnvironment`` with the same options and filters, so a task
  file from elsewhere renders text and nothing else; lm-eval's own tasks render
  unchanged.
* **Quiet.** lm-eval's per-request progress bars and its warnings about a model
  passed in as an object are noise in a sweep; with ``quiet`` they are dropped
  (errors still raise).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator

_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
#: (module, attribute) flags that mean "offline" once their module is imported.
_OFFLINE_FLAGS = (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                  ("datasets.config", "HF_DATASETS_OFFLINE"))


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """No hub or ``datasets`` network access inside the block (see the module docstring)."""
    saved_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
    saved_flags = []
    for k in _OFFLINE_ENV:
        os.environ[k] = "1"
    for mod_name, attr in _OFFLINE_FLAGS:
        mod = sys.modules.get(mod_name)
        if mod is not None and hasattr(mod, attr):
            saved_flags.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, True)
    try:
        yield
    finally:
        for mod, attr, value in reversed(saved_flags):
            setattr(mod, attr, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def sandboxed_templates() -> Iterator[None]:
    """lm-eval's Jinja environment replaced by a sandboxed one for the block."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from lm_eval import utils as harness_utils

    plain = harness_utils.env
    sandbox = ImmutableSandboxedEnvironment(loader=plain.loader, undefined=plain.undefined,
                                            keep_trailing_newline=plain.keep_trailing_newline)
    sandbox.filters.update(plain.filters)
    harness_utils.env = sandbox
    try:
        yield
    finally:
        harness_utils.env = plain


class _Discard(io.TextIOBase):
    """A text stream that drops what is written (progress bars of a long run add up)."""

    def write(self, s: str) -> int:
        return len(s)


@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """lm-eval's and ``datasets``' progress output and warnings off for the block."""
    if not enabled:
        yield
        return
    import datasets

    loggers = [logging.getLogger(n) for n in ("lm_eval", "datasets", "transformers", "accelerate")]
    levels = [lg.level for lg in loggers]
    bars = datasets.is_progress_bar_enabled()
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        # lm-eval's tqdm bars write to sys.stderr when created and take no switch
        with contextlib.redirect_stderr(_Discard()):
            yield
    finally:
        if bars:
            datasets.enable_progress_bars()
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
