"""Which parameter name each index of a ``torch.optim`` state stands for.

``torch.optim`` numbers parameters group by group in the order they were passed;
a checkpoint lists them in another order (safetensors: sorted). The order is
recovered from the model's architecture (:mod:`curvlens.io.architecture`, no
remote code), tried with the HF Trainer's decay/no-decay grouping, and checked
shape by shape, in memory and, through the ways transformers may save those
names (:mod:`curvlens.io.name_mapping`), against the checkpoint; an ambiguous or
failing match is an error, never a guess.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from curvlens.errors import CurvlensError
from curvlens.io.architecture import NO_DECAY_PATTERNS, architecture_orders
from curvlens.io.checkpoint import Checkpoint
from curvlens.io.name_mapping import SavedLayout


@dataclass(frozen=True)
class IndexNames:
    """An index-keyed optimizer state with its parameter names.

    Attributes
    ----------
    named : dict
        Parameter name (as the model in memory calls it) -> its state.
    never : dict
        Name -> shape of the parameters a group lists but the optimizer never
        stepped (Adam would hold zeros there).
    order : str
        Which candidate order matched (the tier), e.g. ``"LlamaForCausalLM
        parameter order, HF Trainer decay/no-decay groups"``.
    layout : SavedLayout or None
        How those names are saved, when the names come from an architecture
        (:mod:`curvlens.io.name_mapping`); None when they are the saved names.
    saved : dict
        The checkpoint's ``{name: (shape, is_floating)}`` the layout was checked
        against (empty without a checkpoint).
    """

    named: dict[str, Mapping]
    never: dict[str, torch.Size]
    order: str
    layout: SavedLayout | None = None
    saved: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Candidate:
    label: str
    names: list[str]
    shapes: dict | None  # name -> shape in the candidate's own names; None: unknown
    layouts: tuple[SavedLayout, ...] | None = None  # None: the names are the saved ones


def name_index_state(state: Mapping, groups: list, checkpoint, label: str, beside=None) -> IndexNames:
    """Map an index-keyed optimizer state to parameter names.

    ``torch.optim`` numbers parameters group by group in the order they were passed.
    With one group that is the model's parameter order; the HF Trainer passes two
    groups (with and without weight decay), each in model order. Candidate orders
    come, in this preference, from the architectures the model's ``config.json``
    declares, from transformers' other heads for its ``model_type``, and from the
    checkpoint's own order where files keep it (``.bin``/``.pt``, in-memory; not
    safetensors, which sorts names). Each is checked against the group sizes and
    every shape; an architecture's order is then checked, shape by shape, against
    the checkpoint through each way its names may be saved (as in memory, or
    through transformers' conversion mapping). The first tier with a match wins,
    and two different matches in it are an error, never a guess.
    """
    for gi, g in enumerate(groups):
        params = g.get("params", [])
        if not isinstance(params, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                   for i in params):
            raise CurvlensError(f"{label}: param_groups[{gi}]['params'] must be a list of parameter indices")
    indices = [i for g in groups for i in g.get("params", [])] or sorted(state)
    if len(set(indices)) != len(indices):
        raise CurvlensError(f"{label}: param_groups list a parameter index more than once")
    stray = sorted(set(state) - set(indices))
    if stray:
        raise CurvlensError(f"{label}: state has parameter indices {stray[:5]} that no param_group lists")
    sizes = [len(g.get("params", [])) for g in groups] or [len(indices)]
    if checkpoint is None:
        raise CurvlensError(
            f"{label}: optimizer state is keyed by parameter index; pass checkpoint= "
            "(the model, or its parameter names in the optimizer's order) to map indices to names"
        )
    saved, tiers, whys = _candidate_orders(checkpoint, sizes, label, beside)
    errors: list[str] = []
    for make_tier in tiers:  # built lazily: transformers classes only while needed
        matches = []
        for cand in make_tier():
            problem = _order_problem(cand.names, indices, state, cand.shapes)
            if problem is not None:
                errors.append(f"{cand.label}: {problem}")
                continue
            layout = None
            if cand.layouts is not None:
                layout, why = _saved_layout(cand, saved)
                if layout is None:
                    errors.append(f"{cand.label}: fits the optimizer, but {why}")
                    continue
            matches.append((cand, layout))
        distinct = {(tuple(c.names), lay.label if lay is not None else None) for c, lay in matches}
        if len(distinct) > 1:
            raise CurvlensError(f"{label}: optimizer indices match more than one parameter order "
                                f"({', '.join(c.label for c, _ in matches)}); pass checkpoint= as the explicit "
                                "list of names in optimizer order")
        if distinct:
            cand, layout = matches[0]
            names, shapes = cand.names, cand.shapes
            named = {names[k]: state[i] for k, i in enumerate(indices) if i in state}
            # listed in a param group but never stepped (no gradient ever reached
            # it): Adam would hold zeros there; the shape is the model's
            never = {names[k]: shapes[names[k]] for k, i in enumerate(indices)
                     if i not in state and shapes is not None}
            order = cand.label if layout is None else f"{cand.label}; saved names: {layout.label}"
            return IndexNames(named, never, order, layout, saved or {})
    errors += whys
    raise CurvlensError(f"{label}: cannot map optimizer indices to parameter names:\n  " + "\n  ".join(errors)
                        + "\n  (pass checkpoint= as the list of parameter names in the optimizer's order)")


def _saved_layout(cand: _Candidate, saved: dict | None) -> tuple[SavedLayout | None, str]:
    """The first of a candidate's layouts that checks out against the checkpoint,
    or why none does (each layout tried, with its first problems)."""
    if saved is None:
        return None, "no checkpoint to check its saved names against"
    tried = []
    for layout in cand.layouts:
        problems = layout.problems(saved)
        if not problems:
            return layout, ""
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        tried.append(f"{layout.label}: {'; '.join(problems[:2])}{more}")
    return None, "no saved layout matches the checkpoint: " + " | ".join(tried)


def _candidate_orders(checkpoint, sizes: list[int], label: str, beside=None):
    """``(saved tensors or None, tiers, reasons)``: each tier a callable giving
    candidate orders, tried in turn; reasons say why a tier had none."""
    if isinstance(checkpoint, Sequence) and not isinstance(checkpoint, (str, bytes)):
        names = list(checkpoint)
        if not all(isinstance(n, str) for n in names):
            raise CurvlensError(f"{label}: checkpoint= as a list must hold parameter names (str)")
        if len(set(names)) != len(names):
            raise CurvlensError(f"{label}: checkpoint= lists a parameter name more than once")
        # the names are checked shape by shape against the model saved beside
        # the optimizer state, when there is one (a wrong order is caught there)
        shapes = _shapes_beside(beside)
        return None, [lambda: [_Candidate("explicit parameter names", names, shapes)]], []
    ckpt = Checkpoint.open(checkpoint)
    shapes = {n: ckpt.shape(n) for n in ckpt.keys()}
    saved = {n: (ckpt.shape(n), ckpt.dtype(n).is_floating_point) for n in ckpt.keys()}
    whys: list[str] = []
    tiers = []
    if ckpt.path is not None:
        model_dir = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent

        def architectures(which: str):
            found, why = architecture_orders(model_dir, which)
            if why:
                whys.append(why)
            whys.extend(f"{a.name}: {note}" for a in found for note in a.notes)
            return [_Candidate(what, names, a.params, a.layouts) for a in found
                    for what, names in _with_decay_split(f"{a.name} parameter order", list(a.params),
                                                         a.no_decay, sizes)]

        tiers += [lambda: architectures("declared"), lambda: architectures("fallback")]
    if ckpt.keeps_order:
        names = [n for n in ckpt.keys() if ckpt.dtype(n).is_floating_point]
        own = [_Candidate(what, order, shapes) for what, order in
               _with_decay_split("checkpoint's own order", names, {n for n in names if _hf_no_decay(n)}, sizes)]
        tiers.append(lambda: own)
    return saved, tiers, whys


def _shapes_beside(model_dir) -> dict | None:
    if model_dir is None:
        return None
    try:
        ckpt = Checkpoint.open(model_dir)
    except CurvlensError:
        return None  # no model there: the names cannot be checked
    return {n: ckpt.shape(n) for n in ckpt.keys()}


def _with_decay_split(what: str, names: list[str], no_decay: set[str], sizes: list[int]):
    out = [(what, names)]
    if len(sizes) == 2:
        decay = [n for n in names if n not in no_decay]
        if len(decay) == sizes[0]:  # the Trainer's first group is the decayed one
            out.append((f"{what}, HF Trainer decay/no-decay groups",
                        decay + [n for n in names if n in no_decay]))
    return out


def _hf_no_decay(name: str) -> bool:
    # The HF Trainer's name rule (no modules are known here to apply its LayerNorm rule).
    return any(re.search(p, name.lower()) for p in NO_DECAY_PATTERNS)


def _order_problem(names, indices, state, shapes) -> str | None:
    if len(names) != len(indices):
        frozen = (" (fewer: parameters frozen with requires_grad=False, e.g. by freeze_feature_encoder(), are in "
                  "no optimizer; which ones is not recorded)") if len(indices) < len(names) else ""
        return f"optimizer has {len(indices)} parameters, the model has {len(names)}{frozen}"
    for k, i in enumerate(indices):
        if shapes is not None and names[k] not in shapes:
            return f"parameter {i} -> {names[k]!r}, which the checkpoint lacks"
        if i not in state or "exp_avg_sq" not in state[i]:
            continue  # never-updated parameter: checked later as a missing moment
        got = tuple(state[i]["exp_avg_sq"].shape)
        if shapes is not None:
            want = tuple(shapes[names[k]])
            if got != want:
                return f"parameter {i} -> {names[k]!r}: moment shape {got} != weight shape {want}"
    return None
