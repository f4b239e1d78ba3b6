"""The merge driver: one loop that writes every merged model, tensor by tensor.

A :class:`MergeJob` says what each output tensor is: merged from the experts by a
registered method (read, call the method's pure per-tensor function, cast to the
output dtype), or taken from one model (a ``tensors`` action of a merge, or a
layer of a passthrough ``slices`` stack, renamed and scaled), or left out (a row
of the report only). :func:`run_merge` streams them into one writer (or keeps
them, for small in-memory merges) and adds one row per tensor to the report.
A method that declares a model-wide selection (OTA's ``ffg_density``) first gets
it from two streaming passes (:mod:`curvlens.passes.thresholds`); the driver
reads that declaration, never a method's name.

Who builds jobs: :func:`curvlens.config.merge.merge` (the public ``merge``) and
:class:`curvlens.config.stack.StackPlan`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from curvlens.errors import CurvlensError
from curvlens.io.checkpoint import Checkpoint, PathLike
from curvlens.io.dtypes import dtype_overrides, output_dtype
from curvlens.io.writer import ModelWriter
from curvlens.math.blocks import block_size, blocks, tensor_seed
from curvlens.math.checks import equal_buffer, weight_problems
from curvlens.math.merge_report import ChangeNorms, cast_checked, cast_words, reference_block
from curvlens.math.methods import MaskCounts, MergeMethod, resolve_params
from curvlens.passes.experts import Experts, TensorGroup
from curvlens.passes.merge_result import MergeResult
from curvlens.passes.preflight import untrained_names
from curvlens.passes.scout import partial_reads, scout_selections
from curvlens.passes.thresholds import THRESHOLD_COLUMNS, model_selections
from curvlens.roles import param_role
from curvlens.runtime import resolve_device
from curvlens.tensor_filter import TensorFilter, tensor_actions

#: The actions of :func:`plan_tensors` that write no tensor taken from a model.
NOT_TAKEN = ("merge", "drop", "excluded")


@dataclass(frozen=True)
class Take:
    """One output tensor copied from one model: unchanged (a ``tensors`` action),
    or renamed and scaled (a passthrough layer).

    Attributes
    ----------
    name : str
        Its name in the output.
    source : Checkpoint
        The model it is read from, as ``source_name``.
    source_name : str
    label : str
        The report's ``source`` (``base``, an expert's name, a model dir's name).
    who : str
        The model as an error names it (``"the base model"``, a path).
    reference : Checkpoint, optional
        Change norms are measured against its tensor ``name`` (the base).
    scale : float, optional
        Multiply a floating tensor by this, in the dtype it is read in.
    read_dtype : torch.dtype, optional
        Round a floating tensor to this first (a config's ``dtype``).
    """

    name: str
    source: Checkpoint
    source_name: str
    label: str
    who: str
    reference: Checkpoint | None = None
    scale: float | None = None
    read_dtype: torch.dtype | None = None

    def shape(self) -> torch.Size:
        return self.source.shape(self.source_name)

    def stored_dtype(self) -> torch.dtype:
        return self.source.dtype(self.source_name)


@dataclass(frozen=True)
class OutputFiles:
    """What a written merge puts beside its tensors (its config and tokenizer files
    are copied from ``reference_dir``)."""

    reference_dir: Path | None
    config_text: str                       # saved as curvlens_merge.yml
    max_shard_size: int | str = "1GB"
    files: Mapping[str, str] = field(default_factory=dict)   # written over the copied ones
    tokenizer_dir: Path | None = None      # tokenizer files copied from here instead
    config_overrides: Mapping[str, Any] = field(default_factory=dict)   # besides the dtype
    inputs: Sequence[Path] = ()            # the output may not touch any of them


@dataclass
class MergeJob:
    """Every output tensor of a merge, in order: the merged ones (``experts``
    with ``method``; none when ``method`` is None), then ``takes``; then the
    report rows of tensors left out.

    ``params`` are the method's resolved parameters (a model-wide density becomes
    exact thresholds when the job runs); ``per_tensor(name, params)`` gives a
    tensor's own (see :class:`PerTensorParams`); ``names`` label the report's
    ``kept_<name>`` columns; ``label`` is the result's method; ``selection`` how a
    model-wide selection is found (``"auto"``, ``"exact"``, ``"scout"``: see
    :func:`curvlens.config.merge.merge`).
    """

    label: str
    method: MergeMethod | None = None
    experts: Experts | None = None
    params: dict = field(default_factory=dict)
    per_tensor: Callable[[str, dict], dict] | None = None
    takes: Sequence[Take] = ()
    left_out: Sequence[dict] = ()
    names: Sequence[str] = ()
    out_dtype: torch.dtype | None = None
    in_dtype: torch.dtype | None = None
    selection: str = "auto"


def run_merge(job: MergeJob, out: PathLike | None = None, files: OutputFiles | None = None, *,
              device: str | torch.device = "auto", progress: bool = True,
              overwrite: bool = False) -> MergeResult:
    """Run ``job``: write its tensors to ``out`` (an HF dir with ``files``), or keep
    them in memory when ``out`` is None.

    Returns
    -------
    MergeResult
    """
    import pandas as pd

    m, experts, p = job.method, job.experts, job.params
    dev = resolve_device(device)
    selections = _model_wide(m, experts, p, dev, progress, job.selection) if m is not None else None
    thresholds = None
    if selections is not None:
        thresholds = pd.DataFrame([s.row() for s in selections], columns=THRESHOLD_COLUMNS)
    merged_names = experts.tensor_names() if m is not None else []
    rows: list[dict] = []
    kept_tensors: dict[str, torch.Tensor] = {}
    writer_cm = nullcontext()
    if out is not None:
        if files is None:
            raise CurvlensError("run_merge: an output dir needs its OutputFiles")
        # every output name, shape and dtype is known now: stream the bytes unbuffered
        plan = [(n, experts.shape(n), output_dtype(experts.stored_dtype(n), job.out_dtype)) for n in merged_names]
        plan += [(t.name, t.shape(), output_dtype(t.stored_dtype(), job.out_dtype)) for t in job.takes]
        # transformers reads the weights' dtype from config.json: keep it truthful
        overrides = {**files.config_overrides, **dtype_overrides(job.out_dtype)}
        writer_cm = ModelWriter(out, files.reference_dir, max_shard_size=files.max_shard_size, overwrite=overwrite,
                                extra_files={**files.files, "curvlens_merge.yml": files.config_text}, plan=plan,
                                config_overrides=overrides, inputs=files.inputs, tokenizer_dir=files.tokenizer_dir,
                                background=True)  # each tensor is made afresh and handed over
    with writer_cm as writer:
        def emit(name: str, t: torch.Tensor, made_by: str) -> None:
            if writer is not None:  # the writer refuses a non-finite tensor, naming made_by
                writer.add(name, t, made_by=made_by)
            else:
                kept_tensors[name] = t

        if m is not None:
            _merge_all(m, job, experts, merged_names, p, selections, dev, progress, rows, emit)
        for take in job.takes:
            taken, row = _take_one(take, job.out_dtype)
            rows.append(row)
            emit(take.name, taken, f"{take.who}'s tensor {take.source_name!r}"
                 + (f" times scale {take.scale!r}" if take.scale is not None else ""))
        rows += list(job.left_out)
        report = _report_frame(rows, job.names)
        if writer is not None:  # written beside the weights when the writer closes
            writer.extra_files["merge_report.csv"] = report.to_csv(index=False)
    ckpt = Checkpoint.open(out) if out is not None else Checkpoint.open(kept_tensors)
    report["layer"] = report["layer"].astype("Int64")
    extra = {"selections": selections} if selections is not None else {}
    return MergeResult(ckpt, report, job.label, p, thresholds, Path(out) if out is not None else None, extra)


class PerTensorParams:
    """Each tensor's resolved parameters: the constant ones, with those that vary
    by tensor (``tensor_params(name)``, e.g. a config's
    :class:`~curvlens.config.param_settings.VaryingParams`) resolved for its name
    and the method's ``name_param`` set to it."""

    def __init__(self, m: MergeMethod, params: dict, resolved: dict, tensor_params, n: int):
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


