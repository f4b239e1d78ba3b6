"""mergekit's ``slices`` with ``merge_method: passthrough``: stack layer ranges of
models into a deeper (or shallower) model.

::

    slices:
      - sources: [{model: ./a, layer_range: [0, 24]}]
      - sources: [{model: ./b, layer_range: [20, 40]}]
    merge_method: passthrough

Each output tensor is one input tensor, its layer index renamed: output layer
``k`` is the ``k``-th layer of the concatenated ranges. As in mergekit, the
embeddings come from the first slice's model, the other tensors outside the
layers (final norm, LM head) from the last slice's model, and ``config.json``
(copied from the first slice's model) gets the new ``num_hidden_layers``. The
per-source ``scale`` parameter multiplies a tensor (in the dtype it is read in),
in any of mergekit's forms (:mod:`curvlens.streams.param_settings`; ``t`` runs
over the layers of each slice). Slices with several sources (a merge per layer
range) are refused: curvlens merges whole models with ``models``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curvlens.errors import CurvlensError
from curvlens.math.methods import get_method
from curvlens.math.methods.params import check_value_forms
from curvlens.roles import param_role
from curvlens.streams.param_settings import UNSET, check_setting, evaluate, number_converter

_SLICE_KEYS = {"sources", "parameters"}
_SOURCE_KEYS = {"model", "layer_range", "parameters"}
_REFUSED_SLICE = {"base_model": "a per-slice base model", "residual_weight": "a per-slice residual weight"}
_LAYER = re.compile(r"((?:^|\.)(?:layers|layer|h|blocks|block)\.)(\d+)(\.|$)")


@dataclass(frozen=True)
class Slice:
    model: Path
    start: int
    end: int
    params: dict
    slice_params: dict


@dataclass(frozen=True)
class StackPlan:
    """A parsed passthrough ``slices`` config; :meth:`run` writes the model."""

    slices: tuple[Slice, ...]
    top: dict
    dtype: str | None
    input_dtype: str | None
    text: str

    @property
    def n_layers(self) -> int:
        return sum(s.end - s.start for s in self.slices)

    def tensors(self):
        """``(output name, model dir, input name, scale)`` of every output tensor, in order."""
        from curvlens.io.checkpoint import Checkpoint

        first, last = self.slices[0], self.slices[-1]
        out = []
        ckpts = {s.model: Checkpoint.open(s.model) for s in self.slices}
        for name in ckpts[first.model].keys():
            layer, role = param_role(name)
            if layer is None and role == "embed":
                out.append((name, first, name, 0.0))
        k = 0
        for s in self.slices:
            names = list(ckpts[s.model].keys())
            have = {param_role(n)[0] for n in names}
            missing = [i for i in range(s.start, s.end) if i not in have]
            if missing:
                raise CurvlensError(f"slices: {s.model} has no layer(s) {missing[:5]} (layer_range "
                                    f"[{s.start}, {s.end}])")
            length = s.end - s.start
            for offset in range(length):
                t = offset / (length - 1) if length > 1 else 1.0
                for name in names:
                    if param_role(name)[0] == s.start + offset:
                        out.append((_renamed(name, k), s, name, t))
                k += 1
        for name in ckpts[last.model].keys():
            layer, role = param_role(name)
            if layer is None and role != "embed":
                out.append((name, last, name, 0.0))
        return out, ckpts

    def scale(self, s: Slice, name: str, t: float):
        conv = number_converter(_real, "scale")
        for scope in (s.params, s.slice_params, self.top):
            v = evaluate(scope.get("scale"), name, t, conv)
            if v is not UNSET:
                return _real(f"scale of {name!r}", v)
        return None

    def run(self, out, *, overwrite: bool = False, max_shard_size="1GB", progress: bool = True) -> Path:
        """Write the stacked model to ``out``; returns its path."""
        from curvlens.io.writer import ModelWriter
        from curvlens.math.checks import weight_problems
        from curvlens.math.merge_report import cast_checked
        from curvlens.streams.merge import parse_dtype

        out_dtype, in_dtype = parse_dtype(self.dtype), parse_dtype(self.input_dtype)
        items, ckpts = self.tensors()

        def target(ckpt, name):
            dt = ckpt.dtype(name)
            return out_dtype if out_dtype is not None and dt.is_floating_point else dt

        plan = [(o, ckpts[s.model].shape(i), target(ckpts[s.model], i)) for o, s, i, _ in items]
        overrides = {"num_hidden_layers": self.n_layers}
        if out_dtype is not None:
            name = str(out_dtype).replace("torch.", "")
            overrides.update(torch_dtype=name, dtype=name)
        inputs = sorted({s.model for s in self.slices})
        with ModelWriter(out, self.slices[0].model, max_shard_size=max_shard_size, overwrite=overwrite,
                         extra_files={"curvlens_merge.yml": self.text}, plan=plan,
                         config_overrides=overrides, inputs=inputs) as w:
            for o, s, i, t in items:
                x = ckpts[s.model][i]
                problem = weight_problems(x)
                if problem is not None:
                    raise CurvlensError(f"{s.model}, tensor {i!r}: {problem}")
                if x.is_floating_point():
                    if in_dtype is not None:
                        x = x.to(in_dtype)
                    scale = self.scale(s, i, t)
                    if scale is not None:
                        x = x * scale
                    x = cast_checked(x, target(ckpts[s.model], i), o)
                w.add(o, x, made_by=f"{s.model}'s tensor {i!r} times scale {scale!r}" if x.is_floating_point() else None)
        return Path(out)


def _real(label: str, value: Any) -> Any:
    if isinstance(value, bool):
        raise CurvlensError(f"{label} must be a number; got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise CurvlensError(f"{label} must be a number; got {value!r}") from None


def _renamed(name: str, k: int) -> str:
    return _LAYER.sub(lambda m: f"{m.group(1)}{k}{m.group(3)}", name, count=1)


def _params(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CurvlensError(f"{where} must be a mapping of parameter name -> value; got {value!r}")
    extra = sorted(map(str, set(value) - {"scale"}))
    if extra:
        raise CurvlensError(f"{where}: unknown parameter(s) {extra} for merge method 'passthrough'; "
                            "expected 'scale'")
    out = {k: check_setting(where, k, v) for k, v in value.items()}
    for k, v in out.items():  # every value in every form, before any tensor is read
        check_value_forms(get_method("passthrough").param(k), f"{where}.{k}", v)
    return out


def load_stack(cfg: dict, where: str, text: str, local):
    """The :class:`~curvlens.streams.merge_config.MergeConfig` of a ``slices``
    config (its ``stack`` the :class:`StackPlan`)."""
    from curvlens.streams.merge_config import MergeConfig, _dtypes

    if str(cfg["merge_method"]) != "passthrough":
        raise CurvlensError(f"{where}: 'slices' with merge_method {cfg['merge_method']!r} (a merge per layer "
                            "range) is not supported; curvlens stacks slices with 'passthrough' and merges "
                            "whole models with 'models'")
    for key in ("base_model", "tokenizer_source", "tokenizer", "chat_template", "tensors"):
        if cfg.get(key) is not None:
            raise CurvlensError(f"{where}: {key!r} is not supported with 'slices' (passthrough copies "
                                "the first slice's model's files)")
    slices = cfg["slices"]
    if not isinstance(slices, list) or not slices:
        raise CurvlensError(f"{where}: 'slices' must be a non-empty list of {{sources: [...]}}")
    out = []
    for i, sl in enumerate(slices):
        w = f"{where}: slices[{i}]"
        if not isinstance(sl, dict):
            raise CurvlensError(f"{w} must be a mapping with 'sources'")
        for key, what in _REFUSED_SLICE.items():
            if key in sl:
                raise CurvlensError(f"{w}: {key!r} ({what}) only matters for a merge within a slice, which "
                                    "curvlens does not support")
        extra = sorted(map(str, set(sl) - _SLICE_KEYS))
        if extra:
            raise CurvlensError(f"{w}: unknown key(s) {extra}; expected {sorted(_SLICE_KEYS)}")
        sources = sl.get("sources")
        if not isinstance(sources, list) or len(sources) != 1:
            raise CurvlensError(f"{w}: passthrough takes exactly one source per slice; got {sources!r}")
        src = sources[0]
        if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
            raise CurvlensError(f"{w}.sources[0] must be {{model: PATH, layer_range: [START, END]}}")
        extra = sorted(map(str, set(src) - _SOURCE_KEYS))
        if extra:
            raise CurvlensError(f"{w}.sources[0]: unknown key(s) {extra}; expected {sorted(_SOURCE_KEYS)}")
        lr = src["layer_range"]
        if (not isinstance(lr, list) or len(lr) != 2 or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                for x in lr) or not 0 <= lr[0] < lr[1]):
            raise CurvlensError(f"{w}.sources[0].layer_range must be [START, END] with 0 <= START < END; got {lr!r}")
        out.append(Slice(local(src["model"], f"slices[{i}].sources[0].model"), lr[0], lr[1],
                         _params(src.get("parameters"), f"{w}.sources[0].parameters"),
                         _params(sl.get("parameters"), f"{w}.parameters")))
    top = _params(cfg.get("parameters"), f"{where}: 'parameters'")
    out_dtype, input_dtype = _dtypes(cfg, where)
    plan = StackPlan(tuple(out), top, out_dtype, input_dtype, text)
    names = tuple(dict.fromkeys(s.model.name for s in out))
    return MergeConfig("passthrough", None, tuple(dict.fromkeys(s.model for s in out)), names, None, {},
                       out_dtype, False, text, input_dtype=input_dtype, stack=plan)


def slices_as_models(cfg: dict, where: str, local, n_layers) -> dict:
    """A ``slices`` config of a merge method as the equivalent ``models`` config,
    where it has one: a single slice whose every source spans its model's whole
    layer range (mergekit's planner then does exactly what it does for
    ``models``, whose t runs over the same layers; only an unlisted base is not
    added). Anything else is refused by name."""
    method = cfg["merge_method"]
    slices = cfg["slices"]
    why = (f"{where}: 'slices' with merge_method {method!r} (a merge per layer range) is not supported; curvlens "
           "stacks slices with 'passthrough' and merges whole models (one slice spanning every model's layers, "
           "or 'models')")
    if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict):
        raise CurvlensError(why)
    sl = slices[0]
    for key, what in _REFUSED_SLICE.items():
        if key in sl:
            raise CurvlensError(f"{where}: slices[0]: {key!r} ({what}) is not supported")
    extra = sorted(map(str, set(sl) - _SLICE_KEYS))
    if extra:
        raise CurvlensError(f"{where}: slices[0]: unknown key(s) {extra}; expected {sorted(_SLICE_KEYS)}")
    sources = sl.get("sources")
    if not isinstance(sources, list) or not sources:
        raise CurvlensError(f"{where}: slices[0].sources must be a non-empty list")
    models = []
    for j, src in enumerate(sources):
        if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
            raise CurvlensError(f"{where}: slices[0].sources[{j}] must be {{model: PATH, layer_range: [START, END]}}")
        extra = sorted(map(str, set(src) - _SOURCE_KEYS))
        if extra:
            raise CurvlensError(f"{where}: slices[0].sources[{j}]: unknown key(s) {extra}; "
                                f"expected {sorted(_SOURCE_KEYS)}")
        n = n_layers(local(src["model"], f"slices[0].sources[{j}].model"))
        if src["layer_range"] != [0, n]:
            raise CurvlensError(why + f" (slices[0].sources[{j}].layer_range is {src['layer_range']!r}, "
                                f"the model has [0, {n}])")
        models.append({"model": src["model"], **({"parameters": src["parameters"]}
                                                 if src.get("parameters") is not None else {})})
    top = cfg.get("parameters")
    slice_params = sl.get("parameters")
    if slice_params is not None:
        if not isinstance(slice_params, dict) or not isinstance(top or {}, dict):
            raise CurvlensError(f"{where}: slices[0].parameters must be a mapping of parameter name -> value")
        both = sorted(set(slice_params) & set(top or {}))
        if both:
            raise CurvlensError(f"{where}: parameter(s) {both} given both for the slice and at the top level; "
                                "give each once")
        top = {**(top or {}), **slice_params}
    out = {k: v for k, v in cfg.items() if k != "slices"}
    out["models"] = models
    if top is not None:
        out["parameters"] = top
    return out


__all__ = ["StackPlan", "Slice", "load_stack", "slices_as_models"]
