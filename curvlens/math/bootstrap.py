"""Intervals and three-way decisions: the arithmetic behind every verdict.

A claim is decided from a statistic whose uncertainty comes from resampling
(evaluation items, tensors, merges, seeds). These pure functions turn resampled
values into a percentile interval and decide a comparison only when the whole
interval lies on one side: ``"yes"``, ``"no"``, or ``"undecided"``.

Numbers in, numbers out (numpy arrays); nothing here knows about models.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

from curvlens.errors import CurvlensError

#: Coverage of every interval a verdict uses.
LEVEL = 0.95
#: Resamples drawn by default (the percentile ends of a 95% interval move by about
#: 0.01 of the spread between two runs of 2000).
N_RESAMPLES = 2000

YES, NO, UNDECIDED = "yes", "no", "undecided"


def resample_indices(n: int, n_resamples: int = N_RESAMPLES, seed: int = 0) -> np.ndarray:
    """``(n_resamples, n)`` indices drawn with replacement from ``range(n)``.

    Row 0 is the identity (the sample itself), so a statistic's row 0 is its point
    estimate and rows 1.. are the resamples.

    Examples
    --------
    >>> idx = resample_indices(4, 3, seed=1)
    >>> idx.shape, idx[0].tolist()
    ((4, 4), [0, 1, 2, 3])
    """
    if n < 1:
        raise CurvlensError(f"resample_indices: n = {n}; expected at least one item to resample")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_resamples, n))
    return np.concatenate([np.arange(n)[None], draws])


def interval(values, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of resampled ``values`` (NaN ignored).

    Examples
    --------
    >>> interval([1, 2, 3, 4, 5], 0.5)
    (2.0, 4.0)
    """
    v = np.asarray(values, dtype=float).ravel()
    v = v[~np.isnan(v)]
    if v.size == 0:
        return (float("nan"), float("nan"))
    a = (1 - level) / 2
    # rounded outwards: an interval never claims more than the resamples show
    return float(np.quantile(v, a, method="lower")), float(np.quantile(v, 1 - a, method="higher"))


def decide(low: float, high: float, threshold: float = 0.0, *, strict: bool = True) -> str:
    """Is the quantity above ``threshold``? Decided only by the whole interval.

    ``strict``: "above" means ``> threshold`` (else ``>=``).

    Examples
    --------
    >>> decide(0.1, 0.3), decide(-0.2, -0.1), decide(-0.1, 0.2)
    ('yes', 'no', 'undecided')
    >>> decide(0.0, 0.0), decide(0.0, 0.0, strict=False)
    ('no', 'yes')
    """
    if np.isnan(low) or np.isnan(high):
        return UNDECIDED
    above = (lambda x: x > threshold) if strict else (lambda x: x >= threshold)
    if above(low):
        return YES
    if not above(high):
        return NO
    return UNDECIDED


def possible(outcome: str) -> tuple[bool, ...]:
    """The truth values a decided or undecided outcome leaves open."""
    return {YES: (True,), NO: (False,), UNDECIDED: (True, False)}[outcome]


def resolve(options: Sequence[Sequence], rule: Callable[[tuple], str]) -> str | None:
    """The verdict ``rule`` gives for every combination of the components' possible
    values, if they all agree; ``None`` if they do not (the claim is undecided).

    Examples
    --------
    >>> rule = lambda vals: "all" if all(vals) else "some" if any(vals) else "none"
    >>> resolve([(True,), (True,)], rule), resolve([(True,), (False,)], rule)
    ('all', 'some')
    >>> resolve([(True,), (True, False)], rule) is None     # all or some: undecided
    True
    >>> resolve([(True,), (False,), (True, False)], rule)   # some either way
    'some'
    """
    verdicts = {rule(combo) for combo in itertools.product(*options)}
    return verdicts.pop() if len(verdicts) == 1 else None


def spearman_interval(x, y, n_resamples: int = N_RESAMPLES, seed: int = 0,
                      level: float = LEVEL) -> dict[str, float]:
    """Spearman's rho of paired samples with its p-value and a bootstrap interval.

    The p-value is scipy's (two-sided, H0: no monotone association); the interval
    resamples the pairs with replacement (percentile, ``level``).

    Returns
    -------
    dict
        ``rho, p_value, low, high, n``.

    Examples
    --------
    >>> r = spearman_interval([1, 2, 3, 4, 5, 6], [2, 1, 4, 3, 6, 5], n_resamples=200)
    >>> round(r["rho"], 3), r["n"], r["low"] <= r["rho"] <= r["high"]
    (0.829, 6, True)
    """
    from scipy.stats import spearmanr

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = int(x.size)
    nan = float("nan")
    if n < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"rho": nan, "p_value": nan, "low": nan, "high": nan, "n": n}
    res = spearmanr(x, y)
    idx = resample_indices(n, n_resamples, seed)[1:]
    rho_b = rank_corr_rows(x[idx], y[idx])
    low, high = interval(rho_b, level)
    return {"rho": float(res.statistic), "p_value": float(res.pvalue), "low": low, "high": high, "n": n}


def rank_corr_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of every row pair of two ``(m, n)`` arrays (average ranks for
    ties; NaN where a row is constant)."""
    from scipy.stats import rankdata

    rx, ry = rankdata(x, axis=1), rankdata(y, axis=1)
    rx -= rx.mean(1, keepdims=True)
    ry -= ry.mean(1, keepdims=True)
    den = np.sqrt((rx * rx).sum(1) * (ry * ry).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (rx * ry).sum(1) / den, np.nan)
