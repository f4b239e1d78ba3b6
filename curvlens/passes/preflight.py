"""Before a merge: where each expert's moments come from, and whether their levels agree.

Experts trained differently (learning rate, run length, batch size, betas) carry
second moments at different *levels*. A curvature-weighted merge (a method that
declares it uses moments: ``fisher``, ``ota``) compares the experts' ``v`` entry
by entry, so a level ratio of a few times makes one expert's edit win everywhere,
whatever the shapes say. :func:`preflight` shows, per expert, the moments' source
and format, the step, betas, the raw ``v`` level and Adam's bias factor
``1 / (1 - beta2**step)``; :func:`level_warning` says so before such a merge, naming
the experts and the remedies (``normalise: global``, ``bias_correction``).
"""
from __future__ import annotations

import html
import math
import weakref
from collections.abc import Sequence

import pandas as pd
import torch

from curvlens.errors import CurvlensError
from curvlens.math.methods import get_method, list_methods
from curvlens.math.pair_sweep import weighted_sq_diff

#: The level ratio (largest expert's mean v over the smallest's) above which a
#: curvature-weighted merge is taken to be dominated by level differences.
LEVEL_RATIO = 3.0

#: Moment entries per expert the level is measured on (whole tensors, spread over
#: the model): every tensor for models up to this size, a sample beyond it.
LEVEL_ENTRIES = 1 << 24

PREFLIGHT_COLUMNS = ["expert", "moments_format", "moments_file", "names_from", "moment_dtypes", "step", "beta1",
                     "beta2", "bias_factor", "bias_corrected", "v_level", "level_ratio", "level_entries",
                     "relative_edit", "edit_ratio", "untrained", "never_updated"]


def level_names(experts, max_entries: int = LEVEL_ENTRIES) -> list[str]:
    """The floating tensors the level is measured on: all of them when they hold
    at most ``max_entries`` entries, else tensors taken evenly through the model
    (first, last, and between) while they fit."""
    ref = experts.reference
    names = experts.tensor_names(floating_only=True)
    sizes = {n: ref.shape(n).numel() for n in names}
    if sum(sizes.values()) <= max_entries:
        return names
    picked, total = [], 0
    for k in _spread(len(names)):
        n = names[k]
        if total + sizes[n] <= max_entries:
            picked.append(n)
            total += sizes[n]
    return [n for n in names if n in set(picked)]


def _spread(n: int) -> list[int]:
    """Indices 0..n-1 in the order 0, n-1, n/2, n/4, 3n/4, ... (each once).

    Examples
    --------
    >>> _spread(5)
    [0, 4, 2, 1, 3]
    """
    order, seen, parts = [], set(), 1
    while len(order) < n:
        for j in range(parts + 1):
            k = round(j * (n - 1) / parts) if n > 1 else 0
            if k not in seen:
                seen.add(k)
                order.append(k)
        parts *= 2
    return order


