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
in any of mergekit's forms (:mod:`curvlens.config.param_settings`; ``t`` runs
over the layers of each slice). Slices with several sources (a merge per layer
range) are refused: curvlens merges whole models with ``models``.

A stack is written by the merge driver like any merge: every output tensor is a
:class:`~curvlens.passes.merge.Take` of one input tensor, renamed and scaled
(:meth:`StackPlan.job`), and the output gets a ``merge_report.csv`` saying which
model each tensor came from.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curvlens.config.keys import check_keys, config_dtypes, parameter_mapping
from curvlens.config.param_settings import UNSET, check_setting, number_converter, setting_value
from curvlens.errors import CurvlensError
from curvlens.io.checkpoint import Checkpoint
from curvlens.io.dtypes import parse_dtype
from curvlens.passes.merge import MergeJob, OutputFiles, Take, run_merge
from curvlens.math.methods import get_method
from curvlens.math.methods.params import check_value_forms
from curvlens.roles import param_role

_SLICE_KEYS = {"sources", "parameters"}
_SOURCE_KEYS = {"model", "layer_range", "parameters"}
_WITHIN = "only matters for a merge within a slice, which curvlens does not support"
_REFUSED_SLICE = {"base_model": f"a per-slice base model {_WITHIN}",
                  "residual_weight": f"a per-slice residual weight {_WITHIN}"}
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
        """``(output name, slice, input name, t)`` of every output tensor, in order, and
        the slices' models by dir."""
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
            v = setting_value(scope.get("scale"), name, t, conv)
            if v is not UNSET:
                return _real(f"scale of {name!r}", v)
        return None

    def job(self) -> MergeJob:
        """The driver's job: every output tensor taken from its slice's model."""
        out_dtype, read_dtype = parse_dtype(self.dtype), parse_dtype(self.input_dtype)
        items, ckpts = self.tensors()
        takes = [Take(o, ckpts[sl.model], i, sl.model.name, str(sl.model), scale=self.scale(sl, i, t),
                      read_dtype=read_dtype) for o, sl, i, t in items]
        return MergeJob("passthrough", takes=takes, out_dtype=out_dtype)

    def run(self, out, *, overwrite: bool = False, max_shard_size="1GB", progress: bool = True) -> Path:
        """Write the stacked model to ``out`` (config and tokenizer from the first
        slice's model, with the new ``num_hidden_layers``); returns its path."""
        files = OutputFiles(self.slices[0].model, self.text, max_shard_size,
                            config_overrides={"num_hidden_layers": self.n_layers},
                            inputs=sorted({s.model for s in self.slices}))
        return run_merge(self.job(), out, files, device="cpu", progress=progress, overwrite=overwrite).path


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
    value = parameter_mapping(value, where)
    extra = sorted(map(str, set(value) - {"scale"}))
    if extra:
        raise CurvlensError(f"{where}: unknown parameter(s) {extra} for merge method 'passthrough'; "
                            "expected 'scale'")
    out = {k: check_setting(where, k, v) for k, v in value.items()}
    for k, v in out.items():  # every value in every form, before any tensor is read
        check_value_forms(get_method("passthrough").param(k), f"{where}.{k}", v)
    return out


def load_stack(cfg: dict, where: str, text: str, local) -> StackPlan:
    """The :class:`StackPlan` of a passthrough ``slices`` config (models given by
    path through ``local``)."""
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
        check_keys(sl, _SLICE_KEYS, w, refused=_REFUSED_SLICE)
        sources = sl.get("sources")
        if not isinstance(sources, list) or len(sources) != 1:
            raise CurvlensError(f"{w}: passthrough takes exactly one source per slice; got {sources!r}")
        src = sources[0]
        if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
            raise CurvlensError(f"{w}.sources[0] must be {{model: PATH, layer_range: [START, END]}}")
        check_keys(src, _SOURCE_KEYS, f"{w}.sources[0]")
        lr = src["layer_range"]
        if (not isinstance(lr, list) or len(lr) != 2 or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                for x in lr) or not 0 <= lr[0] < lr[1]):
            raise CurvlensError(f"{w}.sources[0].layer_range must be [START, END] with 0 <= START < END; got {lr!r}")
        out.append(Slice(local(src["model"], f"slices[{i}].sources[0].model"), lr[0], lr[1],
                         _params(src.get("parameters"), f"{w}.sources[0].parameters"),
                         _params(sl.get("parameters"), f"{w}.parameters")))
    top = _params(cfg.get("parameters"), f"{where}: 'parameters'")
    out_dtype, input_dtype = config_dtypes(cfg, where)
    return StackPlan(tuple(out), top, out_dtype, input_dtype, text)


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
    check_keys(sl, _SLICE_KEYS, f"{where}: slices[0]", refused=_REFUSED_SLICE)
    sources = sl.get("sources")
    if not isinstance(sources, list) or not sources:
        raise CurvlensError(f"{where}: slices[0].sources must be a non-empty list")
    models = []
    for j, src in enumerate(sources):
        if not isinstance(src, dict) or "model" not in src or "layer_range" not in src:
            raise CurvlensError(f"{where}: slices[0].sources[{j}] must be {{model: PATH, layer_range: [START, END]}}")
        check_keys(src, _SOURCE_KEYS, f"{where}: slices[0].sources[{j}]")
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
