"""``Moments``: a lazy mapping from parameter name to its Adam second moment.

Sources, in the layouts users actually have:

* an exported ``exp_avg_sq.safetensors`` keyed by parameter name (the OTA paper's
  release layout ``<expert>/export/exp_avg_sq.safetensors``), also with keys
  ``<name>.exp_avg_sq``;
* a ``torch.optim`` state dict (``optimizer.pt``), whose state is keyed by parameter
  *index*: indices are mapped to names through the order in which the optimizer saw
  the parameters, and every shape is checked;
* a state dict whose state is keyed by name (``{"state": {name: {"exp_avg_sq": ...}}}``);
* an HF Trainer checkpoint dir (``optimizer.pt`` beside the model files).

Adam's ``exp_avg_sq`` is biased towards zero early in training; the paper uses it
raw. ``bias_correction=True`` divides by ``1 - beta2**step`` when both are known.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from curvlens.errors import CurvlensError
from curvlens.io.checkpoint import Checkpoint, PathLike, _safetensors_infos, _torch_load, read_safetensor

EXPORT_RELPATH = Path("export") / "exp_avg_sq.safetensors"
_SUFFIX = ".exp_avg_sq"


class Moments(Mapping):
    """Lazy, read-only mapping ``name -> exp_avg_sq`` (fp32), optionally bias-corrected.

    Use :meth:`open`.

    Attributes
    ----------
    step : int or None
        Optimizer step count, when the source records it.
    beta2 : float or None
        Adam's beta2, when the source records it.
    bias_corrected : bool
        Whether reads are divided by ``1 - beta2**step``.
    """

    def __init__(self, shapes: dict[str, torch.Size], reader, *, label: str,
                 step: int | None = None, beta2: float | None = None,
                 bias_correction: bool = False):
        self._shapes = shapes
        self._reader = reader
        self.label = label
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
            order the optimizer saw, or that order as an explicit list of names.
        bias_correction : bool
            Divide by ``1 - beta2**step`` (both read from the source).

        Returns
        -------
        Moments
        """
        if isinstance(source, Mapping):
            return cls._from_mapping(source, "<in-memory moments>", checkpoint, bias_correction)
        path = Path(source)
        if path.is_dir():
            if (path / EXPORT_RELPATH).is_file():
                path = path / EXPORT_RELPATH
            elif (path / "optimizer.pt").is_file():
                if checkpoint is None:
                    checkpoint = path  # HF Trainer layout: model files beside optimizer.pt
                path = path / "optimizer.pt"
            else:
                raise CurvlensError(
                    f"{path}: no second moments found; expected {EXPORT_RELPATH} or optimizer.pt"
                )
        if path.suffix == ".safetensors":
            return cls._from_safetensors(path, bias_correction)
        if path.suffix in (".pt", ".pth", ".bin"):
            obj = _torch_load(path)
            if checkpoint is None and (path.parent / "config.json").is_file():
                checkpoint = path.parent
            return cls._from_mapping(obj, str(path), checkpoint, bias_correction, file=path)
        raise CurvlensError(f"{path}: unknown moments file type; expected .safetensors or .pt")

    @classmethod
    def _from_safetensors(cls, file: Path, bias_correction: bool) -> Moments:
        from safetensors import safe_open

        infos = _safetensors_infos(file)
        keymap = {_strip(k): k for k in infos}
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
        step = int(meta["step"]) if "step" in meta else None
        beta2 = _beta2_from_meta(meta)

        def read(name: str) -> torch.Tensor:
            return read_safetensor(file, keymap[name])

        shapes = {n: infos[k].shape for n, k in keymap.items()}
        return cls(shapes, read, label=str(file), step=step, beta2=beta2,
                   bias_correction=bias_correction)

    @classmethod
    def _from_mapping(cls, obj: Mapping, label: str, checkpoint, bias_correction: bool,
                      file: Path | None = None) -> Moments:
        if "state" not in obj:
            # A plain name -> tensor dict of moments.
            tensors = {_strip(k): v for k, v in obj.items()}
            if not all(isinstance(v, torch.Tensor) for v in tensors.values()):
                raise CurvlensError(f"{label}: expected an optimizer state dict or name -> tensor moments")
            return cls({k: v.shape for k, v in tensors.items()}, tensors.__getitem__, label=label,
                       bias_correction=bias_correction)
        state = obj["state"]
        groups = obj.get("param_groups", [])
        betas = {tuple(g["betas"]) for g in groups if "betas" in g}
        beta2 = float(next(iter(betas))[1]) if len(betas) == 1 else None
        keys = list(state)
        if keys and all(isinstance(k, str) for k in keys):
            named = dict(state)
        else:
            named = _name_index_state(state, groups, checkpoint, label)
        missing = [n for n, s in named.items() if "exp_avg_sq" not in s]
        if missing:
            raise CurvlensError(f"{label}: optimizer state has no 'exp_avg_sq' for {missing[:5]} "
                                f"({len(missing)} parameters); is this an Adam/AdamW state?")
        steps = {int(_as_float(s["step"])) for s in named.values() if "step" in s}
        step = steps.pop() if len(steps) == 1 else None
        tensors = {n: s["exp_avg_sq"] for n, s in named.items()}
        return cls({k: v.shape for k, v in tensors.items()}, lambda n: tensors[n].clone(),
                   label=label, step=step, beta2=beta2, bias_correction=bias_correction)

    # -- mapping interface ---------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._shapes:
            raise KeyError(name)
        v = self._reader(name).float()
        return v * self._scale if self._scale != 1.0 else v

    def __iter__(self) -> Iterator[str]:
        return iter(self._shapes)

    def __len__(self) -> int:
        return len(self._shapes)

    def __contains__(self, name: object) -> bool:
        return name in self._shapes

    def __repr__(self) -> str:
        return (f"Moments({self.label!r}, tensors={len(self)}, step={self.step}, "
                f"bias_corrected={self.bias_corrected})")

    def shape(self, name: str) -> torch.Size:
        """Shape of the moment for ``name`` (no data read)."""
        try:
            return self._shapes[name]
        except KeyError:
            raise CurvlensError(f"{self.label}: no moment for tensor {name!r}") from None

    def shape_problems(self, checkpoint: Checkpoint, *, floating_only: bool = True) -> list[str]:
        """Every key/shape disagreement with ``checkpoint``, without reading data."""
        problems = []
        for name in checkpoint.keys():
            if floating_only and not checkpoint.dtype(name).is_floating_point:
                continue
            if name not in self._shapes:
                problems.append(f"{name}: no moment")
            elif self._shapes[name] != checkpoint.shape(name):
                problems.append(f"{name}: moment shape {tuple(self._shapes[name])} "
                                f"!= weight shape {tuple(checkpoint.shape(name))}")
        extra = [n for n in self._shapes if n not in checkpoint]
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