def preflight(experts, *, max_entries: int = LEVEL_ENTRIES) -> pd.DataFrame:
    """One row per expert: what a curvature-weighted merge of ``experts`` will use.

    Parameters
    ----------
    experts : Experts
    max_entries : int
        Moment entries per expert the level is measured on (see
        :func:`level_names`); the same tensors for every expert.

    Returns
    -------
    pandas.DataFrame
        ``expert, moments_format, moments_file, names_from`` (how parameter names
        were found: the tier), ``moment_dtypes, step, beta1, beta2, bias_factor``
        (``1 / (1 - beta2**step)``, what ``bias_correction`` multiplies by),
        ``bias_corrected, v_level`` (mean v as the merge reads it),
        ``level_ratio`` (over the smallest expert's), ``level_entries``,
        ``relative_edit`` (``||theta_i - theta_0|| / ||theta_0||`` on the same
        tensors, with a base), ``edit_ratio`` (over the smallest), ``untrained``
        (saved tensors without optimizer state), ``never_updated``. Experts
        without moments get a row with the moment columns empty.
    """
    memo = _MEMO.get(experts, {}).get(max_entries)
    if memo is not None:  # the CLI prints it and the merge checks it: one read of the level tensors
        return memo.copy()
    names = level_names(experts, max_entries)
    base_sq = sum(_sq(experts.base[n]) for n in names) if experts.base is not None else 0.0
    rows = []
    for e in experts.experts:
        m = e.moments
        row = {"expert": e.name}
        if base_sq > 0:  # ||theta_i - theta_0|| / ||theta_0|| on the same tensors
            edit = sum(weighted_sq_diff(None, e.checkpoint[n], experts.base[n]) for n in names)
            row["relative_edit"] = math.sqrt(edit / base_sq)
        if m is not None:
            src = m.source
            betas = src.betas or (None, m.beta2)
            total, count = 0.0, 0
            for n in names:
                v = m[n]
                total += float(torch.sum(v, dtype=torch.float64))
                count += v.numel()
            row.update(moments_format=src.format, moments_file=str(src.file) if src.file is not None else None,
                       names_from=src.names, moment_dtypes=", ".join(src.dtypes), step=m.step, beta1=betas[0],
                       beta2=m.beta2 if m.beta2 is not None else betas[1], bias_corrected=m.bias_corrected,
                       v_level=total / count if count else math.nan, level_entries=count,
                       untrained=len(m.untrained), never_updated=len(m.never_updated))
            row["bias_factor"] = bias_factor(row["beta2"], m.step)
        rows.append(row)
    df = pd.DataFrame(rows, columns=PREFLIGHT_COLUMNS)
    for col, ratio in (("v_level", "level_ratio"), ("relative_edit", "edit_ratio")):
        x = pd.to_numeric(df[col], errors="coerce")
        df[ratio] = x / x.min() if x.notna().any() and x.min() > 0 else math.nan
    df["step"] = df["step"].astype("Int64")
    try:
        _MEMO.setdefault(experts, {})[max_entries] = df.copy()
    except TypeError:  # not weakly referenceable: no memo
        pass
    return df


#: preflight frames by Experts (their inputs do not change under them)
_MEMO: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _sq(t: torch.Tensor) -> float:
    """Sum of squares in float64 without a float64 copy of a float32/bf16 tensor."""
    return float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2


def bias_factor(beta2: float | None, step: int | None) -> float:
    """Adam's bias-correction factor ``1 / (1 - beta2**step)`` (NaN when unknown).

    Examples
    --------
    >>> round(bias_factor(0.999, 150), 2), round(bias_factor(0.999, 60), 2)
    (7.18, 17.16)
    """
    if beta2 is None or step is None or step < 1 or not 0 <= beta2 < 1:
        return math.nan
    return 1.0 / (1.0 - beta2 ** step)