def plan_tensors(experts: Experts, rules) -> tuple[dict[str, str], Experts]:
    """What happens to every reference tensor (:func:`tensor_actions`, with the
    Experts' own exclusions as ``"excluded"``), and the Experts restricted to the
    tensors that are merged."""
    sources = (["base"] if experts.base is not None else []) + experts.names
    actions = tensor_actions(rules, experts.reference.keys(), sources)
    excluded = set(experts.excluded_names())
    for n in excluded:
        if actions[n] == "merge":
            actions[n] = "excluded"
    for n in untrained_names(experts) if experts.base is not None else ():
        if actions.get(n) == "merge":  # a buffer no optimizer trained: the base's
            actions[n] = "base"
    not_merged = [n for n, a in actions.items() if a != "merge" and n not in excluded]
    if not any(a == "merge" for a in actions.values()):
        raise CurvlensError("tensors: the rules leave no tensor to merge")
    return actions, (experts.without(TensorFilter.exact(not_merged)) if not_merged else experts)


def taken_from(experts: Experts, actions: dict[str, str]) -> list[Take]:
    """The tensors ``actions`` take unchanged from one model (the base or an expert)."""
    return [Take(n, experts.model(a), n, a, "the base model" if a == "base" else f"expert {a!r}",
                 reference=experts.base) for n, a in actions.items() if a not in NOT_TAKEN]


