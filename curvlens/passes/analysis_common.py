"""Shared pieces of the streaming analyses: column schemas, input checks, ``aggregate``.

Every analysis in :mod:`curvlens.passes.analysis` returns a tidy DataFrame with one
row per tensor (x expert, x pair, x criterion, x density), identity columns first.
The exact column lists live here, as module constants, so the views and the tests
pin the same thing. :func:`aggregate` turns any of those per-tensor frames into
layer-, role- or model-level numbers.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from curvlens.arguments import nonempty_arg, real_arg
from curvlens.errors import CurvlensError
from curvlens.io.checkpoint import Checkpoint
from curvlens.passes.experts import Experts

# --------------------------------------------------------------------- schemas
TENSOR_ID = ["name", "layer", "role", "numel"]
CURVATURE_STATS_COLUMNS = ["expert", *TENSOR_ID, "mean_log10", "median_log10", "q01", "q10", "q50",
                           "q90", "q99", "frac_zero", "bias_corrected", "sampled"]
CURVATURE_OVERLAP_COLUMNS = ["expert_a", "expert_b", *TENSOR_ID, "cosine", "pearson_log", "spearman_log",
                             "jaccard_top1", "jaccard_top10", "excluded_zero", "spearman_sampled"]
MASK_STATS_COLUMNS = ["expert", "criterion", "density", *TENSOR_ID, "threshold", "kept_frac", "row_sparsity",
                      "col_sparsity", "mask_rank", "mask_rank_at_least", "mask_effective_rank", "stable_rank",
                      "saliency_kept", "rank_method"]
MASK_OVERLAP_COLUMNS = ["expert_a", "expert_b", "criterion", "density", *TENSOR_ID, "jaccard"]
EDIT_NORMS_COLUMNS = ["expert", *TENSOR_ID, "delta_sq", "base_sq"]
INTERFERENCE_COLUMNS = ["expert_a", "expert_b", *TENSOR_ID, "tv_cosine", "sign_conflict",
                        "curvature_weighted_conflict"]
PREDICTED_LOSS_COLUMNS = ["expert", *TENSOR_ID, "predicted_loss_increase"]
COMPARE_MERGES_COLUMNS = ["method", "expert", "predicted_loss_increase", "predicted_loss_of_base",
                          "relative_loss"]
MOMENT_COMPRESSION_COLUMNS = ["expert", *TENSOR_ID, "rank", "rel_error_v", "rel_error_weights", "bytes_full",
                              "bytes_compressed"]
GRAFT_SWEEP_COLUMNS = ["expert", "criterion", "density", "capability", "score"]
FFG_VS_MAGNITUDE_COLUMNS = ["expert", "capability", "density", "fisher", "magnitude", "fisher_ge_magnitude"]
POOLED_MOMENTS_COLUMNS = ["expert", "name", "layer", "role", "row_block", "col_block", "log10_v", "mask_frac"]
HISTOGRAM_VALUE_COLUMNS = ["bin_left", "bin_right", "count"]

# Columns that identify *what* a row is about rather than measure it. Numeric ones
# must be listed, or aggregate() would average them.
_NUMERIC_IDENTITY = {"layer", "numel", "density", "rank", "row_block", "col_block", "bin_left", "bin_right"}
# Per-tensor descriptors: dropped when tensors are pooled (grouping by them would
# split a layer into "exact" and "randomized" rows, for instance).
_PER_TENSOR = {"name", "layer", "role", "numel", "rank_method", "sampled", "spearman_sampled",
               "row_block", "col_block"}
# Metrics that add up over tensors instead of averaging.
ADDITIVE_METRICS = ("predicted_loss_increase", "bytes_full", "bytes_compressed", "count", "excluded_zero",
                    "delta_sq", "base_sq")
# Metrics defined over a tensor's support (entries not zero in both experts):
# pooled with weight numel - excluded_zero, so the never-seen rows of an embedding
# do not weigh in a statistic that left them out.
SUPPORT_METRICS = ("pearson_log", "spearman_log", "jaccard_top1", "jaccard_top10")


def metric_weights(df: pd.DataFrame, metric: str, weight: str | None = "numel"):
    """The weights a metric pools with: the ``weight`` column, except that a
    support metric of a frame with ``excluded_zero`` is weighted by the entries it
    was computed on (``numel - excluded_zero``). None for equal weights.

    Examples
    --------
    >>> df = pd.DataFrame({"numel": [100, 10], "excluded_zero": [98, 0]})
    >>> metric_weights(df, "jaccard_top10").tolist(), metric_weights(df, "cosine").tolist()
    ([2.0, 10.0], [100.0, 10.0])
    """
    if weight is None:
        return None
    w = df[weight].to_numpy(dtype="float64")
    if weight == "numel" and metric in SUPPORT_METRICS and "excluded_zero" in df.columns:
        w = w - df["excluded_zero"].to_numpy(dtype="float64")
    return w


def frame(rows: list[dict], columns: Sequence[str]) -> pd.DataFrame:
    """A DataFrame with exactly ``columns`` (also when empty); ``layer`` as Int64."""
    df = pd.DataFrame(rows, columns=list(columns))
    if "layer" in df.columns:
        df["layer"] = df["layer"].astype("Int64")
    return df


def tensor_id(g) -> dict:
    """The identity columns of one tensor group."""
    return {"name": g.name, "layer": g.layer, "role": g.role, "numel": _numel(g)}


def _numel(g) -> int:
    for ts in (g.moments, g.experts, [g.base] if g.base is not None else None):
        if ts:
            return int(ts[0].numel())
    raise CurvlensError(f"{g.name}: the group holds no tensor")  # pragma: no cover


def floating_names(experts: Experts, names: Sequence[str] | None = None) -> list[str]:
    """Floating-point parameter names (what moments and masks exist for), checked."""
    need_experts(experts, "this analysis")
    if names is None:
        return experts.tensor_names(floating_only=True)
    if isinstance(names, str):
        names = [names]
    names = list(names)
    ref = experts.reference
    unknown = [n for n in names if n not in ref]
    if unknown:
        raise CurvlensError(f"names: unknown tensor name(s) {unknown[:5]}; "
                            f"the models have {len(ref)} tensors (see Experts.tensor_names())")
    return [n for n in names if ref.dtype(n).is_floating_point]


def need_experts(experts: object, what: str) -> None:
    """An analysis gets an :class:`Experts`, not a path or a list of them."""
    if not isinstance(experts, Experts):
        raise CurvlensError(f"{what} takes an Experts (e.g. Experts.from_dirs(base, [dirs])); "
                            f"got a {type(experts).__name__}")


def need_moments(experts: Experts, what: str) -> None:
    need_experts(experts, what)
    if not experts.has_moments:
        lacking = [e.name for e in experts.experts if e.moments is None]
        raise CurvlensError(f"{what} needs second moments; expert(s) {lacking} have none "
                            "(open them with moments=True)")


def need_base(experts: Experts, what: str) -> None:
    need_experts(experts, what)
    if experts.base is None:
        raise CurvlensError(f"{what} needs a base model (task vectors); the Experts have none")


def resolve_pairs(names: Sequence[str], pairs: Iterable[Sequence[str]] | None,
                  param: str = "pairs") -> list[tuple[str, str]]:
    """Validated ``(a, b)`` pairs of distinct known names; default all unordered pairs."""
    names = list(names)
    if pairs is None:
        return list(itertools.combinations(names, 2))
    out = []
    for p in pairs:
        if isinstance(p, str) or len(p) != 2:
            raise CurvlensError(f"{param}: each pair must be two expert names; got {p!r}")
        a, b = p
        for x in (a, b):
            if x not in names:
                raise CurvlensError(f"{param}: unknown expert {x!r} in pair {tuple(p)}; known: {names}")
        if a == b:
            raise CurvlensError(f"{param}: a pair needs two different experts; got {tuple(p)}")
        out.append((a, b))
    return out


def check_densities(densities, param: str = "densities", allow_one: bool = True) -> list[float]:
    """Sorted unique densities in (0, 1] (a scalar is one density)."""
    if isinstance(densities, (int, float)) and not isinstance(densities, bool):
        densities = [densities]
    if isinstance(densities, (str, bytes)) or not isinstance(densities, Iterable):
        raise CurvlensError(f"{param} must be numbers in (0, 1]; got {densities!r}")
    ds = [real_arg(f"{param}: every density", d, lo=0.0, lo_open=True, hi=1.0, hi_open=not allow_one)
          for d in densities]
    nonempty_arg(param, ds, "density in (0, 1]")
    return sorted(set(ds))


def check_criteria(criteria) -> list[str]:
    from curvlens.passes.thresholds import CRITERIA

    if isinstance(criteria, str):
        criteria = [criteria]
    criteria = list(dict.fromkeys(criteria))
    if not criteria:
        raise CurvlensError(f"criteria is empty; expected some of {CRITERIA}")
    for c in criteria:
        if c not in CRITERIA:
            raise CurvlensError(f"criterion={c!r} is not valid; expected one of {', '.join(map(repr, CRITERIA))}")
    return criteria


def per_expert(value, experts: Experts, param: str) -> list:
    """A scalar, a sequence (one per expert) or a mapping expert -> value, as a list."""
    n = len(experts)
    if isinstance(value, Mapping):
        missing = [e for e in experts.names if e not in value]
        extra = [k for k in value if k not in experts.names]
        if missing or extra:
            raise CurvlensError(f"{param}: the mapping must have one entry per expert {experts.names}; "
                                f"missing {missing}, unknown {extra}")
        return [value[e] for e in experts.names]
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise CurvlensError(f"{param} has {len(value)} entries but there are {n} experts {experts.names}")
        return list(value)
    return [value] * n


def open_merged(merged, experts: Experts, label: str = "merged") -> Checkpoint:
    """A merged model as a Checkpoint: from a Checkpoint, a path, a state dict or a
    MergeResult (its ``.checkpoint``), checked to hold every floating tensor of the
    experts with the same shape (headers only)."""
    ckpt = getattr(merged, "checkpoint", merged)
    try:
        ckpt = Checkpoint.open(ckpt)
    except CurvlensError as err:
        raise CurvlensError(f"merged model {label!r}: {err}") from err
    except TypeError as err:
        raise CurvlensError(f"merged model {label!r} is a {type(merged).__name__}; expected a Checkpoint, "
                            "a path, a state dict or a MergeResult") from err
    ref = experts.reference
    problems = []
    for n in experts.tensor_names(floating_only=True):
        if n not in ckpt:
            problems.append(f"lacks {n}")
        elif ckpt.shape(n) != ref.shape(n):
            problems.append(f"{n} has shape {tuple(ckpt.shape(n))}, expected {tuple(ref.shape(n))}")
    if problems:
        more = f" ... ({len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CurvlensError(f"merged model {label!r} ({ckpt.label}) does not match the experts: "
                            + "; ".join(problems[:5]) + more)
    return ckpt


def read_merged(ckpt: Checkpoint, name: str, device, label: str) -> torch.Tensor:
    try:
        t = ckpt[name]
    except CurvlensError as err:
        raise CurvlensError(f"merged model {label!r}: {err}") from err
    return t.to(device).float()


def with_context(err: CurvlensError, *parts: str) -> CurvlensError:
    return CurvlensError(", ".join(parts) + f": {err}")


# ------------------------------------------------------------------- aggregate
def pool(metric: str, values, weights=None) -> float:
    """How one metric pools over tensors (the rule of :func:`aggregate`, for one
    group): additive metrics (``predicted_loss_increase``, byte counts, histogram
    counts) sum, every other metric is the ``weights``-weighted mean. Undefined
    (non-finite) values and non-positive weights are left out; NaN when nothing is
    left. Views call this for each heatmap or pair-matrix cell.

    Examples
    --------
    >>> pool("kept_frac", [0.5, 1.0], [3, 1]), pool("predicted_loss_increase", [0.5, 1.0], [3, 1])
    (0.625, 1.5)
    """
    values = np.asarray(values, dtype="float64")
    w = np.ones_like(values) if weights is None else np.asarray(weights, dtype="float64")
    ok = np.isfinite(values) & np.isfinite(w) & (w > 0)
    if not ok.any():
        return float("nan")
    if metric in ADDITIVE_METRICS:
        return float(np.sum(values[ok]))
    return float(np.sum(values[ok] * w[ok]) / np.sum(w[ok]))


def aggregate(df: pd.DataFrame, by: Sequence[str] = ("layer", "role"), metrics: Sequence[str] | None = None,
              weight: str | None = "numel") -> pd.DataFrame:
    """Pool a per-tensor analysis frame into layer-, role- or model-level numbers.

    Rows are grouped by the frame's *identity columns* plus ``by``: the identity
    columns are every column that is neither a metric nor a per-tensor descriptor
    (``name, layer, role, numel, rank_method, sampled, spearman_sampled, row_block,
    col_block``), e.g. ``expert_a, expert_b`` for :func:`curvature_overlap`,
    ``expert, criterion, density`` for :func:`mask_stats`, ``expert`` (and
    ``bias_corrected``) for :func:`curvature_stats`.

    Each metric becomes the ``weight``-weighted mean over the group's tensors
    (:func:`metric_weights`: a curvature-overlap statistic is weighted by the
    entries it was computed on), skipping NaN (so a statistic undefined for 1-D tensors, like ``mask_rank``,
    averages over the matrices only), except the additive metrics
    (``predicted_loss_increase, bytes_full, bytes_compressed, count,
    excluded_zero``), which are summed. Numel-weighting makes a model-level ``kept_frac`` the model's realised
    density and a model-level ``jaccard`` an entry-weighted agreement.

    Parameters
    ----------
    df : pandas.DataFrame
        A frame returned by one of the analyses.
    by : sequence of str
        Extra grouping columns: ``("layer", "role")``, ``("layer",)``, ``("role",)``
        or ``()`` for model level. ``layer`` NA (embeddings, final norm, head) is
        kept as its own group.
    metrics : sequence of str, optional
        Columns to pool. Default: every numeric, non-bool column that is not an
        identity column (``layer, numel, density, rank, row_block, col_block,
        bin_left, bin_right``) or the weight.
    weight : str or None
        Weight column (default ``numel``); None for a plain mean.

    Returns
    -------
    pandas.DataFrame
        ``[*identity, *by, numel, *metrics]`` (``numel`` summed over the group,
        present when the frame has it), one row per group, in order of first
        appearance (model order).

    Examples
    --------
    >>> import pandas as pd
    >>> df = pd.DataFrame({"expert_a": ["a", "a"], "expert_b": ["b", "b"], "name": ["x", "y"],
    ...                    "layer": pd.array([0, 0], dtype="Int64"), "role": ["q", "k"],
    ...                    "numel": [3, 1], "cosine": [1.0, 0.0]})
    >>> aggregate(df, by=("layer",))
      expert_a expert_b  layer  numel  cosine
    0        a        b      0      4    0.75
    """
    if not isinstance(df, pd.DataFrame):
        raise CurvlensError(f"aggregate expects a pandas DataFrame; got {type(df).__name__}")
    if isinstance(by, str):
        by = (by,)
    by = list(by)
    missing = [c for c in by if c not in df.columns]
    if missing:
        raise CurvlensError(f"by: column(s) {missing} not in the frame; it has {list(df.columns)}")
    if weight is not None and weight not in df.columns:
        raise CurvlensError(f"weight={weight!r} is not a column of the frame; it has {list(df.columns)}")
    if metrics is None:
        metrics = [c for c in df.columns
                   if c not in _NUMERIC_IDENTITY and c not in by and c != weight
                   and pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]
    else:
        metrics = list(metrics)
        bad = [c for c in metrics if c not in df.columns or not pd.api.types.is_numeric_dtype(df[c])]
        if bad:
            raise CurvlensError(f"metrics: {bad} are not numeric columns of the frame; it has {list(df.columns)}")
    keys = [c for c in df.columns
            if c not in metrics and c not in _PER_TENSOR and c != weight and c not in by] + by
    df = df.reset_index(drop=True)
    w = df[weight].astype("float64") if weight is not None else pd.Series(1.0, index=df.index)
    if keys:
        grouper = [df[k] for k in keys]
        group = lambda s: s.groupby(grouper, sort=False, dropna=False).sum()  # noqa: E731
    else:
        group = lambda s: s.groupby(np.zeros(len(s), dtype=int), sort=False).sum()  # noqa: E731
    out = {}
    if "numel" in df.columns:
        out["numel"] = group(df["numel"].astype("int64"))
    for m in metrics:
        x = df[m].astype("float64")
        ok = x.notna()
        if m in ADDITIVE_METRICS:
            # a sum over no defined value is NaN, not 0
            out[m] = group(x.fillna(0.0)).where(group(ok.astype("int64")) > 0)
        else:
            wm = (w if m not in SUPPORT_METRICS or weight is None
                  else pd.Series(metric_weights(df, m, weight), index=df.index)).where(ok, 0.0)
            num, den = group((x.fillna(0.0) * wm)), group(wm)
            out[m] = (num / den).where(den > 0)
    res = pd.DataFrame(out)
    if keys:
        res = res.reset_index()
        res.columns = keys + list(out)
    else:
        res = res.reset_index(drop=True)
    if "layer" in res.columns:
        res["layer"] = res["layer"].astype("Int64")
    return res


def nan_if_none(x) -> float:
    return math.nan if x is None else float(x)
