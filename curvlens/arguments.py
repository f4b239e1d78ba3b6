"""The studies' arguments, checked where they enter: one validator per kind.

Sweeps, soups, fronts, grafting sweeps, findings and the Fisher take numbers,
counts, bounds, weights, callables, names and frames from a user. Each kind is
checked here, once, for every function that takes it: its type (a bool is not
a number, a string is not a weight), finiteness and range, with a
:class:`~curvlens.errors.CurvlensError` that names the argument, what was
expected and what came. (Merge method parameters have their own schema:
:mod:`curvlens.math.methods.params`.)

Examples
--------
>>> real_arg("lambda", "0.5")
Traceback (most recent call last):
...
curvlens.errors.CurvlensError: lambda must be a real number; got '0.5'
>>> bounds_arg("bounds", (0, float("inf")))
Traceback (most recent call last):
...
curvlens.errors.CurvlensError: bounds must be finite; got (0, inf)
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from curvlens.errors import CurvlensError

__all__ = ["real_arg", "int_arg", "bool_arg", "bounds_arg", "weights_arg", "callable_arg", "names_arg",
           "finite_array", "frame_arg", "nonempty_arg"]


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def real_arg(name: str, value: Any, *, lo: float | None = None, hi: float | None = None,
             lo_open: bool = False, hi_open: bool = False) -> float:
    """A finite real number (not a bool, not a string) in the given range.

    Examples
    --------
    >>> real_arg("density", 0.3, lo=0, lo_open=True, hi=1)
    0.3
    >>> real_arg("density", 0, lo=0, lo_open=True, hi=1)
    Traceback (most recent call last):
    ...
    curvlens.errors.CurvlensError: density must be in (0, 1]; got 0
    """
    if not _is_real(value):
        raise CurvlensError(f"{name} must be a real number; got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise CurvlensError(f"{name} must be finite; got {value!r}")
    low_bad = lo is not None and (x < lo or (lo_open and x == lo))
    high_bad = hi is not None and (x > hi or (hi_open and x == hi))
    if low_bad or high_bad:
        left = "-inf" if lo is None else f"{lo:g}"
        right = "inf" if hi is None else f"{hi:g}"
        interval = f"{'(' if lo_open or lo is None else '['}{left}, {right}{')' if hi_open or hi is None else ']'}"
        raise CurvlensError(f"{name} must be in {interval}; got {value!r}")
    return x


def int_arg(name: str, value: Any, *, lo: int | None = None, allow_none: bool = False) -> int | None:
    """An int (not a bool, not a float) ``>= lo``; None when ``allow_none``.

    Examples
    --------
    >>> int_arg("n_samples", 3, lo=0)
    3
    >>> int_arg("n_samples", 2.5, lo=0)
    Traceback (most recent call last):
    ...
    curvlens.errors.CurvlensError: n_samples must be an int >= 0; got 2.5
    """
    if value is None and allow_none:
        return None
    ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if not ok or (lo is not None and value < lo):
        bound = f" >= {lo}" if lo is not None else ""
        raise CurvlensError(f"{name} must be an int{bound}{' or None' if allow_none else ''}; got {value!r}")
    return int(value)


def bool_arg(name: str, value: Any) -> bool:
    """True or False, nothing that merely converts to one."""
    if not isinstance(value, (bool, np.bool_)):
        raise CurvlensError(f"{name} must be True or False; got {value!r}")
    return bool(value)


def bounds_arg(name: str, value: Any) -> tuple[float, float]:
    """A ``(low, high)`` pair of finite reals with ``low < high``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise CurvlensError(f"{name} must be a pair (low, high); got {value!r}")
    if not all(_is_real(v) for v in value):
        raise CurvlensError(f"{name} must be two real numbers; got {value!r}")
    low, high = (float(v) for v in value)
    if not (math.isfinite(low) and math.isfinite(high)):
        raise CurvlensError(f"{name} must be finite; got {tuple(value)!r}")
    if not low < high:
        raise CurvlensError(f"{name} must satisfy low < high; got {tuple(value)!r}")
    return low, high


def weights_arg(name: str, value: Any, n: int) -> list[float]:
    """``n`` finite weights >= 0, not all 0.

    Examples
    --------
    >>> weights_arg("weights", [1, 2.5], 2)
    [1.0, 2.5]
    >>> weights_arg("weights", [1, float("inf")], 2)
    Traceback (most recent call last):
    ...
    curvlens.errors.CurvlensError: weights[1] must be finite; got inf
    """
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (Sequence, np.ndarray)):
        raise CurvlensError(f"{name} must be a list of {n} numbers; got {value!r}")
    if len(value) != n:
        raise CurvlensError(f"{name} has {len(value)} entries but there are {n} experts")
    out = [real_arg(f"{name}[{i}]", w, lo=0.0) for i, w in enumerate(value)]
    if not sum(out) > 0:
        raise CurvlensError(f"{name} must not be all 0; got {out}")
    return out


def callable_arg(name: str, value: Any, what: str) -> Any:
    """A callable; ``what`` says what it is called with and returns."""
    if not callable(value):
        raise CurvlensError(f"{name} must be a callable {what}; got {value!r}")
    return value


def names_arg(name: str, value: Any, allowed: Sequence[str] | None = None) -> list[str]:
    """A non-empty list of distinct strings (each one of ``allowed`` when given)."""
    if isinstance(value, str) or not isinstance(value, Sequence) or not value:
        raise CurvlensError(f"{name} must be a non-empty list of names; got {value!r}")
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise CurvlensError(f"{name} must hold names (str); got {bad[:3]}")
    if len(set(value)) != len(value):
        raise CurvlensError(f"{name} names {sorted({v for v in value if list(value).count(v) > 1})} twice")
    if allowed is not None:
        unknown = [v for v in value if v not in allowed]
        if unknown:
            raise CurvlensError(f"{name}: {unknown} are not among {list(allowed)}")
    return list(value)


def nonempty_arg(name: str, value: Sequence, what: str) -> Sequence:
    """``value`` unless it is empty (an empty grid, an empty list of densities)."""
    if len(value) == 0:
        raise CurvlensError(f"{name} is empty; expected at least one {what}")
    return value


def finite_array(name: str, value: Any, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """``value`` as a float64 array of ``shape``, every entry finite."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise CurvlensError(f"{name} must be an array of numbers ({err})") from None
    if shape is not None and arr.shape != tuple(shape):
        raise CurvlensError(f"{name} must have shape {tuple(shape)}; got {arr.shape}")
    bad = int((~np.isfinite(arr)).sum())
    if bad:
        raise CurvlensError(f"{name} has {bad} non-finite entr{'y' if bad == 1 else 'ies'} of {arr.size}; "
                            "expected finite numbers (e.g. Gram matrices of finite moments and weights)")
    return arr


def frame_arg(name: str, value: Any, columns: Sequence[str]):
    """A DataFrame with ``columns``, or None when ``value`` is None or empty
    (an analysis that had nothing to report: its claim is then not measured)."""
    if value is None:
        return None
    if not isinstance(value, pd.DataFrame):
        raise CurvlensError(f"{name} must be a DataFrame; got a {type(value).__name__}")
    if value.empty:
        return None
    missing = [c for c in columns if c not in value.columns]
    if missing:
        raise CurvlensError(f"{name} lacks column(s) {missing}; got {list(value.columns)}")
    return value