def left_out_rows(experts: Experts, actions: dict[str, str]) -> list[dict]:
    """Report rows of the tensors ``actions`` leave out of the merged model."""
    rows = []
    for n, a in actions.items():
        if a in ("drop", "excluded"):
            layer, role = param_role(n)
            rows.append({"name": n, "layer": layer, "role": role, "numel": experts.shape(n).numel(), "source": a})
    return rows


def _take_one(take: Take, out_dtype) -> tuple[torch.Tensor, dict]:
    """Tensor ``take`` read from its model (checked, cast to the output dtype), with its report row."""
    src = take.source
    if take.source_name not in src:
        raise CurvlensError(f"tensors: {take.source_name!r} is to be taken from {take.who}, which has no such tensor")
    t = src[take.source_name]
    problem = weight_problems(t)
    if problem is not None:
        raise CurvlensError(f"{take.who}, tensor {take.source_name!r}: {problem}")
    layer, role = param_role(take.name)
    row = {"name": take.name, "layer": layer, "role": role, "numel": t.numel(), "source": take.label}
    if not t.is_floating_point():
        return t, row
    target = output_dtype(t.dtype, out_dtype)
    if take.read_dtype is not None:
        t = t.to(take.read_dtype)
    if take.scale is not None:
        t = t * take.scale
    ref = take.reference
    if ref is not None and take.name in ref and ref.shape(take.name) == t.shape:
        norms = ChangeNorms()
        norms.add(t.reshape(-1).float(), ref[take.name].reshape(-1).float())
        row.update(delta_norm=norms.delta, rel_delta=norms.relative())
    return cast_checked(t, target, take.name), row


def _report_frame(rows: list[dict], names):
    import pandas as pd

    cols = ["name", "layer", "role", "numel", "source", *(f"kept_{n}" for n in names),
            "all_masked", "delta_norm", "rel_delta"]
    return pd.DataFrame(rows, columns=cols)


def _merge_all(m, job, experts: Experts, names, p: dict, selections, dev, progress: bool, rows: list,
               emit) -> None:
    """Merge every tensor of ``names`` in model order, each handed to ``emit``."""
    one_read = selections is not None and any(s.ledger is not None for s in selections)
    # methods cast block by block, so they get the stored dtype
    for g in experts.iter_tensors(names, device=dev, moments=m.needs_moments, progress=progress,
                                  dtype=None, desc=f"merge {job.label}"):
        pt = job.per_tensor(g.name, p) if job.per_tensor is not None else p
        # a model-wide selection splits the tied scores tensor by tensor
        counts = MaskCounts(len(job.names), tie_budget=one_read)
        if selections is not None:
            budgets = _tie_budgets(selections, g.name)
            pt = {**pt, m.model_wide.ties: budgets}
        target = output_dtype(experts.stored_dtype(g.name), job.out_dtype)
        # as mergekit: a method's result is in the input dtype, then cast to out_dtype
        merged, row = _merge_one(m, g, pt, dev, job.names, job.in_dtype or target, cast_words(job.in_dtype, target),
                                 counts)
        if selections is not None:
            _spend_ties(selections, g.name, budgets, counts)
        if merged.is_floating_point() and merged.dtype != target:
            merged = cast_checked(merged, target, g.name)
        rows.append(row)
        emit(g.name, merged, f"the {job.label} merge")
    if selections is not None:
        _check_ties_spent(m, selections)


