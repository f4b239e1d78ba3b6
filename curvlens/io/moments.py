"""``Moments``: a lazy mapping from parameter name to its Adam second moment.

Sources, in the layouts users actually have:

* an exported ``exp_avg_sq.safetensors`` keyed by parameter name (the OTA paper's
  release layout ``<expert>/export/exp_avg_sq.safetensors``), also with keys
  ``<name>.exp_avg_sq``;
* a ``torch.optim`` state dict (``optimizer.pt``), whose state is keyed by parameter
  *index*: indices are mapped to names through the order in which the optimizer saw
  the parameters, and every shape is checked;
* a state dict whose state is keyed by name (``{"state": {name: {"exp_avg_sq": ...}}}``);
* an HF Trainer checkpoint dir (``optimizer.pt`` beside the model files);
* DeepSpeed ZeRO 1/2/3 and ``torch.distributed.checkpoint`` (FSDP) dirs, read shard
  by shard (:mod:`curvlens.io.distributed`).

Adam's ``exp_avg_sq`` is biased towards zero early in training; the paper uses it
raw. ``bias_correction=True`` divides by ``1 - beta2**step`` when both are known.
"""
from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from curvlens.errors import CurvlensError
from curvlens.io.checkpoint import Checkpoint, PathLike, read_safetensor, safetensors_infos, torch_load
from curvlens.io.lazy import LazyTensors
from curvlens.io.distributed import LAYOUTS as SHARDED_LAYOUTS
from curvlens.io.distributed import find_sharded
from curvlens.io.sharded_source import ShardedSource
from curvlens.io.moments_source import MomentsSource, dtype_names, group_betas, meta_betas, warn_untrained
from curvlens.io.partial import read_chunks
from curvlens.io.optimizer_order import name_index_state
from curvlens.io.paths import contained

EXPORT_RELPATH = Path("export") / "exp_avg_sq.safetensors"
_SUFFIX = ".exp_avg_sq"


