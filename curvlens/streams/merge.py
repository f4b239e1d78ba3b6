"""``merge``: run a registered merge method over whole models, tensor by tensor.

For each parameter name: read base, experts and moments (on the device), call the
method's pure per-tensor function, cast to the output dtype, hand the result to the
writer (or keep it, for small in-memory merges) and add one row to the report.
A method that declares a model-wide selection (OTA's ``ffg_density``) first gets
it from two streaming passes (:mod:`curvlens.streams.thresholds`); the driver
reads that declaration, never a method's name.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from curvlens.errors import CurvlensError
from curvlens.io.checkpoint import Checkpoint, PathLike
from curvlens.io.writer import ModelWriter
from curvlens.math.blocks import block_size, blocks, tensor_seed
from curvlens.math.merge_report import ChangeNorms, cast_checked, reference_block
from curvlens.runtime import use_threads
from curvlens.math.methods import MaskCounts, get_method, resolve_params
from curvlens.math.methods.inputs import check_arity
from curvlens.streams.experts import Experts, TensorGroup, resolve_device
from curvlens.streams.scout import count_equal, partial_reads, scout_selections
from curvlens.streams.thresholds import THRESHOLD_COLUMNS, model_selections
from curvlens.math.checks import weight_problems
from curvlens.roles import param_role
from curvlens.streams.merge_tokenizer import tokenizer_files
from curvlens.tensor_filter import TensorFilter, tensor_actions

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"``/``"bf16"``/``torch.bfloat16`` -> ``torch.bfloat16``; None stays None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower().replace("torch.", "")]
    except KeyError:
        raise CurvlensError(f"dtype={dtype!r} is not valid; expected one of {sorted(_DTYPES)}") from None


@dataclass
class MergeResult:
    """A merged model and what happened to each tensor.

    Attributes
    ----------
    checkpoint : Checkpoint
        The merged weights (on disk when ``out`` was given, else in memory).
    report : pandas.DataFrame
        One row per tensor: ``name, layer, role, numel, source, kept_<expert>...,
        all_masked, delta_norm, rel_delta``. ``source`` says what happened to it:
        ``merged``, ``drop`` / ``excluded`` (left out of the merged model by a
        ``tensors`` rule / by the Experts' ``exclude``), or the model it was taken
        from unchanged (``base`` or an expert's name; mask columns NaN there).
        ``rel_delta`` is ``delta_norm`` over the reference's norm (the base, else
        the experts' mean), NaN where the reference is all zero (undefined; the
        views leave such cells empty) or where a taken tensor has no reference.
    method : str
    params : dict
        The resolved parameters (defaults filled in, per-expert lists).
    thresholds : pandas.DataFrame or None
        The model-wide FFG selection per expert, when ``ffg_density`` was used
        (:func:`curvlens.streams.thresholds.model_thresholds`'s columns).
    path : Path or None
    extra : dict
        ``"selections"``: the :class:`~curvlens.streams.thresholds.Selection` per
        expert behind ``thresholds`` (with the per-tensor tie quotas).
    """

    checkpoint: Checkpoint
    report: Any
    method: str
    params: dict
    thresholds: Any = None
    path: Path | None = None
    extra: dict = field(default_factory=dict)

    def summary(self):
        """Model-level numbers: numel-weighted kept fraction per expert and change norm."""
        import pandas as pd

        r = self.report[self.report["source"] == "merged"]
        w = r["numel"] / r["numel"].sum()
        kept = {c: float((r[c] * w).sum()) for c in r.columns if c.startswith("kept_")}
        return pd.Series({"method": self.method, **kept,
                          "all_masked": float((r["all_masked"] * w).sum()),
                          "delta_norm": float((r["delta_norm"] ** 2).sum() ** 0.5)})

    def _repr_html_(self) -> str:
        # Presentation hook: views sit above streams, so they are imported only
        # when a notebook asks for the HTML, never at import time.
        from curvlens.views import layer_role_heatmap
        from curvlens.views.rich import result_html

        table = self.summary().to_frame("value")
        return result_html(
            table, lambda _: layer_role_heatmap(self.report, "rel_delta",
                                                title=f"{self.method}: relative change by layer x role"),
            title=f"MergeResult: {self.method}, {len(self.report)} tensors"
                  + (f", saved to {self.path}" if self.path else ""))


def _stored(experts: Experts, name: str) -> torch.dtype:
    """The experts' dtype of tensor ``name`` (promoted across experts); integer
    tensors, carried from the reference, keep the reference's."""
    ref = experts.reference.dtype(name)
    if not ref.is_floating_point:
        return ref
    out = experts.experts[0].checkpoint.dtype(name)
    for e in experts.experts[1:]:
        out = torch.promote_types(out, e.checkpoint.dtype(name))
    return out


def _out_dtype(stored: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    # integer/bool tensors keep their dtype whatever the requested float dtype
    return stored if requested is None or not stored.is_floating_point else requested


def merge(
    experts: Experts,
    method: str,
    out: PathLike | None = None,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "1GB",
    progress: bool = True,
    config_text: str | None = None,
    threads: int | None = None,
    tensors=None,
    input_dtype: str | torch.dtype | None = None,
    tensor_params=None,
    tokenizer_source=None,
    chat_template: str | None = None,
    pad_to_multiple_of: int | None = None,
    selection: str = "auto",
    **params,
) -> MergeResult:
    """Merge ``experts`` with ``method``, streaming one tensor at a time.

    Parameters
    ----------
    experts : Experts
        Base (if the method uses one), experts and (for fisher/ota) moments.
    method : str
        A registered method: see :func:`curvlens.math.methods.list_methods`.
    out : path, optional
        Write the merged model here as an HF dir (config/tokenizer copied from the
        base or first expert, plus ``merge_report.csv`` and the merge config). Without
        it the merged tensors are kept in memory (fine for small models only).
    device : str
        ``"auto"``: CUDA when present. The math is fp32 on this device.
    dtype : str or torch.dtype, optional
        Output dtype of floating tensors; default: each tensor's dtype in the
        experts (promoted when experts store it differently, e.g. bf16 and fp32
        give fp32), whatever the base's. Integer and bool tensors keep theirs.
        A merged value the output dtype cannot hold (beyond fp16's 65504) is an
        error, never an Inf.
    overwrite : bool
        Replace an existing ``out``.
    threads : int, optional
        Torch intra-op threads on a CPU for every pass of this merge; default
        :func:`curvlens.runtime.get_threads` (1: see :mod:`curvlens.runtime`).
    tensors : mapping or list of (pattern, action), optional
        Per-tensor control, first matching pattern first (patterns of
        :mod:`curvlens.tensor_filter`): ``"drop"`` leaves the tensor out of the
        merged model, ``"base"`` or an expert's name takes it unchanged from that
        model, ``"merge"`` merges it. E.g. ``{"classifier": "drop", "*.pooler.*":
        "base"}`` merges the shared body and keeps no task's head. Tensors the
        Experts ``exclude`` are left out unless a rule takes them from a model.
        Neither the model-wide FFG selection nor the report's mask columns see
        tensors that are not merged.
    input_dtype : str or torch.dtype, optional
        Round every floating input (base and experts, not moments) to this dtype
        before merging, as mergekit reads inputs in its config's ``dtype``.
    tensor_params : callable, optional
        ``tensor_params(name) -> {param: value}``: parameters that vary by tensor
        (mergekit's gradients and filters,
        :class:`curvlens.streams.param_settings.TensorParams`), resolved with
        ``params`` for each tensor.
    tokenizer_source : None, "base", "union" or path, optional
        Which tokenizer to write beside the weights (mergekit's
        ``tokenizer_source``; :mod:`curvlens.streams.merge_tokenizer`).
    chat_template : str, optional
        A template name, ``"auto"`` or a Jinja template, written into the
        output's ``tokenizer_config.json``.
    pad_to_multiple_of : int, optional
        mergekit's ``tokenizer.pad_to_multiple_of``.
    selection : {"auto", "exact", "scout"}
        How a model-wide selection (``ffg_density``) is found, always exactly:
        ``"exact"`` in two reads (:func:`curvlens.streams.thresholds.model_selections`),
        ``"scout"`` in one read bracketed by a small sample
        (:func:`curvlens.streams.scout.scout_selections`), ``"auto"`` the scout
        where the files allow sampling them (safetensors) and the moments are
        not compressed.
    **params
        The method's parameters (per-expert ones as a scalar or a list). A
        method's model-wide parameter (``ota``'s ``ffg_density``) becomes an exact
        selection per expert in two streaming passes first.

    Returns
    -------
    MergeResult
    """
    with use_threads(threads):
        return _merge(experts, method, out, device=device, dtype=dtype, overwrite=overwrite,
                      max_shard_size=max_shard_size, progress=progress, config_text=config_text,
                      tensors=tensors, input_dtype=input_dtype, tensor_params=tensor_params,
                      tokenizer=(tokenizer_source, chat_template, pad_to_multiple_of), selection=selection,
                      **params)


def _merge(experts, method, out, *, device, dtype, overwrite, max_shard_size, progress, config_text,
           tensors, input_dtype, tensor_params, tokenizer, selection="auto", **params) -> MergeResult:
    import pandas as pd

    if not isinstance(experts, Experts):
        raise CurvlensError(f"merge takes an Experts (e.g. Experts.from_dirs(base, [dirs])); "
                            f"got a {type(experts).__name__}")
    if not isinstance(method, str):
        raise CurvlensError(f"method must be a method name (str); got {method!r}")
    m = get_method(method)
    p = resolve_params(m, params, len(experts))
    if m.needs_base and experts.base is None:
        raise CurvlensError(f"merge method {method!r} needs a base model; the Experts have none")
    check_arity(m, experts.base is not None, len(experts))  # e.g. slerp: one expert
    if m.needs_moments and not experts.has_moments:
        lacking = [e.name for e in experts.experts if e.moments is None]
        raise CurvlensError(f"merge method {method!r} needs second moments; expert(s) {lacking} have none")
    out_dtype = parse_dtype(dtype)
    in_dtype = parse_dtype(input_dtype)
    dev = resolve_device(device)
    per_tensor = _TensorParams(m, params, p, tensor_params, len(experts))
    if in_dtype is not None:
        experts = experts.rounded(in_dtype)
    full = experts
    actions, experts = _plan_tensors(full, tensors)

    requested = dict(p)  # what the saved config states (re-runnable), before thresholds
    selections = _model_wide(m, experts, p, dev, progress, selection)
    thresholds = None
    if selections is not None:
        thresholds = pd.DataFrame([s.row() for s in selections], columns=THRESHOLD_COLUMNS)

    ref = experts.reference
    ref_dir = None
    if ref.path is not None:
        ref_dir = ref.path if ref.path.is_dir() else ref.path.parent
    rows: list[dict] = []
    kept_tensors: dict[str, torch.Tensor] = {}
    writer_cm = nullcontext()
    if out is not None:
        import yaml

        config = config_text or yaml.safe_dump(_config(m, full, requested, out_dtype, tensors, in_dtype),
                                               sort_keys=False)
        tok_dir, tok_files = tokenizer_files(full, ref_dir, *tokenizer)
        # every output name, shape and dtype is known now: stream the bytes unbuffered
        plan = [(n, ref.shape(n), _out_dtype(_stored(experts, n), out_dtype)) for n in experts.tensor_names()]
        plan += [(n, _source(full, a).shape(n), _out_dtype(_source(full, a).dtype(n), out_dtype))
                 for n, a in _taken(actions)]
        # transformers reads the weights' dtype from config.json: keep it truthful
        dtype_name = str(out_dtype).replace("torch.", "") if out_dtype is not None else None
        overrides = {"torch_dtype": dtype_name, "dtype": dtype_name} if dtype_name else None
        writer_cm = ModelWriter(out, ref_dir, max_shard_size=max_shard_size, overwrite=overwrite,
                                extra_files={**tok_files, "curvlens_merge.yml": config}, plan=plan,
                                config_overrides=overrides, inputs=experts.input_paths(),
                                tokenizer_dir=tok_dir)
    elif any(t is not None for t in tokenizer):
        raise CurvlensError("tokenizer_source, chat_template and pad_to_multiple_of concern the written "
                            "model's tokenizer: give an output directory")
    with writer_cm as writer:
        # methods cast block by block, so they get the stored dtype
        for g in experts.iter_tensors(device=dev, moments=m.needs_moments, progress=progress,
                                      dtype=None, desc=f"merge {method}"):
            pt = per_tensor(g.name, p)
            # a model-wide selection splits the tied scores tensor by tensor
            if selections is not None:
                pt = {**pt, m.model_wide.ties: [_ties(s, g, i) for i, s in enumerate(selections)]}
            target = _out_dtype(_stored(experts, g.name), out_dtype)
            # as mergekit: a method's result is in the input dtype, then cast to out_dtype
            merged, row = _merge_one(m, g, pt, dev, experts.names, in_dtype or target)
            if merged.is_floating_point() and merged.dtype != target:
                merged = merged.to(target)
            rows.append(row)
            if writer is not None:
                writer.add(g.name, merged)
            else:
                kept_tensors[g.name] = merged
        for n, a in _taken(actions):
            taken, row = _take_one(full, n, a, out_dtype)
            rows.append(row)
            if writer is not None:
                writer.add(n, taken)
            else:
                kept_tensors[n] = taken
        rows += [_left_out_row(full, n, a) for n, a in actions.items() if a in ("drop", "excluded")]
        report = _report_frame(rows, full.names)
        if writer is not None:  # written beside the weights when the writer closes
            writer.extra_files["merge_report.csv"] = report.to_csv(index=False)
    ckpt = Checkpoint.open(out) if out is not None else Checkpoint.open(kept_tensors)
    report["layer"] = report["layer"].astype("Int64")
    extra = {"selections": selections} if selections is not None else {}
    return MergeResult(ckpt, report, method, p, thresholds, Path(out) if out is not None else None, extra)


class _TensorParams:
    """Each tensor's resolved parameters: the constant ones, with those that vary
    by tensor (``tensor_params``) resolved for its name and the method's
    ``name_param`` set to it."""

    def __init__(self, m, params: dict, resolved: dict, tensor_params, n: int):
        self.m, self.params, self.tensor_params, self.n = m, params, tensor_params, n
        self._cache: dict = {}
        if tensor_params is not None and m.model_wide is not None:
            spec = m.model_wide
            fixed = {spec.density, spec.rank1, spec.rank} if any(d is not None for d in resolved[spec.density]) \
                else {spec.density}
            both = sorted(fixed & set(getattr(tensor_params, "keys", ())))
            if both:
                raise CurvlensError(f"parameter(s) {both} set the model-wide selection: one value per expert, "
                                    "not varying by tensor")

    def __call__(self, name: str, p: dict) -> dict:
        out = p
        if self.tensor_params is not None:
            over = self.tensor_params(name)
            key = repr(sorted(over.items()))
            if key not in self._cache:
                try:
                    full = resolve_params(self.m, {**self.params, **over}, self.n)
                except CurvlensError as err:
                    raise CurvlensError(f"tensor {name!r}: {err}") from err
                canon = {a: spec.name for spec in self.m.params for a in (spec.name, *spec.aliases)}
                self._cache[key] = {canon[k]: full[canon[k]] for k in over}
            out = {**p, **self._cache[key]}
        if self.m.name_param is not None:
            out = {**out, self.m.name_param: name}
        return out


def _plan_tensors(experts: Experts, rules) -> tuple[dict[str, str], Experts]:
    """What happens to every reference tensor (:func:`tensor_actions`, with the
    Experts' own exclusions as ``"excluded"``), and the Experts restricted to the
    tensors that are merged."""
    sources = (["base"] if experts.base is not None else []) + experts.names
    actions = tensor_actions(rules, experts.reference.keys(), sources)
    excluded = set(experts.excluded_names())
    for n in excluded:
        if actions[n] == "merge":
            actions[n] = "excluded"
    not_merged = [n for n, a in actions.items() if a != "merge" and n not in excluded]
    if not any(a == "merge" for a in actions.values()):
        raise CurvlensError("tensors: the rules leave no tensor to merge")
    return actions, (experts.without(TensorFilter.exact(not_merged)) if not_merged else experts)


def _taken(actions: dict[str, str]) -> list[tuple[str, str]]:
    return [(n, a) for n, a in actions.items() if a not in ("merge", "drop", "excluded")]


def _source(experts: Experts, action: str) -> Checkpoint:
    return experts.base if action == "base" else experts[action].checkpoint


def _take_one(experts: Experts, name: str, action: str, out_dtype) -> tuple[torch.Tensor, dict]:
    """Tensor ``name`` copied from the model ``action`` names (checked, cast to the
    output dtype), with its report row."""
    src = _source(experts, action)
    who = "the base model" if action == "base" else f"expert {action!r}"
    if name not in src:
        raise CurvlensError(f"tensors: {name!r} is to be taken from {who}, which has no such tensor")
    t = src[name]
    problem = weight_problems(t)
    if problem is not None:
        raise CurvlensError(f"{who}, tensor {name!r}: {problem}")
    layer, role = param_role(name)
    row = {"name": name, "layer": layer, "role": role, "numel": t.numel(), "source": action}
    if not t.is_floating_point():
        return t, row
    base = experts.base
    if base is not None and name in base and base.shape(name) == t.shape:
        norms = ChangeNorms()
        norms.add(t.reshape(-1).float(), base[name].reshape(-1).float())
        row.update(delta_norm=norms.delta, rel_delta=norms.relative())
    return cast_checked(t.float(), _out_dtype(t.dtype, out_dtype), name), row


def _left_out_row(experts: Experts, name: str, action: str) -> dict:
    layer, role = param_role(name)
    return {"name": name, "layer": layer, "role": role, "numel": experts.reference.shape(name).numel(),
            "source": action}


def _report_frame(rows: list[dict], names):
    import pandas as pd

    cols = ["name", "layer", "role", "numel", "source", *(f"kept_{n}" for n in names),
            "all_masked", "delta_norm", "rel_delta"]
    return pd.DataFrame(rows, columns=cols)


def _ties(s, g: TensorGroup, i: int) -> int | None:
    """Tied entries expert ``i`` keeps in this tensor; a selection made in one
    read counts them here, in model order (:class:`~curvlens.streams.thresholds.TieLedger`)."""
    if s.ledger is not None and not s.ledger.seen(g.name):
        v = g.moments[i] if s.criterion == "fisher" else None
        s.ledger.take(g.name, count_equal(g.base, g.experts[i], v, s.criterion, s.threshold))
    return s.ties(g.name)


def _model_wide(m, experts: Experts, p: dict, dev, progress: bool, selection: str = "auto"):
    """The method's model-wide selection (:attr:`MergeMethod.model_wide`), made in
    two streaming passes: one :class:`Selection` per expert, or None. Moves the
    densities into exact thresholds in ``p``."""
    spec = m.model_wide
    if spec is None or all(d is None for d in p[spec.density]):
        return None
    densities = p[spec.density]
    if any(d is None for d in densities):
        raise CurvlensError(f"{spec.density} must be given for every expert or none; got {densities}")
    compress = {}
    for key, param in (("rank1_approx", spec.rank1), ("rank", spec.rank)):
        values = p[param] if param is not None else [None]
        if len(set(values)) > 1:
            raise CurvlensError(f"{spec.density} with per-expert {param} differing is not supported; got {values}")
        compress[key] = values[0]
    compressed = any(v for v in compress.values())
    if selection not in ("auto", "exact", "scout"):
        raise CurvlensError(f"selection={selection!r} is not valid; expected 'auto', 'exact' or 'scout'")
    if selection == "auto":
        selection = "scout" if partial_reads(experts, spec.criterion == "fisher") else "exact"
    if selection == "scout" and not compressed:
        found, _ = scout_selections(experts, densities, [spec.criterion], device=dev, progress=progress)
    else:
        found = model_selections(experts, densities, [spec.criterion], device=dev, progress=progress, **compress)
    selections = [found[spec.criterion, e, d] for e, d in zip(experts.names, densities)]
    p[spec.threshold] = [s.threshold for s in selections]
    p[spec.density] = [None] * len(experts)  # now expressed as exact selections
    return selections


def _call(m, g: TensorGroup, p: dict, dev, counts: MaskCounts) -> torch.Tensor:
    # a generator per tensor, from the seed and the name: the same masks in any order
    rng = torch.Generator(device=dev).manual_seed(tensor_seed(p["seed"], g.name)) if m.uses_rng else None
    try:
        return m(g.base, g.experts, g.moments if m.needs_moments else None, rng=rng, counts=counts, **p)
    except CurvlensError as err:
        raise CurvlensError(f"tensor {g.name!r}: {err}") from err


def _merge_one(m, g: TensorGroup, p: dict, dev, names, target: torch.dtype) -> tuple[torch.Tensor, dict]:
    """Merge one tensor; returns it on the CPU in ``target`` dtype, with its report row.

    The method gets the tensors in their stored dtype and works in cache-sized
    fp32 blocks (:mod:`curvlens.math.blocks`); it counts the entries its masks
    kept, and the change norms and the cast to ``target`` run over the same blocks.
    """
    stats = _Stats(len(names))
    if not g.experts[0].is_floating_point():
        # integer/bool buffers cannot be averaged: carry the base's (or first expert's)
        merged = g.base if g.base is not None else g.experts[0]
        return merged.to("cpu"), stats.row(g, names, merged=False)
    merged = _call(m, g, p, dev, stats.counts)
    flat_merged = merged.reshape(-1)
    keep_as_is = merged.device.type == "cpu" and target == torch.float32
    out = merged if keep_as_is else torch.empty(merged.shape, dtype=target)
    flat_out = out.reshape(-1)
    for sl in blocks(flat_merged.numel(), block_size(dev)):
        block = flat_merged[sl]
        stats.norms.add(block, reference_block(g.base, g.experts, sl))
        if not keep_as_is:
            flat_out[sl] = cast_checked(block, target, g.name)
    if not stats.norms.finite:
        raise CurvlensError(f"tensor {g.name!r}: the {m.name} merge produced non-finite values "
                            f"({int((~torch.isfinite(merged)).sum())} of {merged.numel()})")
    return out, stats.row(g, names)


class _Stats:
    """Per-tensor report numbers: mask counts from the method, change norms
    accumulated over blocks (:mod:`curvlens.math.merge_report`)."""

    def __init__(self, n: int):
        self.counts = MaskCounts(n)
        self.norms = ChangeNorms()

    def row(self, g: TensorGroup, names, merged: bool = True) -> dict:
        numel = g.experts[0].numel()
        row: dict[str, Any] = {"name": g.name, "layer": g.layer, "role": g.role, "numel": numel,
                               "source": "merged"}
        masked = self.counts.used
        for i, n in enumerate(names):
            row[f"kept_{n}"] = self.counts.kept[i] / numel if masked else 1.0
        row["all_masked"] = 1.0 - self.counts.any_kept / numel if masked else 0.0
        row["delta_norm"] = self.norms.delta if merged else 0.0
        row["rel_delta"] = self.norms.relative() if merged else 0.0
        return row


def _config(m, experts: Experts, p: dict, out_dtype, tensors=None, in_dtype=None) -> dict:
    """The merge as a mergekit-style config that ``curvlens merge`` re-runs: the
    models by path (when they have one), shared parameters at the top, per-expert
    values that differ under each model, defaults left out."""
    defaults = {spec.name: spec.default for spec in m.params}
    per_expert = {spec.name for spec in m.params if spec.per_expert}
    top, per_model = {}, [{} for _ in experts.experts]
    for k, v in _plain(p).items():
        if k in per_expert and isinstance(v, list):
            for mp, x in zip(per_model, v):
                if x != defaults[k]:
                    mp[k] = x
        elif v != defaults[k]:
            top[k] = v
    cfg = {"merge_method": m.name}
    paths = [e.path or e.checkpoint.path for e in experts.experts]
    if all(q is not None for q in paths):
        if experts.base is not None and experts.base.path is not None:
            cfg["base_model"] = str(experts.base.path)
        cfg["models"] = []
        for e, q, mp in zip(experts.experts, paths, per_model):
            if m.needs_moments and e.moments is not None and e.moments.path is not None:
                mp = {**mp, "preconditioner_path": str(e.moments.path)}
            cfg["models"].append({"model": str(q), **({"parameters": mp} if mp else {})})
    cfg["parameters"] = top
    rules = list(tensors.items()) if hasattr(tensors, "items") else list(tensors or [])
    if rules:
        by_name = {e.name: str(q) for e, q in zip(experts.experts, paths) if q is not None}
        cfg["tensors"] = [{"filter": pat, "action": by_name.get(a, a)} for pat, a in rules]
    if experts.exclude:
        cfg["tensors"] = cfg.get("tensors", []) + [{"filter": pat, "action": "drop"}
                                                   for pat in experts.exclude.patterns]
    # mergekit reads inputs in `dtype` and writes `out_dtype`: curvlens computes
    # in fp32 from the stored (or input_dtype-rounded) inputs
    if in_dtype is not None:
        cfg["dtype"] = str(in_dtype).replace("torch.", "")
    elif out_dtype is not None:
        cfg["dtype"] = "float32"
    if out_dtype is not None:
        cfg["out_dtype"] = str(out_dtype).replace("torch.", "")
    return cfg


def _plain(p: dict) -> dict:
    """Resolved params as YAML-safe plain values."""
    out = {}
    for k, v in p.items():
        if isinstance(v, (list, tuple)):
            v = [x if isinstance(x, (int, float, str, bool, type(None))) else str(x) for x in v]
            if len(set(map(repr, v))) == 1:
                v = v[0]
        elif not isinstance(v, (int, float, str, bool, type(None))):
            v = str(v)
        out[k] = v
    return out
