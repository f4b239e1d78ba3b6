"""Scores resampled over evaluation items: the uncertainty of every score a verdict uses.

A merge table (:meth:`curvlens.zoo.Zoo.score`) or a grafting sweep
(:func:`~curvlens.studies.graft.graft_sweep`) holds, per model and
capability, the result of every held-out prompt (column ``correct``: ``"T"`` /
``"F"`` per prompt, in the evaluation set's fixed order). :class:`ItemBootstrap`
resamples the prompts of each capability with replacement and recomputes every
model's accuracy on the *same* resample: the bootstrap is paired, so the
difference between two models on one capability carries only the noise of the
items on which they differ.

Rows without per-item results fall back to a binomial draw from their accuracy
and ``n`` (unpaired, so wider), and rows with neither keep their one value (no
interval can be had from them; the findings say so).

Several seeds (a ``seed`` column): each seed's items are resampled on their own
(their evaluation sets differ), and a verdict pools the resamples of every seed,
so its interval spans both the items and the seeds.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from curvlens.errors import CurvlensError
from curvlens.math.bootstrap import N_RESAMPLES, resample_indices


def item_matrix(correct: str, where: str = "correct") -> np.ndarray:
    """``"TFT"`` -> ``[True, False, True]``.

    Examples
    --------
    >>> item_matrix("TTF").tolist()
    [True, True, False]
    """
    if not isinstance(correct, str) or not correct or set(correct) - {"T", "F"}:
        raise CurvlensError(f"{where}: per-item results {str(correct)[:20]!r}; expected a non-empty string of "
                            "'T' (right) and 'F' (wrong), one letter per prompt")
    return np.frombuffer(correct.encode(), dtype=np.uint8) == ord("T")


def seeds_of(df: pd.DataFrame | None) -> list:
    """The seeds a frame holds (``[None]`` without a ``seed`` column)."""
    if df is None or "seed" not in df.columns:
        return [None]
    return list(dict.fromkeys(df["seed"]))


def of_seed(df: pd.DataFrame | None, seed) -> pd.DataFrame | None:
    """The rows of one seed (all rows when ``seed`` is None)."""
    if df is None or seed is None or "seed" not in df.columns:
        return df
    return df[df["seed"] == seed]


class ItemBootstrap:
    """Paired resamples of evaluation items, shared by every table scored on them.

    Parameters
    ----------
    n_resamples : int
        Resamples per stratum (capability x seed). Every array this returns has
        ``n_resamples + 1`` entries: the observed value first, then the resamples.
    seed : int
        Seeds the draws: the same frames and seed give the same intervals.

    Examples
    --------
    >>> t = pd.DataFrame({"model": ["a", "b"], "capability": "x", "accuracy": [0.5, 1.0],
    ...                   "correct": ["TF", "TT"]})
    >>> boot = ItemBootstrap(200)
    >>> a, b = boot.scores(t, ("model",)).values()
    >>> float(a[0]), float(b[0]), bool((b >= a).all())     # paired: b is right wherever a is
    (0.5, 1.0, True)
    """

    def __init__(self, n_resamples: int = N_RESAMPLES, seed: int = 0):
        self.n_resamples = int(n_resamples)
        self.seed = int(seed)
        self._idx: dict = {}

    def indices(self, stratum: tuple, n: int) -> np.ndarray:
        """The ``(n_resamples + 1, n)`` item indices of one stratum (row 0: identity)."""
        key = (stratum, n)
        if key not in self._idx:
            h = int.from_bytes(hashlib.sha256(repr((self.seed, key)).encode()).digest()[:8], "little")
            self._idx[key] = resample_indices(n, self.n_resamples, seed=h)
        return self._idx[key]

    def _draws(self, stratum: tuple, p: float, n: int) -> np.ndarray:
        h = int.from_bytes(hashlib.sha256(repr((self.seed, "binomial", stratum, p, n)).encode()).digest()[:8],
                           "little")
        rng = np.random.default_rng(h)
        return np.concatenate([[p], rng.binomial(n, p, self.n_resamples) / n])

    def row(self, correct, accuracy: float, n, stratum: tuple, where: str = "row") -> np.ndarray:
        """One score, resampled: from its items, else binomially from ``n``, else fixed."""
        if isinstance(correct, str):
            right = item_matrix(correct, where)
            return right[self.indices(stratum, right.size)].mean(axis=1)
        if n is not None and not pd.isna(n) and int(n) > 0:
            return self._draws(stratum, float(accuracy), int(n))
        return np.full(self.n_resamples + 1, float(accuracy))

    def scores(self, table: pd.DataFrame, keys: Sequence[str], value: str = "accuracy") -> dict[tuple, np.ndarray]:
        """``{(key values..., capability): resampled scores}`` for every row of ``table``.

        Rows of one capability (and seed) share their resample (paired).
        """
        missing = {*keys, "capability", value} - set(table.columns)
        if missing:
            raise CurvlensError(f"scores to resample lack column(s) {sorted(missing)}")
        out = {}
        has = {c: c in table.columns for c in ("correct", "n", "seed")}
        for r in table.itertuples(index=False):
            d = r._asdict()
            ident = tuple(d[k] for k in keys) + (d["capability"],)
            stratum = (d["seed"] if has["seed"] else None, d["capability"])
            out[ident] = self.row(d["correct"] if has["correct"] else None, d[value],
                                  d["n"] if has["n"] else None, stratum, where=f"{ident}")
        return out

    def exact(self, table: pd.DataFrame) -> bool:
        """Whether every row has per-item results (else some intervals are binomial
        approximations or missing)."""
        return "correct" in table.columns and bool(table["correct"].map(lambda c: isinstance(c, str)).all())


def pool_resamples(per_seed: Iterable[np.ndarray]) -> np.ndarray:
    """The resamples (row 0 of each dropped) of every seed, pooled into one sample."""
    parts = [np.asarray(a, dtype=float)[1:] for a in per_seed]
    return np.concatenate(parts) if parts else np.array([])