class Moments(LazyTensors):
    """Lazy, read-only mapping ``name -> exp_avg_sq`` (fp32), optionally bias-corrected.

    Use :meth:`open`.

    Attributes
    ----------
    step : int or None
        Optimizer step count, when the source records it (the largest, where a
        parameter no gradient reached at some steps has fewer; bias correction
        then uses each parameter's own count).
    beta2 : float or None
        Adam's beta2, when the source records it.
    bias_corrected : bool
        Whether reads are divided by ``1 - beta2**step``.
    metadata : dict
        A safetensors source's metadata (``kind``, ``n_examples``, ``loss`` for a
        data Fisher written by :func:`curvlens.estimate_fisher`); for a sharded
        source its description (``format``: ``deepspeed`` or
        ``torch.distributed.checkpoint``, ``zero_stage``, ``world_size``, ``step``,
        ``betas``, ...).
    source : MomentsSource
        Format, file, how names were found (the tier), stored dtypes, betas.
    untrained : tuple of str
        Saved tensors no optimizer state covers (buffers such as
        ``final_logits_bias``): their moments read as 0.
    """

    def __init__(self, shapes: dict[str, torch.Size], reader, *, label: str,
                 step: int | None = None, beta2: float | None = None,
                 bias_correction: bool = False, path: Path | None = None):
        super().__init__(shapes, reader)
        self._shapes = shapes
        self.label = label
        self.path = path
        #: The safetensors file's metadata (strings), e.g. ``kind=empirical_fisher``
        #: for a Fisher from :func:`curvlens.estimate_fisher`; empty for other sources.
        self.metadata: dict[str, str] = {}
        #: Parameters the optimizer lists but never updated; their moments read as 0.
        self.never_updated: tuple[str, ...] = ()
        #: Saved tensors that are no parameter (buffers): untrained, moments read as 0.
        self.untrained: tuple[str, ...] = ()
        self.source = MomentsSource("in-memory moments", path)
        self.step = step
        self.beta2 = beta2
        self.bias_corrected = bool(bias_correction)
        if bias_correction:
            if step is None or beta2 is None:
                raise CurvlensError(
                    f"{label}: bias_correction=True needs the optimizer step and beta2, "
                    f"but the file records step={step}, beta2={beta2}"
                )
            if step < 1:
                raise CurvlensError(f"{label}: bias correction needs step >= 1, got {step}")
            self._scale = 1.0 / (1.0 - beta2 ** step)
        else:
            self._scale = 1.0

    # -- construction -------------------------------------------------------------
    @classmethod
    def open(
        cls,
        source: PathLike | Mapping,
        checkpoint: Checkpoint | PathLike | Sequence[str] | None = None,
        bias_correction: bool = False,
    ) -> Moments:
        """Open second moments lazily.

        Parameters
        ----------
        source : path or mapping
            ``exp_avg_sq.safetensors``; an expert dir holding
            ``export/exp_avg_sq.safetensors`` or ``optimizer.pt``; an ``optimizer.pt``
            file; an in-memory optimizer state dict or name -> tensor dict.
        checkpoint : Checkpoint, path or list of str, optional
            Needed only for index-keyed optimizer states: the model whose parameter
            order the optimizer saw, or that order as an explicit list of names
            (checked shape by shape when the model is known too).
        bias_correction : bool
            Divide by ``1 - beta2**step`` (both read from the source).

        Returns
        -------
        Moments

        Raises
        ------
        CurvlensError
            For anything that is not Adam second moments: a missing or corrupt
            file, a state without ``exp_avg_sq`` (SGD, a stateless optimizer),
            malformed states or metadata, non-float moments, a file a dir names
            outside that dir.
        """
        if isinstance(source, Mapping):
            return cls._from_mapping(source, "<in-memory moments>", checkpoint, bias_correction)
        if not isinstance(source, (str, Path)) and not hasattr(source, "__fspath__"):
            raise CurvlensError(f"moments source must be a path or a mapping; got {type(source).__name__}")
        path = Path(source)
        if path.is_dir():
            if contained(path, str(EXPORT_RELPATH), source=path).is_file():
                path = path / EXPORT_RELPATH
            elif contained(path, "optimizer.pt", source=path).is_file():
                if checkpoint is None:
                    checkpoint = path  # HF Trainer layout: model files beside optimizer.pt
                path = path / "optimizer.pt"
            else:
                sharded = find_sharded(path)
                if sharded is None:
                    raise CurvlensError(f"{path}: no second moments found; expected {EXPORT_RELPATH}, "
                                        f"optimizer.pt, {' or '.join(SHARDED_LAYOUTS)}")
                return cls._from_source(sharded, bias_correction)
        elif path.is_file() and path.name == "latest":  # DeepSpeed's pointer to its tag dir
            return cls._from_source(find_sharded(path), bias_correction)
        elif not path.exists():
            raise CurvlensError(f"{path}: no such moments file or dir")
        if path.suffix == ".safetensors":
            return cls._from_safetensors(path, bias_correction)
        if path.suffix in (".pt", ".pth", ".bin"):
            obj = torch_load(path)
            if checkpoint is None and (path.parent / "config.json").is_file():
                checkpoint = path.parent
            return cls._from_mapping(obj, str(path), checkpoint, bias_correction, file=path)
        raise CurvlensError(f"{path}: unknown moments file type; expected .safetensors or .pt")

    @classmethod
    def _from_source(cls, source: ShardedSource, bias_correction: bool) -> Moments:
        """Moments over a sharded layout (DeepSpeed ZeRO, torch.distributed.checkpoint)."""
        m = cls(source.shapes, source.read, label=source.label, step=source.step, beta2=source.beta2,
                bias_correction=bias_correction, path=source.path)
        m.metadata = dict(source.metadata)
        betas = source.metadata.get("betas")
        fmt = source.metadata.get("format", "sharded optimizer state")
        if "zero_stage" in source.metadata:
            fmt += f" ZeRO-{source.metadata['zero_stage']}"
        m.source = MomentsSource(fmt, source.path,
                                 names="the checkpoint's own parameter names (per-rank shards assembled)",
                                 dtypes=("float32",), betas=tuple(json.loads(betas)) if betas else None,
                                 details=dict(source.metadata))
        return m

    @classmethod
    def _from_safetensors(cls, file: Path, bias_correction: bool) -> Moments:
        from safetensors import safe_open

        infos = safetensors_infos(file)
        if not infos:
            raise CurvlensError(f"{file}: holds no tensors; expected one second moment per parameter")
        keymap = _keymap(infos, str(file))
        for k, info in infos.items():
            _check_float(info.dtype, k, str(file))
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
        step = _step(meta.get("step"), str(file)) if "step" in meta else None
        beta2 = _beta2_from_meta(meta, str(file))

        def read(name: str) -> torch.Tensor:
            return read_safetensor(file, keymap[name])

        shapes = {n: infos[k].shape for n, k in keymap.items()}
        m = cls(shapes, read, label=str(file), step=step, beta2=beta2,
                bias_correction=bias_correction, path=file)
        m.metadata = dict(meta)
        m.source = MomentsSource("exported exp_avg_sq (safetensors)", file,
                                 dtypes=dtype_names(i.dtype for i in infos.values()), betas=meta_betas(meta, beta2))
        m._partial = lambda name, starts, length: read_chunks(file, keymap[name], starts, length)
        return m

    @classmethod
    def _from_mapping(cls, obj: Any, label: str, checkpoint, bias_correction: bool,
                      file: Path | None = None) -> Moments:
        if not isinstance(obj, Mapping):
            raise CurvlensError(f"{label}: expected an optimizer state dict ({{'state': ..., 'param_groups': "
                                f"...}}) or a name -> tensor dict of moments; got a {type(obj).__name__}")
        if "state" not in obj:
            # A plain name -> tensor dict of moments.
            bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
            if bad or not obj:
                raise CurvlensError(f"{label}: expected an optimizer state dict or a name -> tensor dict of "
                                    + (f"moments; entries that are not str -> tensor: {bad[:5]}" if bad
                                       else "moments; got an empty mapping"))
            keymap = _keymap(obj, label)
            tensors = {n: obj[k] for n, k in keymap.items()}
            for n, v in tensors.items():
                _check_float(v.dtype, n, label)
            m = cls({k: v.shape for k, v in tensors.items()}, tensors.__getitem__, label=label,
                    bias_correction=bias_correction, path=file)
            m.source = MomentsSource("name -> tensor dict of moments", file,
                                     dtypes=dtype_names(v.dtype for v in tensors.values()))
            return m
        state = obj["state"]
        groups = obj.get("param_groups", [])
        if not isinstance(state, Mapping):
            raise CurvlensError(f"{label}: 'state' must map parameters to their state dicts; "
                                f"got a {type(state).__name__}")
        if not isinstance(groups, list) or not all(isinstance(g, Mapping) for g in groups):
            raise CurvlensError(f"{label}: 'param_groups' must be a list of dicts; got {type(groups).__name__}")
        for key, s in state.items():
            if not isinstance(s, Mapping):
                raise CurvlensError(f"{label}: the state of parameter {key!r} must be a dict such as "
                                    f"{{'exp_avg_sq': tensor, 'step': ...}}; got a {type(s).__name__}")
            if "exp_avg_sq" in s and not isinstance(s["exp_avg_sq"], torch.Tensor):
                raise CurvlensError(f"{label}: 'exp_avg_sq' of parameter {key!r} must be a tensor; "
                                    f"got a {type(s['exp_avg_sq']).__name__}")
        _require_exp_avg_sq(state, label)
        beta2 = _beta2_from_groups(groups, label)
        keys = list(state)
        never: dict = {}
        found = None
        if keys and all(isinstance(k, str) for k in keys):
            named = dict(state)
        elif all(isinstance(k, int) and not isinstance(k, bool) for k in keys):
            found = name_index_state(state, groups, checkpoint, label,
                                     beside=file.parent if file is not None else None)
            named, never = found.named, found.never
        else:
            raise CurvlensError(f"{label}: optimizer state keys must be all parameter indices (int) or all "
                                f"names (str); got {sorted({type(k).__name__ for k in keys})}")
        missing = [n for n, s in named.items() if "exp_avg_sq" not in s]
        if missing:
            raise CurvlensError(f"{label}: optimizer state has no 'exp_avg_sq' for {missing[:5]} "
                                f"({len(missing)} parameters); is this an Adam/AdamW state?")
        steps = {n: _step(s["step"], label, n) for n, s in named.items() if "step" in s}
        # the run's step; a parameter no gradient reached at some steps has fewer,
        # and is bias-corrected by its own count, as Adam does
        step = max(steps.values()) if steps else None
        uneven = bias_correction and beta2 is not None and len(set(steps.values())) > 1
        tensors = {n: s["exp_avg_sq"] for n, s in named.items()}
        for n, v in tensors.items():
            _check_float(v.dtype, n, label)
        if never:
            warnings.warn(f"{label}: {len(never)} parameter(s) the optimizer lists were never updated (no state), "
                          f"e.g. {list(never)[:3]}; their second moments are taken as 0, as Adam's would be "
                          "(Moments.never_updated lists them)", stacklevel=3)

        def read(n: str) -> torch.Tensor:
            v = tensors[n].clone() if n in tensors else torch.zeros(never[n])
            return v.float() / (1.0 - beta2 ** steps[n]) if uneven and steps.get(n) else v

        shapes = {**{k: v.shape for k, v in tensors.items()}, **{k: torch.Size(v) for k, v in never.items()}}
        untrained, never_names = (), tuple(never)
        if found is not None and found.layout is not None:  # names in memory -> the saved ones
            shapes, read, untrained, never_names = found.layout.saved_moments(read, shapes, never, found.saved, label)
            warn_untrained(label, untrained)
        m = cls(shapes, read, label=label, step=step, beta2=beta2, bias_correction=bias_correction and not uneven,
                path=file)
        m.never_updated, m.untrained, m.bias_corrected = never_names, untrained, bool(bias_correction)
        m.source = MomentsSource("torch.optim state dict" + (f" ({file.name})" if file is not None else ""), file,
                                 found.order if found is not None else "state keyed by parameter name",
                                 dtype_names(v.dtype for v in tensors.values()), group_betas(groups))
        return m

    def _finish(self, t: torch.Tensor) -> torch.Tensor:
        v = t.float()  # fp32, bias-corrected when asked: every read and chunk alike
        return v * self._scale if self._scale != 1.0 else v

    def __repr__(self) -> str:
        return (f"Moments({self.label!r}, tensors={len(self)}, step={self.step}, "
                f"bias_corrected={self.bias_corrected})")

    def shape(self, name: str) -> torch.Size:
        """Shape of the moment for ``name`` (no data read)."""
        try:
            return self._shapes[name]
        except KeyError:
            raise CurvlensError(f"{self.label}: no moment for tensor {name!r}") from None

    def shape_problems(self, checkpoint: Checkpoint, *, floating_only: bool = True,
                       skip: Callable[[str], bool] | None = None) -> list[str]:
        """Every key/shape disagreement with ``checkpoint``, without reading data;
        names ``skip`` returns True for are left out."""
        problems = []
        for name in checkpoint.keys():
            if (floating_only and not checkpoint.dtype(name).is_floating_point) or (skip and skip(name)):
                continue
            if name not in self._shapes:
                problems.append(f"{name}: no moment")
            elif self._shapes[name] != checkpoint.shape(name):
                problems.append(f"{name}: moment shape {tuple(self._shapes[name])} "
                                f"!= weight shape {tuple(checkpoint.shape(name))}")
        extra = [n for n in self._shapes if n not in checkpoint and not (skip and skip(n))]
        problems += [f"{n}: moment for a tensor the checkpoint lacks" for n in extra]
        return problems

    def validate(self, checkpoint: Checkpoint | PathLike) -> None:
        """Check every weight has a finite, non-negative moment of the same shape.

        Reads every moment once (streaming). All problems are reported together.

        Raises
        ------
        CurvlensError
            Naming each offending tensor.
        """
        checkpoint = Checkpoint.open(checkpoint)
        problems = self.shape_problems(checkpoint)
        for name in self._shapes:
            if name not in checkpoint or self._shapes[name] != checkpoint.shape(name):
                continue
            problems += value_problems(name, self[name])
        if problems:
            raise CurvlensError(f"{self.label} does not match {checkpoint.label}:\n  "
                                + "\n  ".join(problems))