def _tie_budgets(selections, name: str) -> list[int | None]:
    """Tied entries each expert may still keep, from tensor ``name`` on.

    A selection made in one read (:mod:`curvlens.passes.scout`) knows how many
    tied entries to keep model-wide but not where they are: the first ones in
    model order. The merge itself keeps them: the method gets what is left as a
    budget (:class:`MaskCounts` ``tie_budget``), keeps the tied entries it meets
    up to it and says what it left, and :func:`_spend_ties` hands the rest on.
    That is the selection an exact count per tensor gives, without a pass of its
    own over every tensor's scores (about 0.1 CPU-s of an OTA+FFG merge of a
    250M x 3 zoo), and a shortfall is caught for the whole model
    (:func:`_check_ties_spent`). A selection with quotas per tensor (two reads)
    gives them as they are.
    """
    return [s.ledger.remaining if s.ledger is not None else s.ties(name) for s in selections]


def _spend_ties(selections, name: str, budgets, counts: MaskCounts) -> None:
    """Hand the tied entries tensor ``name`` kept out of each one-read selection's
    ledger (none when the method applied no tie quota there)."""
    for i, s in enumerate(selections):
        if s.ledger is not None:
            left = counts.ties_left[i]
            s.ledger.take(name, 0 if left is None else budgets[i] - left)


def _check_ties_spent(m, selections) -> None:
    """Every tied entry a one-read selection keeps was met by the merge: else the
    selection pass saw other scores than the merge, and the merge would keep
    fewer entries than the density promised."""
    for s in selections:
        if s.ledger is not None and s.ledger.remaining > 0:
            raise CurvlensError(f"{m.name}: expert {s.expert!r} should keep {s.ledger.total} entries tied at the "
                                f"threshold {s.threshold!r} but the merge met only "
                                f"{s.ledger.total - s.ledger.remaining}; scores differ from the selection pass")


def _model_wide(m, experts: Experts, p: dict, dev, progress: bool, selection: str = "auto"):
    """The method's model-wide selection (:attr:`MergeMethod.model_wide`), made in
    two streaming passes: one :class:`Selection` per expert, or None. Moves the
    densities into exact thresholds in ``p``."""
    spec = m.model_wide
    if spec is None or all(d is None for d in p[spec.density]):
        return None
    densities = p[spec.density]
    if experts.base is None:
        raise CurvlensError(f"{spec.density} selects task-vector entries model-wide: it needs a base model "
                            "(task vectors are theta_i - theta_0)")
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
    if selection == "auto":  # one read where the files can be sampled and the moments are whole
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


def _merge_one(m, g: TensorGroup, p: dict, dev, names, target: torch.dtype,
               words: dict | None = None, counts: MaskCounts | None = None) -> tuple[torch.Tensor, dict]:
    """Merge one tensor; returns it on the CPU in ``target`` dtype, with its report row.

    The method gets the tensors in their stored dtype and works in cache-sized
    fp32 blocks (:mod:`curvlens.math.blocks`); it counts the entries its masks
    kept, and the change norms and the cast to ``target`` run over the same blocks.
    """
    stats = _Stats(len(names), counts)
    if not g.experts[0].is_floating_point():
        # integer/bool buffers cannot be averaged: every model must hold the same (else a tensors rule)
        merged = equal_buffer(g.name, g.base, g.experts, names)
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
            flat_out[sl] = cast_checked(block, target, g.name, **(words or {}))
    if not stats.norms.finite:
        raise CurvlensError(f"tensor {g.name!r}: the {m.name} merge produced non-finite values "
                            f"({int((~torch.isfinite(merged)).sum())} of {merged.numel()})")
    return out, stats.row(g, names)


class _Stats:
    """Per-tensor report numbers: mask counts from the method, change norms
    accumulated over blocks (:mod:`curvlens.math.merge_report`)."""

    def __init__(self, n: int, counts: MaskCounts | None = None):
        self.counts = MaskCounts(n) if counts is None else counts
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
