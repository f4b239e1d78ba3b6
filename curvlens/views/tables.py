"""Tables for reading: numbers to a few significant digits.

``df.round(6)`` prints a mean second moment of 4e-7 as ``0.000000`` and
``df.round(1)`` a predicted loss of 3e-8 as ``0.0``: both hide the number.
:func:`significant` formats every float to ``digits`` significant digits,
switching to scientific notation where fixed notation would need more than a few
leading zeros, so a table shows each value's size.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pandas as pd

__all__ = ["common_format", "fmt_pct", "fmt_sig", "significant"]


def fmt_sig(x, digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits (scientific below 1e-3 and from 1e5).

    Examples
    --------
    >>> [fmt_sig(v) for v in (0.91234, 0.0123456, 12.345, 4.2e-7, 0.0, -3.0, 123456.0, float("nan"))]
    ['0.912', '0.0123', '12.3', '4.20e-07', '0', '-3.00', '1.23e+05', '–']
    """
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    x = float(x)
    if not math.isfinite(x):
        return str(x)
    if x == 0:
        return "0"
    a = abs(x)
    if a < 1e-3 or a >= 1e5:
        return f"{x:.{digits - 1}e}"
    decimals = max(0, digits - 1 - math.floor(math.log10(a)))
    return f"{x:.{decimals}f}"


def fmt_pct(x: float) -> str:
    """A fraction as a percentage that never shows a small non-zero value as 0%.

    Examples
    --------
    >>> [fmt_pct(x) for x in (0.472, 0.0526, 0.00026, 0.0)]
    ['47%', '5.3%', '0.026%', '0%']
    """
    p = 100.0 * float(x)
    if p == 0:
        return "0%"
    if abs(p) >= 10:
        return f"{p:.0f}%"
    return f"{p:.2g}%"


def significant(df: pd.DataFrame | pd.Series, digits: int = 3) -> pd.DataFrame:
    """A copy of ``df`` with every float column as text to ``digits`` significant digits.

    Integer, boolean and text columns are kept as they are. For display only: the
    result's numbers are strings.

    Examples
    --------
    >>> significant(pd.DataFrame({"mean v": [4.2e-7, 1.1e-6], "n": [3, 4]}))
         mean v  n
    0  4.20e-07  3
    1  1.10e-06  4
    """
    out = df.to_frame() if isinstance(df, pd.Series) else df.copy()
    for col in out.columns:
        if pd.api.types.is_float_dtype(out[col]):
            out[col] = [fmt_sig(v, digits) for v in out[col]]
    return out


def common_format(values) -> Callable[[float], str]:
    """One format for every value of a panel: the same number of decimals, chosen so
    that the largest shows two significant digits (never a mix of ``0.01`` and
    ``2.7e-03`` in one matrix).

    Examples
    --------
    >>> f = common_format([0.0027, 0.01, 0.03])
    >>> [f(x) for x in (0.0027, 0.01, 0.03)]
    ['0.003', '0.010', '0.030']
    >>> common_format([0.12, 0.9])(0.5)
    '0.50'
    """
    v = np.abs(np.asarray(values, dtype=float))
    v = v[np.isfinite(v) & (v > 0)]
    top = float(v.max()) if v.size else 1.0
    if top >= 1e4 or top < 1e-4:
        return lambda x: "" if not np.isfinite(x) else f"{x:.1e}"
    decimals = max(0, 1 - int(math.floor(math.log10(top))))
    return lambda x: "" if not np.isfinite(x) else f"{x:.{decimals}f}"