def value_problems(name: str, v: torch.Tensor) -> list[str]:
    """Problems with one moment tensor's values: NaN/Inf or negative entries."""
    out = []
    n_bad = int((~torch.isfinite(v)).sum())
    if n_bad:
        out.append(f"{name}: {n_bad} non-finite (NaN/Inf) second-moment values")
    n_neg = int((v < 0).sum())
    if n_neg:
        out.append(f"{name}: {n_neg} negative second-moment values (min {float(v.min()):.3g})")
    return out


def _strip(key: str) -> str:
    return key[: -len(_SUFFIX)] if key.endswith(_SUFFIX) else key


def _keymap(keys, label: str) -> dict[str, str]:
    """Parameter name -> stored key, refusing ``X`` beside ``X.exp_avg_sq``."""
    out: dict[str, str] = {}
    for k in keys:
        n = _strip(k)
        if n in out:
            raise CurvlensError(f"{label}: holds both {out[n]!r} and {k!r}, two second moments for "
                                f"parameter {n!r}; expected one")
        out[n] = k
    return out


def _check_float(dtype: torch.dtype, name: str, label: str) -> None:
    if not dtype.is_floating_point:
        raise CurvlensError(f"{label}: the second moment of {name!r} has dtype "
                            f"{str(dtype).replace('torch.', '')}; expected a floating-point tensor")


