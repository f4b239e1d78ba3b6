"""Which parameter name each index of a ``torch.optim`` state stands for.

``torch.optim`` numbers parameters group by group in the order they were passed;
a checkpoint lists them in another order (safetensors: sorted). The order is
recovered from the model's architecture (:mod:`curvlens.io.architecture`, no
remote code), tried with the HF Trainer's decay/no-decay grouping, and checked
shape by shape; an ambiguous or failing match is an error, never a guess.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from curvlens.errors import CurvlensError
from curvlens.io.checkpoint import Checkpoint


def name_index_state(state: Mapping, groups: list, checkpoint, label: str, beside=None):
    """Map an index-keyed optimizer state to parameter names: ``(name -> state,
    name -> shape of the parameters listed but never updated)``.

    ``torch.optim`` numbers parameters group by group in the order they were passed.
    With one group that is the model's parameter order; the HF Trainer passes two
    groups (with and without weight decay), each in model order. Candidate orders
    come, in this preference, from the architectures the model's ``config.json``
    declares, from transformers' other heads for its ``model_type``, and from the
    checkpoint's own order where files keep it (``.bin``/``.pt``, in-memory; not
    safetensors, which sorts names). Each is checked against the group sizes and
    every shape; the first tier with a match wins, and two different matches in
    it are an error, never a guess.
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
    shapes, tiers, whys = _candidate_orders(checkpoint, sizes, label, beside)
    errors: list[str] = []
    for make_tier in tiers:  # built lazily: transformers classes only while needed
        tier = make_tier()
        matches = []
        for order_name, names in tier:
            problem = _order_problem(names, indices, state, shapes)
            if problem is None:
                matches.append((order_name, names))
            else:
                errors.append(f"{order_name}: {problem}")
        distinct = {tuple(m) for _, m in matches}
        if len(distinct) > 1:
            raise CurvlensError(f"{label}: optimizer indices match more than one parameter order "
                                f"({', '.join(n for n, _ in matches)}); pass checkpoint= as the explicit "
                                "list of names in optimizer order")
        if distinct:
            names = matches[0][1]
            named = {names[k]: state[i] for k, i in enumerate(indices) if i in state}
            # listed in a param group but never stepped (no gradient ever reached
            # it): Adam would hold zeros there; the shape is the model's
            never = {names[k]: shapes[names[k]] for k, i in enumerate(indices)
                     if i not in state and shapes is not None}
            return named, never
    errors += whys
    raise CurvlensError(f"{label}: cannot map optimizer indices to parameter names:\n  " + "\n  ".join(errors)
                        + "\n  (pass checkpoint= as the list of parameter names in the optimizer's order)")


def _candidate_orders(checkpoint, sizes: list[int], label: str, beside=None):
    """``(shapes or None, tiers, reasons)``: each tier a callable giving candidate
    ``(label, names)`` orders, tried in turn; reasons say why a tier had none."""
    if isinstance(checkpoint, Sequence) and not isinstance(checkpoint, (str, bytes)):
        names = list(checkpoint)
        if not all(isinstance(n, str) for n in names):
            raise CurvlensError(f"{label}: checkpoint= as a list must hold parameter names (str)")
        if len(set(names)) != len(names):
            raise CurvlensError(f"{label}: checkpoint= lists a parameter name more than once")
        # the names are checked shape by shape against the model saved beside
        # the optimizer state, when there is one (a wrong order is caught there)
        return _shapes_beside(beside), [lambda: [("explicit parameter names", names)]], []
    ckpt = Checkpoint.open(checkpoint)
    shapes = {n: ckpt.shape(n) for n in ckpt.keys()}
    whys: list[str] = []
    tiers = []
    if ckpt.path is not None:
        model_dir = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent

        def architectures(which: str):
            from curvlens.io.architecture import architecture_orders

            found, why = architecture_orders(model_dir, which)
            if why:
                whys.append(why)
            return [order for cls_name, names, no_decay in found
                    for order in _with_decay_split(f"{cls_name} parameter order", names, no_decay, sizes)]

        tiers += [lambda: architectures("declared"), lambda: architectures("fallback")]
    if ckpt.keeps_order:
        names = [n for n in ckpt.keys() if ckpt.dtype(n).is_floating_point]
        own = _with_decay_split("checkpoint's own order", names, {n for n in names if _hf_no_decay(n)}, sizes)
        tiers.append(lambda: own)
    return shapes, tiers, whys


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
    # The HF Trainer exempts biases and normalisation weights from weight decay.
    return name.endswith("bias") or "norm" in name.lower()


def _order_problem(names, indices, state, shapes) -> str | None:
    if len(names) != len(indices):
        return f"optimizer has {len(indices)} parameters, the model has {len(names)}"
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
