"""One model kept loaded per process, its weights replaced in place between evaluations.

A sweep evaluates many merges of one architecture with one tokenizer. Loading
each from scratch (``from_pretrained``, then lm-eval's wrapper) repeats work the
previous job already did; instead each process keeps one model: when the next
dir has the same architecture, generation config and tokenizer files (compared
by content) and every tensor name and shape lines up, its weights are streamed
into the kept model tensor by tensor (no second copy of the model is built).
Anything else -- another architecture, a missing or extra tensor, a tied weight
saved untied -- loads afresh and replaces the kept model. Memory is one model per
process, as before; :func:`release` frees it.

Every file read here goes through :func:`curvlens.io.paths.contained` (config,
generation config, tokenizer files) or :class:`curvlens.Checkpoint` (weights),
and transformers runs with ``trust_remote_code=False``.
"""
from __future__ import annotations

import gc
import hashlib
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from curvlens.errors import CurvlensError
from curvlens.io.checkpoint import Checkpoint
from curvlens.io.paths import contained

#: Files that decide how text becomes ids (compared by content between models).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json")
_VOLATILE = ("_name_or_path", "transformers_version")

#: Held while a process loads or evaluates: one kept model, one user at a time.
LOCK = threading.RLock()
_SLOT: dict[str, Any] = {}


@dataclass(frozen=True)
class LoadSpec:
    """How a model is placed and wrapped: all of it is part of the kept model's key."""

    device: str
    dtype: str                       # "auto" (the config's) or a torch dtype name
    batch_size: int | str
    lm_kwargs: tuple[tuple[str, Any], ...] = ()


def fingerprint(model_dir: Path, spec: LoadSpec) -> str:
    """A hash of what must match for weights to be swapped in: the config, the
    generation config, the tokenizer files' bytes and ``spec``."""
    parts: dict[str, Any] = {"spec": repr(spec)}
    for name in ("config.json", "generation_config.json"):
        f = contained(model_dir, name, source=model_dir)
        if not f.is_file():
            if name == "config.json":
                raise CurvlensError(f"{model_dir}: no config.json; expected an HF model dir")
            continue
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise CurvlensError(f"{f}: not readable JSON ({err})") from err
        if not isinstance(cfg, dict):
            raise CurvlensError(f"{f}: expected a JSON object; got {type(cfg).__name__}")
        parts[name] = {k: v for k, v in cfg.items() if k not in _VOLATILE}
    for name in TOKENIZER_FILES:
        f = contained(model_dir, name, source=model_dir)
        if f.is_file():
            parts[name] = hashlib.sha256(f.read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def harness_model(model, spec: LoadSpec, *, base: str | None = None, keep: bool = True):
    """lm-eval's ``HFLM`` over ``model`` (an HF dir, or a state dict laid onto
    ``base``), and how it was made: ``"loaded"`` or ``"swapped"`` (weights streamed
    into the kept model). Call with :data:`LOCK` held."""
    if isinstance(model, (str, Path)):
        model_dir = Path(model)
        if not model_dir.is_dir():
            raise CurvlensError(f"{model}: not a directory; expected an HF model dir")
        arch_dir = model_dir
    elif isinstance(model, Mapping) or (hasattr(model, "keys") and hasattr(model, "__getitem__")):
        if base is None:
            raise CurvlensError("lm_eval evaluator: got weights without a dir; pass base=DIR (the HF dir "
                                "whose config and tokenizer they are laid onto)")
        model_dir, arch_dir = None, Path(base)
    else:
        raise CurvlensError(f"lm_eval evaluator: model is a {type(model).__name__}; expected an HF model "
                            "dir or a state dict (with base=)")
    key = fingerprint(arch_dir, spec)
    weights = Checkpoint.open(model if model_dir is None else model_dir)  # containment of index and shards
    if keep and _SLOT.get("key") == key:
        try:
            if _swap(_SLOT["net"], weights):
                return _SLOT["lm"], "swapped"
        except BaseException:
            release()  # half-swapped: never reuse it
            raise
    if keep:
        release()  # the old model goes before the new one loads: one model in memory
    net, tokenizer = _load(arch_dir, spec)
    if model_dir is None and not _swap(net, weights):
        raise CurvlensError(f"lm_eval evaluator: the weights do not line up with {base} (names or shapes differ)")
    lm = _wrap(net, tokenizer, spec)
    if keep:
        _SLOT.update(key=key, net=net, lm=lm)
    return lm, "loaded"


def release() -> None:
    """Drop this process's kept model (its memory is freed)."""
    had_cuda = any(p.is_cuda for p in _SLOT["net"].parameters()) if "net" in _SLOT else False
    _SLOT.clear()
    gc.collect()
    if had_cuda:
        torch.cuda.empty_cache()


def _swap(net: torch.nn.Module, weights: Checkpoint) -> bool:
    """Copy ``weights`` into ``net`` in place if every name and shape lines up."""
    params = net.state_dict()
    names = list(weights.keys())
    if set(names) - params.keys():
        return False
    given = {params[n].data_ptr() for n in names}
    if any(params[n].data_ptr() not in given for n in params.keys() - set(names)):
        return False  # a tensor the file lacks that is not tied to one it has
    if any(tuple(weights.shape(n)) != tuple(params[n].shape) for n in names):
        return False
    with torch.no_grad():
        for n in names:  # one tensor at a time: never a second model in memory
            params[n].copy_(weights[n])
    return True


def _load(arch_dir: Path, spec: LoadSpec):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = spec.dtype if spec.dtype == "auto" else getattr(torch, spec.dtype)
    try:
        # a dir from elsewhere may carry auto_map: never run it, never ask
        tokenizer = AutoTokenizer.from_pretrained(arch_dir, trust_remote_code=False)
        net = AutoModelForCausalLM.from_pretrained(arch_dir, trust_remote_code=False, dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise CurvlensError(f"{arch_dir}: transformers could not load it as a causal LM "
                            f"({type(err).__name__}: {err})") from err
    return net.to(spec.device).eval(), tokenizer


def _wrap(net, tokenizer, spec: LoadSpec):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=net, tokenizer=tokenizer, batch_size=spec.batch_size, **dict(spec.lm_kwargs))
