"""How much a rank correlation over a few dozen items can be trusted.

A Spearman correlation over the 21 tensors of a small model, or over a dozen
merges, can be large by chance. :func:`spearman_test` gives it a two-sided
permutation p-value (how often shuffled pairs correlate at least as strongly) and
a bootstrap percentile interval (resampling the items), both reproducible from a
seed. Pure numpy; no scipy.
"""
from __future__ import annotations

import numpy as np

from curvlens.errors import CurvlensError

__all__ = ["rank_corr", "spearman_test"]


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (tied values share the mean of their positions); row-wise for 2-D."""
    if x.ndim == 2:
        return np.stack([_ranks(row) for row in x])
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[np.argsort(x, kind="stable")] = np.arange(x.size, dtype=np.float64)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    if (counts > 1).any():
        ranks = (np.bincount(inv, weights=ranks) / counts)[inv]
    return ranks


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(-1) / den, np.nan)


def rank_corr(x, y) -> float:
    """Spearman rank correlation (Pearson correlation of the average ranks).

    Examples
    --------
    >>> rank_corr([1, 2, 3, 4], [10, 20, 40, 30])
    0.8
    """
    x, y = _pair(x, y)
    return float(_pearson_rows(_ranks(x)[None], _ranks(y)[None])[0])


def _pair(x, y):
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise CurvlensError(f"rank correlation: x has {x.size} items, y has {y.size}")
    ok = np.isfinite(x) & np.isfinite(y)
    return x[ok], y[ok]


def spearman_test(x, y, *, n_perm: int = 10000, n_boot: int = 2000, level: float = 0.95,
                  seed: int = 0) -> dict:
    """Spearman's rho with a permutation p-value and a bootstrap interval.

    Parameters
    ----------
    x, y : array-like
        Paired values; pairs with a non-finite member are left out.
    n_perm : int
        Random permutations of ``y`` for the two-sided p-value
        ``(1 + #{|rho_perm| >= |rho|}) / (1 + n_perm)`` (never 0).
    n_boot : int
        Bootstrap resamples of the pairs for the percentile interval.
    level : float
        Coverage of the interval.
    seed : int

    Returns
    -------
    dict
        ``rho, p, low, high, n`` (NaN rho, p 1 and a NaN interval below 3 pairs
        or for a constant input).

    Examples
    --------
    >>> r = spearman_test(range(20), range(20), n_perm=999, n_boot=200)
    >>> r["rho"], r["p"] <= 0.002, r["low"] > 0.99
    (1.0, True, True)
    """
    if not 0 < level < 1:
        raise CurvlensError(f"spearman_test: level must be in (0, 1); got {level}")
    x, y = _pair(x, y)
    n = x.size
    out = {"rho": float("nan"), "p": 1.0, "low": float("nan"), "high": float("nan"), "n": int(n)}
    if n < 3:
        return out
    rx, ry = _ranks(x), _ranks(y)
    rho = float(_pearson_rows(rx[None], ry[None])[0])
    if not np.isfinite(rho):
        return out
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((n_perm, n)), axis=1)
    null = _pearson_rows(np.broadcast_to(rx, (n_perm, n)), ry[perms])
    p = float((1 + np.sum(np.abs(null) >= abs(rho) - 1e-12)) / (1 + n_perm))
    idx = rng.integers(0, n, size=(n_boot, n))
    boot = _pearson_rows(_ranks(x[idx]), _ranks(y[idx]))
    boot = boot[np.isfinite(boot)]
    a = (1 - level) / 2
    low, high = (np.quantile(boot, [a, 1 - a]) if boot.size else (np.nan, np.nan))
    out.update(rho=rho, p=p, low=float(low), high=float(high))
    return out