def _as_float(x: Any) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _beta2_from_meta(meta: dict[str, str]) -> float | None:
    if "beta2" in meta:
        return float(meta["beta2"])
    if "betas" in meta:
        try:
            return float(json.loads(meta["betas"])[1])
        except (ValueError, IndexError, TypeError):
            return None
    return None


# -- index -> name mapping for torch.optim state dicts ------------------------------

def _name_index_state(state: Mapping, groups: list[dict], checkpoint, label: str) -> dict[str, dict]:
    """Map an index-keyed optimizer state to parameter names.

    ``torch.optim`` numbers parameters group by group in the order they were passed.
    With one group that is the model's parameter order; the HF Trainer passes two
    groups (with and without weight decay), each in model order. Both orders are
    tried against the group sizes and every shape; an ambiguous or failing match
    is an error, never a guess.
    """
    indices = [i for g in groups for i in g.get("params", [])] or sorted(state)
    sizes = [len(g.get("params", [])) for g in groups] or [len(indices)]
    if checkpoint is None:
        raise CurvlensError(
            f"{label}: optimizer state is keyed by parameter index; pass checkpoint= "
            "(the model, or its parameter names in the optimizer's order) to map indices to names"
        )
    shapes, orders = _candidate_orders(checkpoint, sizes, label)
    errors: list[str] = []
    matches: list[list[str]] = []
    for order_name, names in orders:
        problem = _order_problem(names, indices, state, shapes)
        if problem is None:
            matches.append(names)
        else:
            errors.append(f"{order_name}: {problem}")
    distinct = {tuple(m) for m in matches}
    if not distinct:
        raise CurvlensError(f"{label}: cannot map optimizer indices to parameter names:\n  "
                            + "\n  ".join(errors))
    if len(distinct) > 1:
        raise CurvlensError(f"{label}: optimizer indices match more than one parameter order; "
                            "pass checkpoint= as the explicit list of names in optimizer order")
    names = matches[0]
    return {names[k]: state[i] for k, i in enumerate(indices) if i in state}


def _candidate_orders(checkpoint, sizes: list[int], label: str):
    if isinstance(checkpoint, Sequence) and not isinstance(checkpoint, (str, bytes)) and \
            all(isinstance(n, str) for n in checkpoint):
        return None, [("explicit parameter names", list(checkpoint))]
    ckpt = Checkpoint.open(checkpoint)
    shapes = {n: ckpt.shape(n) for n in ckpt.keys()}
    model_order = _model_parameter_order(ckpt) or [n for n in ckpt.keys()
                                                    if ckpt.dtype(n).is_floating_point]
    orders = [("model parameter order", model_order)]
    if len(sizes) == 2:
        decay = [n for n in model_order if not _hf_no_decay(n)]
        no_decay = [n for n in model_order if _hf_no_decay(n)]
        orders.append(("HF Trainer decay/no-decay groups", decay + no_decay))
    return shapes, orders


def _hf_no_decay(name: str) -> bool:
    # The HF Trainer exempts biases and normalisation weights from weight decay.
    return name.endswith("bias") or "norm" in name.lower()


def _order_problem(names, indices, state, shapes) -> str | None:
    if len(names) != len(indices):
        return f"optimizer has {len(indices)} parameters, the model has {len(names)}"
    for k, i in enumerate(indices):
        if i not in state or "exp_avg_sq" not in state[i]:
            continue  # never-updated parameter: checked later as a missing moment
        got = tuple(state[i]["exp_avg_sq"].shape)
        if shapes is not None:
            want = tuple(shapes.get(names[k], ()))
            if got != want:
                return f"parameter {i} -> {names[k]!r}: moment shape {got} != weight shape {want}"
    return None


def _model_parameter_order(ckpt: Checkpoint) -> list[str] | None:
    """Parameter order of an HF model, from its config on the meta device.

    Checkpoint files list tensors alphabetically, not in the order ``model.parameters()``
    yields them, which is what the optimizer numbered. Needs ``transformers``.
    """
    if ckpt.path is None:
        return None
    cfg = (ckpt.path if ckpt.path.is_dir() else ckpt.path.parent) / "config.json"
    if not cfg.is_file():
        return None
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        return None
    try:
        config = AutoConfig.from_pretrained(str(cfg.parent))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # an architecture transformers cannot build: fall back to file order
        return None
    return [n for n, _ in model.named_parameters()]
