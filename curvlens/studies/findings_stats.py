"""The resampled statistics the findings decide on, one function per claim.

Each returns arrays of ``n_resamples + 1`` values per seed (row 0 the observed
value, then the resamples), so that :mod:`curvlens.studies.findings` can report
the observed numbers, pool the resamples over seeds into an interval, and decide.

* grafting (claim a): per expert and criterion, the step of the lowest swept
  density that keeps :data:`KEEP` of the expert's gain over the base, resampled
  over evaluation items (:class:`~curvlens.studies.item_bootstrap.ItemBootstrap`);
* merges (claim d): per merge, the pooled gain kept, the worst capability's gain
  kept and the mean accuracy, resampled over items (paired across merges);
* masks (claim b) and overlap (claim c): numel-weighted model-level means over
  tensors, resampled over tensors (the same draw for every expert or pair).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from curvlens.errors import CurvlensError
from curvlens.math.bootstrap import interval, resample_indices
from curvlens.passes.analysis_common import metric_weights
from curvlens.studies.gain import gain_kept, pooled_gain, worst_gain
from curvlens.studies.item_bootstrap import ItemBootstrap, of_seed, pool_resamples, seeds_of

#: (a) "keeps the score": at least this share of the expert's gain over the base.
KEEP = 0.9


def lowest_density_steps(sweep: pd.DataFrame, reference: pd.DataFrame, capabilities: Mapping[str, str],
                         boot: ItemBootstrap, expert_label: str = "expert: {}", base_label: str = "base") -> dict:
    """Per seed and expert: the swept densities and, per criterion, the index of the
    lowest density keeping :data:`KEEP` of the gain (``len(densities)``: none does).

    Returns
    -------
    dict
        ``{expert: {"densities": [...], "seeds": {seed: {"fisher": steps,
        "magnitude": steps, "gain": own - base}}}}`` with ``steps`` and ``gain``
        arrays of ``n_resamples + 1``.
    """
    out: dict = {}
    for seed in seeds_of(sweep):
        sw, ref = of_seed(sweep, seed), of_seed(reference, seed)
        graft = boot.scores(sw, ("expert", "criterion", "density"), value="score")
        refs = boot.scores(ref, ("model",)) if ref is not None else {}
        for e, grp in sw.groupby("expert", sort=False):
            cap = capabilities.get(e)
            base = refs.get((base_label, cap))
            own = refs.get((expert_label.format(e), cap))
            if own is None:  # the expert itself, from the sweep's density 1.0
                own = graft.get((e, "fisher", 1.0, cap), graft.get((e, "magnitude", 1.0, cap)))
            if cap is None or base is None or own is None:
                continue
            ds = sorted(d for d in set(grp["density"].astype(float)) if d < 1.0)
            entry = out.setdefault(e, {"densities": ds, "seeds": {}})
            res = {"gain": own - base}
            for c in ("fisher", "magnitude"):
                steps = np.full(own.shape, len(ds), dtype=float)
                for i in reversed(range(len(ds))):
                    g = graft.get((e, c, ds[i], cap))
                    if g is not None:
                        steps = np.where(g - base >= KEEP * (own - base), i, steps)
                res[c] = steps
            entry["seeds"][seed] = res
    return out


def merge_statistics(table: pd.DataFrame, capabilities: Mapping[str, str], labels: Sequence[str],
                     boot: ItemBootstrap, expert_label: str = "expert: {}", base_label: str = "base") -> dict:
    """Per seed and merge label: ``pooled_gain``, ``worst_gain`` and ``mean_accuracy``
    arrays (capabilities on which the expert is not above the base are left out of
    the gains, as :func:`~curvlens.studies.gain.merge_gain` does).

    Returns
    -------
    dict
        ``{seed: {label: {statistic: array}}}`` and, under key ``"left_out"``, the
        capabilities left out of the gains per seed.
    """
    out: dict = {"left_out": {}}
    caps = list(dict.fromkeys(capabilities.values()))
    own_label = {c: expert_label.format(e) for e, c in capabilities.items()}
    for seed in seeds_of(table):
        t = of_seed(table, seed)
        s = boot.scores(t[t["capability"].isin(caps)], ("model",))
        if any((base_label, c) not in s or (own_label[c], c) not in s for c in caps):
            continue
        b = [s[base_label, c] for c in caps]
        e = [s[own_label[c], c] for c in caps]
        use = [i for i, c in enumerate(caps) if e[i][0] > b[i][0]]
        out["left_out"][seed] = [c for i, c in enumerate(caps) if i not in use]
        per = {}
        for label in labels:
            if not all((label, c) in s for c in caps):
                continue
            m = [s[label, c] for c in caps]
            per[label] = {"pooled_gain": pooled_gain([m[i] for i in use], [b[i] for i in use], [e[i] for i in use]),
                          "worst_gain": worst_gain([m[i] for i in use], [b[i] for i in use], [e[i] for i in use]),
                          "mean_accuracy": np.mean(m, axis=0),
                          "gains": {caps[i]: gain_kept(m[i], b[i], e[i]) for i in use}}
        out[seed] = per
    return out


def tensor_counts(n: int, n_resamples: int, seed: int, strata: Sequence | None = None) -> np.ndarray:
    """``(n_resamples + 1, n)``: how often each of ``n`` tensors is drawn per resample
    (row 0: once each). With ``strata`` (a label per tensor) each stratum is
    resampled within itself, so every resample keeps each stratum's size.

    Examples
    --------
    >>> c = tensor_counts(3, 100, 0, strata=["early", "late", "late"])
    >>> c[0].tolist(), bool((c[:, 0] == 1).all()), bool((c[:, 1:].sum(1) == 2).all())
    ([1.0, 1.0, 1.0], True, True)
    """
    labels = np.zeros(n, dtype=int) if strata is None else pd.factorize(pd.Series(list(strata)))[0]
    counts = np.zeros((n_resamples + 1, n), dtype=float)
    rows = np.arange(n_resamples + 1)
    for k in np.unique(labels):
        members = np.flatnonzero(labels == k)
        idx = members[resample_indices(members.size, n_resamples, seed + int(k))]
        np.add.at(counts, (np.repeat(rows, members.size), idx.ravel()), 1.0)
    return counts


def weighted_means(df: pd.DataFrame, group: Sequence[str], metric: str, counts: np.ndarray,
                   names: Sequence[str], weights: np.ndarray | None = None) -> dict:
    """Per group of ``df`` (e.g. an expert pair): the ``metric``'s weighted mean over
    tensors under every resample of tensor ``counts`` (NaN metrics skipped).

    ``weights`` overrides the frame's own (:func:`metric_weights`).
    """
    col = {n: i for i, n in enumerate(names)}
    out = {}
    w_all = metric_weights(df, metric) if weights is None else weights
    for key, g in df.groupby(list(group), sort=False):
        x = g[metric].to_numpy(dtype=float)
        w = np.asarray(w_all, dtype=float)[df.index.get_indexer(g.index)]
        ok = np.isfinite(x) & (w > 0)
        sx, sw = np.zeros(len(names)), np.zeros(len(names))
        np.add.at(sx, [col[n] for n in g["name"][ok]], (x * w)[ok])
        np.add.at(sw, [col[n] for n in g["name"][ok]], w[ok])
        with np.errstate(invalid="ignore", divide="ignore"):
            out[key if isinstance(key, tuple) else (key,)] = (counts @ sx) / (counts @ sw)
    return out


def mask_statistics(ms: pd.DataFrame, shapes: Mapping[str, tuple], n_resamples: int, seed: int = 0) -> dict:
    """Claim (b)'s three numbers, resampled over tensors: ``rel_rank`` (numel-weighted
    rank / min(shape) over matrices), ``empty`` (the larger of the empty-row and
    empty-column fractions) and ``concentration`` (kept density in the embeddings
    and the first half's q/k over the model's); plus ``bounded`` (a rank bound used)."""
    ms = ms.reset_index(drop=True)
    names = list(dict.fromkeys(ms["name"]))
    layers = ms["layer"].dropna()
    half = (int(layers.max()) + 1) / 2 if len(layers) else 0
    early = ms["role"].eq("embed") | (ms["role"].isin(["q", "k"]) & ms["layer"].notna()
                                     & (ms["layer"].fillna(0) < half))
    is_early = dict(zip(ms["name"], early))
    # early and other tensors resampled apart: every resample has both, so the ratio is defined
    counts = tensor_counts(len(names), n_resamples, seed, strata=[is_early[n] for n in names])
    mats = ms[ms["name"].map(lambda n: len(shapes.get(n, ())) == 2)]
    full = mats["name"].map(lambda n: min(shapes[n])).astype(float)
    rank = mats["mask_rank"].fillna(mats["mask_rank_at_least"]).astype(float)
    one = ["criterion"]
    rel = weighted_means(mats.assign(rel=rank / full), one, "rel", counts, names,
                         weights=mats["numel"].to_numpy(float))
    emp = weighted_means(mats.assign(emp=np.maximum(mats["row_sparsity"], mats["col_sparsity"])), one, "emp",
                         counts, names, weights=mats["numel"].to_numpy(float))
    w = ms["numel"].to_numpy(float)
    k_early = weighted_means(ms[early], one, "kept_frac", counts, names, weights=w[early.to_numpy()])
    k_all = weighted_means(ms, one, "kept_frac", counts, names, weights=w)
    first = lambda d: next(iter(d.values())) if d else np.full(counts.shape[0], np.nan)  # noqa: E731
    with np.errstate(invalid="ignore", divide="ignore"):
        conc = first(k_early) / np.where(first(k_all) > 0, first(k_all), np.nan)
    return {"rel_rank": first(rel), "empty": first(emp), "concentration": conc,
            "bounded": bool(mats["mask_rank"].isna().any())}


def overlap_statistics(overlap: pd.DataFrame, n_resamples: int, seed: int = 0) -> dict:
    """Per pair ``(expert_a, expert_b)``: the model-level Spearman of log v (weighted
    as :func:`~curvlens.passes.analysis_common.aggregate` weighs it), resampled over
    tensors."""
    ov = overlap.reset_index(drop=True)
    names = list(dict.fromkeys(ov["name"]))
    counts = tensor_counts(len(names), n_resamples, seed)
    return weighted_means(ov, ["expert_a", "expert_b"], "spearman_log", counts, names)


def gain_interval(table: pd.DataFrame, capabilities: Mapping[str, str], label: str, *,
                  n_resamples: int = 2000, seed: int = 0) -> dict:
    """One merge's gain kept, pooled over capabilities and its worst capability's,
    each with a 95% interval (paired bootstrap over evaluation items; the seeds of
    a ``seed`` column pooled).

    Returns
    -------
    dict
        ``pooled, pooled_low, pooled_high, worst, worst_low, worst_high`` (observed:
        mean over seeds) and ``seeds``.
    """
    st = merge_statistics(table, capabilities, [label], ItemBootstrap(n_resamples, seed))
    seeds = [s for s in st if s != "left_out" and label in st[s]]
    if not seeds:
        raise CurvlensError(f"gain_interval: the table has no rows of {label!r} with the base's and every "
                            "expert's own scores")
    out = {"seeds": len(seeds)}
    for stat, key in (("pooled_gain", "pooled"), ("worst_gain", "worst")):
        per = [st[s][label][stat] for s in seeds]
        out[key] = float(np.nanmean([p[0] for p in per]))
        out[f"{key}_low"], out[f"{key}_high"] = interval(pool_resamples(per))
    return out
