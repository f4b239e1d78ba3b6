"""The input checks and small numeric helpers every math module shares: one copy.

* :func:`as_tensor` (a tensor, or a numpy array), :func:`float_tensor` (a
  floating-point tensor), :func:`check_same_shape`, :func:`check_nonempty`;
* :func:`moment_problems` / :func:`check_moments`: second moments must be finite
  and non-negative (one min/max reduction decides, NaN propagating through it);
* float64 reductions in chunks (:func:`chunks`), bool tensors as bytes
  (:func:`as_bytes`), ratios and correlations guarded against zero denominators.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch

from curvlens.errors import CurvlensError

# Elements per float64 chunk in reductions: 4M entries = 32 MB per float64 copy.
CHUNK = 1 << 22


def as_tensor(name: str, x) -> torch.Tensor:
    """Accept a torch tensor (or a numpy array, for notebook convenience)."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        try:
            return torch.from_numpy(x)
        except TypeError as err:
            raise CurvlensError(f"{name}: numpy dtype {x.dtype} has no torch equivalent") from err
    raise CurvlensError(f"{name} must be a torch.Tensor; got {type(x).__name__}")


def check_same_shape(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    """Raise a CurvlensError naming every tensor's shape if they differ."""
    shapes = [tuple(t.shape) for t in tensors]
    if any(s != shapes[0] for s in shapes[1:]):
        got = ", ".join(f"{n} {s}" for n, s in zip(names, shapes))
        raise CurvlensError(f"{', '.join(names)} must have the same shape; got {got}")


def check_nonempty(name: str, t: torch.Tensor) -> None:
    if t.numel() == 0:
        raise CurvlensError(f"{name} is empty (shape {tuple(t.shape)}); expected at least one entry")


def _wide(t: torch.Tensor) -> torch.Tensor:
    """float64 copy of ``t`` on its device (MPS has no float64: fall back to CPU)."""
    if t.device.type == "mps":
        t = t.cpu()
    return as_bytes(t).to(torch.float64)


#: Dtypes whose every value is an fp32 value: an fp32 operation may take them as they are.
_IN_FP32 = (torch.float32, torch.bfloat16, torch.float16)


def fp32_operand(t: torch.Tensor) -> torch.Tensor:
    """``t`` as the other operand of an in-place fp32 operation, giving the bits
    of the same operation on ``t.float()``: bf16/fp16/fp32 as they are (widened
    exactly inside the operation), anything else (fp64) rounded to fp32 first."""
    return t if t.dtype in _IN_FP32 else t.float()


def fp32_task_vector(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x.float() - b.float()`` bit for bit, in one fp32 allocation; never writes
    into ``x`` or ``b``.

    Examples
    --------
    >>> x = torch.tensor([1.5, 2.0], dtype=torch.bfloat16)
    >>> fp32_task_vector(x, torch.tensor([1.0, 3.0]))
    tensor([ 0.5000, -1.0000])
    """
    from curvlens.math import native  # the kernels' module imports nothing of curvlens.math

    if x.shape == b.shape and native.available(x, b):
        # one pass (widen both, subtract) instead of a conversion pass and a
        # subtraction pass over a fresh fp32 copy: 1.3 ms against 1.7 ms for a
        # 2816 x 1024 bf16 pair, one thread (the analyses' task vectors)
        out = torch.empty(x.shape, dtype=torch.float32)
        native.lib().cl_sub_widened(x.data_ptr(), native.dtype_code(x), b.data_ptr(), native.dtype_code(b),
                                    x.numel(), out.data_ptr())
        return out
    tau = x.float()
    if tau is x:  # an fp32 input: never write into the tensor read
        tau = x.clone()
    return tau.sub_(fp32_operand(b))


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A bool tensor viewed as uint8 (no copy); other tensors unchanged.

    torch's CPU kernels for bool are scalar loops: converting a bool tensor to
    float, or reducing it along a dimension, runs ~10x (conversion) to ~100x
    (``any(dim)``) slower than the same operation on its uint8 view.
    """
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def flat(t: torch.Tensor) -> torch.Tensor:
    # reshape, not view: a non-contiguous input (a transposed weight) is copied once.
    return t.reshape(-1)


def chunks(*tensors: torch.Tensor, chunk: int = CHUNK) -> Iterator[tuple[torch.Tensor, ...]]:
    """Yield aligned float64 slices of the flattened tensors, ``chunk`` entries each.

    Chunking keeps float64 accuracy without a full float64 copy of a huge tensor.
    A float64 input is not copied, so the chunks alias it: never modify them in place.
    """
    flats = [flat(t) for t in tensors]
    n = flats[0].numel()
    for start in range(0, n, chunk):
        yield tuple(_wide(f[start:start + chunk]) for f in flats)


def float_tensor(param: str, x: object) -> torch.Tensor:
    """``x`` if it is a floating-point torch tensor, else a CurvlensError naming ``param``."""
    if not isinstance(x, torch.Tensor):
        raise CurvlensError(f"{param} must be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise CurvlensError(f"{param} must be a floating-point tensor; got dtype {x.dtype}")
    return x


def moment_problems(v: torch.Tensor) -> str | None:
    """What is wrong with second moments ``v`` (NaN, Inf or negative entries,
    counted), or None. One min/max reduction when nothing is (NaN propagates)."""
    if v.numel() == 0:
        return None
    lo, hi = torch.aminmax(v)
    if float(lo) >= 0.0 and math.isfinite(float(hi)):
        return None
    return _describe_bad_moments(v)


def moments_max(name: str, v: torch.Tensor) -> float:
    """The largest of the second moments ``v`` (non-empty), checked on the way: a
    CurvlensError naming ``name`` if any is NaN, Inf or negative."""
    lo, hi = (float(x) for x in torch.aminmax(v))
    if not (lo >= 0.0 and math.isfinite(hi)):
        raise CurvlensError(f"{name}: {_describe_bad_moments(v)}")
    return hi


def _describe_bad_moments(v: torch.Tensor) -> str:
    counts = {"NaN": int(torch.isnan(v).sum()), "Inf": int(torch.isinf(v).sum()), "negative": int((v < 0).sum())}
    found = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    return f"{found} second moment value(s); expected finite, non-negative values"


def weight_problems(t: torch.Tensor) -> str | None:
    """What is wrong with weights ``t`` (NaN or Inf entries, counted), or None;
    integer tensors have nothing to check. One min/max reduction when nothing is."""
    if not t.is_floating_point() or t.numel() == 0:
        return None
    lo, hi = torch.aminmax(t)
    if math.isfinite(float(lo)) and math.isfinite(float(hi)):
        return None
    counts = {"NaN": int(torch.isnan(t).sum()), "Inf": int(torch.isinf(t).sum())}
    found = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
    return f"{found} weight value(s); expected finite weights"


def check_moments(name: str, v: torch.Tensor) -> torch.Tensor:
    """``v`` if its second moments are finite and non-negative, else a CurvlensError
    naming ``name`` and counting the bad entries."""
    problem = moment_problems(v)
    if problem is not None:
        raise CurvlensError(f"{name}: {problem}")
    return v


def ratio(num: float, den: float) -> float:
    """num / den, or nan when the denominator is zero (degenerate input)."""
    return num / den if den > 0 else math.nan


def corr(sxy: float, sxx: float, syy: float) -> float:
    """Correlation from centred sums, clamped to [-1, 1]; nan for a constant input.

    ``sxy / sqrt(sxx * syy)`` (one square root of the product) makes identical inputs
    give exactly 1.0, since IEEE sqrt(x*x) == x.
    """
    den = sxx * syy
    if not den > 0:
        return math.nan
    return max(-1.0, min(1.0, sxy / math.sqrt(den)))


def pct_key(prefix: str, frac: float) -> str:
    """Key for a fraction as a percentage: 0.01 -> 'prefix1', 0.001 -> 'prefix0.1'."""
    return f"{prefix}{round(100 * frac, 10):g}"


def equal_buffer(name: str, base: torch.Tensor | None, experts: Sequence[torch.Tensor],
                 names: Sequence[str]) -> torch.Tensor:
    """The one value of an integer or bool tensor (a buffer: position ids, a step
    count) that every model holds; a CurvlensError naming who differs otherwise.

    Such a tensor cannot be averaged, and taking one model's silently would hide
    that the models disagree: the caller says whose to take with a ``tensors``
    rule (the report's ``source`` then names it).

    Examples
    --------
    >>> equal_buffer("ids", None, [torch.tensor([0, 1]), torch.tensor([0, 1])], ["a", "b"])
    tensor([0, 1])
    >>> equal_buffer("ids", torch.tensor([0, 1]), [torch.tensor([0, 2])], ["a"])
    Traceback (most recent call last):
    ...
    curvlens.errors.CurvlensError: tensor 'ids' (int64) cannot be averaged and the models disagree on it: expert 'a' differs from the base; say whose to take with a tensors rule, e.g. tensors={'ids': 'base'} (YAML: tensors: [{filter: 'name:ids', action: base}])
    """
    models = ([("the base", base)] if base is not None else []) + [(f"expert {n!r}", t) for n, t in zip(names, experts)]
    ref_label, ref = models[0]
    differ = [label for label, t in models[1:] if t.shape != ref.shape or not torch.equal(t.to(ref.device), ref)]
    if differ:
        raise CurvlensError(
            f"tensor {name!r} ({str(ref.dtype).replace('torch.', '')}) cannot be averaged and the models disagree "
            f"on it: {', '.join(differ)} differ{'s' if len(differ) == 1 else ''} from {ref_label}; say whose to "
            f"take with a tensors rule, e.g. tensors={{{name!r}: 'base'}} (YAML: tensors: [{{filter: "
            f"'name:{name}', action: base}}])")
    return ref