def level_warning(frame: pd.DataFrame, method=None, params: dict | None = None) -> str | None:
    """Why a curvature-weighted merge would follow the experts' moment levels
    rather than their shapes, or None.

    Only methods that declare they use moments are concerned, and not when
    ``normalise: global`` divides each expert's weights by their mean per tensor.

    Parameters
    ----------
    frame : pandas.DataFrame
        :func:`preflight`'s frame.
    method : MergeMethod, optional
        The registered method (its ``needs_moments`` declaration is read); None:
        any curvature-weighted method.
    params : dict, optional
        The method's resolved parameters.

    Examples
    --------
    >>> frame = pd.DataFrame({"expert": ["math", "sorter"], "v_level": [1e-9, 8e-9], "step": [60, 150],
    ...                       "bias_factor": [17.2, 7.2], "bias_corrected": [False, False]})
    >>> level_warning(frame).split(":")[0]
    'a curvature-weighted merge (fisher, ota)'
    >>> level_warning(frame, get_method("ota"), {"normalise": "global"}) is None
    True
    """
    params = params or {}
    if method is not None and (not method.needs_moments
                               or str(params.get("normalise", "none")).lower() == "global"):
        return None
    rows = frame.dropna(subset=["v_level"])
    if len(rows) < 2 or not (rows["v_level"] > 0).all():
        return None
    hi, lo = rows.loc[rows["v_level"].idxmax()], rows.loc[rows["v_level"].idxmin()]
    ratio = hi["v_level"] / lo["v_level"]
    if ratio <= LEVEL_RATIO:
        return None
    steps = ", ".join(f"{r.expert!r}: step {r.step}, bias factor {r.bias_factor:.3g}"
                      for r in rows.itertuples())
    fixes = ["normalise: global (ota; each expert's weights divided by their mean per tensor)"]
    if not rows["bias_corrected"].all() and rows["bias_factor"].notna().all():
        fixes.append("bias_correction=True (Experts.from_dirs / Moments.open; divides v by 1 - beta2**step)")
    who = method.name if method is not None else "a curvature-weighted merge (" + ", ".join(
        m for m in list_methods()["method"] if get_method(m).needs_moments) + ")"
    edits = ""
    big = frame.dropna(subset=["relative_edit"]) if "relative_edit" in frame else frame.iloc[:0]
    if len(big) >= 2 and big["relative_edit"].min() > 0:
        e_hi, e_lo = big.loc[big["relative_edit"].idxmax()], big.loc[big["relative_edit"].idxmin()]
        if e_hi["relative_edit"] / e_lo["relative_edit"] > LEVEL_RATIO:
            edits = (f" Their edits also differ in size by {e_hi.relative_edit / e_lo.relative_edit:.1f}x (relative "
                     f"edit {e_hi.relative_edit:.3g} for {e_hi.expert!r}, {e_lo.relative_edit:.3g} for "
                     f"{e_lo.expert!r}): no weighting of the moments makes up for that.")
    return (f"{who}: the experts' second moments differ in level by {ratio:.1f}x (expert {hi.expert!r} "
            f"mean v {hi.v_level:.3g}, expert {lo.expert!r} {lo.v_level:.3g}; {steps}): the curvature weights "
            f"will follow the level, not the shape, and {hi.expert!r}'s edit will dominate. Consider "
            + " or ".join(fixes) + "; curvlens.preflight(experts) shows the levels." + edits)


def untrained_names(experts) -> list[str]:
    """Saved tensors no expert's optimizer state covers (buffers): taken from the
    base in a merge."""
    seen: dict[str, None] = {}
    for e in experts.experts:
        if e.moments is not None:
            seen.update(dict.fromkeys(getattr(e.moments, "untrained", ())))
    return list(seen)


def preflight_html(experts) -> str:
    """The notebook view of ``experts``: its repr, the preflight table, and the
    level warning a curvature-weighted merge would give."""
    head = f"<p><code>{html.escape(repr(experts))}</code></p>"
    if not experts.has_moments:
        return head
    try:
        frame = preflight(experts)
    except CurvlensError as err:  # a bad moment: say so where the table would be
        return head + f"<p><b>preflight failed:</b> {html.escape(str(err))}</p>"
    warn = level_warning(frame)
    shown = frame.drop(columns=["moments_file"])
    note = f"<p><b>warning:</b> {html.escape(warn)}</p>" if warn else ""
    return head + shown.to_html(index=False, na_rep="", float_format=lambda x: f"{x:.4g}") + note


def preflight_text(frame: pd.DataFrame, columns: Sequence[str] | None = None) -> str:
    """The preflight frame as plain text for a terminal."""
    cols = list(columns or ["expert", "moments_format", "names_from", "step", "beta2", "bias_factor",
                            "bias_corrected", "v_level", "level_ratio", "relative_edit", "untrained"])
    with pd.option_context("display.max_colwidth", 70, "display.width", 250):
        return frame[cols].to_string(index=False, float_format=lambda x: f"{x:.4g}")