def _require_exp_avg_sq(state: Mapping, label: str) -> None:
    """An optimizer state must hold Adam's second moments at all; say what it is instead."""
    if any("exp_avg_sq" in s for s in state.values()):
        return
    if not state:
        raise CurvlensError(f"{label}: optimizer state is empty, so it has no exp_avg_sq (a stateless "
                            "optimizer, or saved before the first step); curvlens needs Adam/AdamW second moments")
    seen = sorted({str(k) for s in state.values() for k in s})
    raise CurvlensError(f"{label}: optimizer state has no exp_avg_sq (its entries hold {seen}: "
                        "an SGD or other non-Adam state); curvlens needs Adam/AdamW second moments")


def _step(x: Any, label: str, name: str | None = None) -> int:
    """An optimizer step count: a non-negative whole number (int, float or 0-d tensor)."""
    where = f"{label}: 'step'" + (f" of parameter {name!r}" if name is not None else "")
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise CurvlensError(f"{where} must be a number; got a tensor of shape {tuple(x.shape)}")
        x = x.item()
    if isinstance(x, str):
        try:
            x = float(x.strip())
        except ValueError:
            raise CurvlensError(f"{where} must be a whole number; got {x!r}") from None
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x != int(x) or x < 0:
        raise CurvlensError(f"{where} must be a whole number >= 0; got {x!r}")
    return int(x)


def _check_beta2(b: Any, where: str) -> float:
    try:
        b = float(b)
    except (TypeError, ValueError):
        raise CurvlensError(f"{where}: beta2 must be a number in [0, 1); got {b!r}") from None
    if not 0.0 <= b < 1.0:
        raise CurvlensError(f"{where}: beta2 must be in [0, 1) (Adam's second-moment decay); got {b!r}")
    return b


def _beta2_from_meta(meta: dict[str, str], label: str) -> float | None:
    if "beta2" in meta:
        return _check_beta2(meta["beta2"], label)
    if "betas" in meta:
        try:
            betas = json.loads(meta["betas"])
        except ValueError:
            raise CurvlensError(f"{label}: metadata 'betas' must be a JSON list [beta1, beta2]; "
                                f"got {meta['betas']!r}") from None
        if not isinstance(betas, list) or len(betas) != 2:
            raise CurvlensError(f"{label}: metadata 'betas' must be a list [beta1, beta2]; got {betas!r}")
        return _check_beta2(betas[1], label)
    return None


def _beta2_from_groups(groups: list, label: str) -> float | None:
    betas = set()
    for g in groups:
        if "betas" in g:
            b = g["betas"]
            if not isinstance(b, (list, tuple)) or len(b) != 2:
                raise CurvlensError(f"{label}: param_groups 'betas' must be (beta1, beta2); got {b!r}")
            betas.add(_check_beta2(b[1], label))
    return betas.pop() if len(betas) == 1 else None
