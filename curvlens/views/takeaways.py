"""One computed sentence per paper figure: what its data show, for ``figures/README.md``.

Each function takes the frame a figure is drawn from (and what else the figure
shows, such as a base score or a chance level) and returns one sentence whose
numbers are read off that frame, so the caption stays true when the data change.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

from curvlens.passes.analysis_common import aggregate
from curvlens.views._common import metric_label
from curvlens.views.baselines import CHANCE_LEVELS, jaccard_chance
from curvlens.views.curves import own_capability_scores
from curvlens.views.heatmaps import layer_role_matrix
from curvlens.views.tables import fmt_pct, fmt_sig

__all__ = ["cell_extremes", "curvature_takeaway", "graft_takeaway", "histogram_takeaway", "layer_role_takeaway",
           "mask_overlap_takeaway", "mask_structure_takeaway", "merge_takeaway", "pair_grid_takeaway",
           "pairs_takeaway", "random_row_sparsity"]


def cell_extremes(df: pd.DataFrame, metric: str, **filters) -> tuple[tuple[str, str, float], tuple[str, str, float]]:
    """The (layer, role, value) of the highest and the lowest cell of a layer x role heatmap."""
    m = layer_role_matrix(df, metric, **filters).stack().dropna()
    hi, lo = m.idxmax(), m.idxmin()
    return (str(hi[0]), str(hi[1]), float(m[hi])), (str(lo[0]), str(lo[1]), float(m[lo]))


def _where(layer: str, role: str) -> str:
    return f"{role} ({'outside the blocks' if layer == 'non-layer' else 'layer ' + layer})"


def layer_role_takeaway(df: pd.DataFrame, metric: str, what: str, **filters) -> str:
    """Highest and lowest cell of a layer x role heatmap."""
    (l1, r1, v1), (l0, r0, v0) = cell_extremes(df, metric, **filters)
    return f"{what} is highest in {_where(l1, r1)}, {fmt_sig(v1, 2)}, and lowest in {_where(l0, r0)}, {fmt_sig(v0, 2)}."


def curvature_takeaway(stats: pd.DataFrame) -> str:
    """Median log10 v: its range over cells, and how far apart the experts are in one cell."""
    per = {e: layer_role_matrix(stats, "median_log10", expert=e) for e in pd.unique(stats["expert"])}
    cells = pd.DataFrame({e: m.stack() for e, m in per.items()})
    gap = float((cells.max(axis=1) - cells.min(axis=1)).max())
    (l1, r1, v1), (l0, r0, v0) = cell_extremes(stats, "median_log10")
    shared = gap < 0.5 * (v1 - v0)
    return (f"The median log10 v spans {v0:.1f} ({_where(l0, r0)}) to {v1:.1f} ({_where(l1, r1)}), averaged over "
            f"experts; in any one cell the experts are at most {gap:.1f} decades apart, "
            + ("less than half that span: the layer x role structure of the curvature is shared by the experts."
               if shared else "as much as half that span or more: the experts' curvature differs cell by cell."))


def pairs_takeaway(df: pd.DataFrame, metrics, what: str) -> str:
    """Model-level range of each pair metric over expert pairs, against chance."""
    pooled = aggregate(df, by=())
    parts = []
    for m in metrics:
        v = pooled[m].astype(float)
        chance = CHANCE_LEVELS.get(m)
        part = f"{metric_label(m)} {fmt_sig(v.min(), 2)} to {fmt_sig(v.max(), 2)}"
        if chance:
            part += f" ({v.mean() / chance:.1f}× chance {fmt_sig(chance, 2)} on average)"
        elif chance == 0.0:
            part += " (chance 0)"
        parts.append(part)
    return f"{what} over the {len(pooled)} expert pairs: " + "; ".join(parts) + "."


def mask_overlap_takeaway(mo: pd.DataFrame, density: float) -> str:
    """Mean mask Jaccard per criterion, against independent random masks of the density."""
    sub = mo[np.isclose(mo["density"].astype(float), density)]
    pooled = aggregate(sub, by=()).groupby("criterion", sort=False)["jaccard"].mean()
    chance = jaccard_chance(density)
    return ("Two experts' masks at density " + f"{density:g} share, as a Jaccard index averaged over pairs, "
            + ", ".join(f"{c} {j:.3f} ({j / chance:.1f}× chance)" for c, j in pooled.items())
            + f"; independent random masks would give {chance:.3f}.")


def random_row_sparsity(ms: pd.DataFrame, shapes: Mapping[str, tuple]) -> pd.DataFrame:
    """Add ``random_row_sparsity`` / ``random_col_sparsity``: the fraction of empty
    rows / columns a random mask of each tensor's kept fraction would have,
    ``(1 - p)^cols`` and ``(1 - p)^rows``. Matrices only (2-D shapes)."""
    two_d = ms[ms["name"].map(lambda n: len(tuple(shapes.get(n, ()))) == 2)].copy()
    rows = two_d["name"].map(lambda n: shapes[n][0]).astype(float)
    cols = two_d["name"].map(lambda n: shapes[n][1]).astype(float)
    p = two_d["kept_frac"].astype(float)
    two_d["random_row_sparsity"] = (1 - p) ** cols
    two_d["random_col_sparsity"] = (1 - p) ** rows
    return two_d


def mask_structure_takeaway(ms: pd.DataFrame, shapes: Mapping[str, tuple], criterion: str, density: float) -> str:
    """Empty rows and columns of the masks, model-wide, against a random mask's."""
    sub = random_row_sparsity(ms[(ms["criterion"] == criterion) & np.isclose(ms["density"].astype(float), density)],
                              shapes)
    cols = ["row_sparsity", "random_row_sparsity", "col_sparsity", "random_col_sparsity"]
    w = sub["numel"].astype(float)
    v = {c: float(np.average(sub[c].astype(float), weights=w)) for c in cols}
    more = v["row_sparsity"] > v["random_row_sparsity"] and v["col_sparsity"] > v["random_col_sparsity"]
    return (f"At density {density:g} the {criterion} masks leave {fmt_pct(v['row_sparsity'])} of the rows and "
            f"{fmt_pct(v['col_sparsity'])} of the columns empty (numel-weighted over matrices and experts), against "
            f"{fmt_pct(v['random_row_sparsity'])} and {fmt_pct(v['random_col_sparsity'])} for random masks of the same "
            f"per-tensor densities: {'more' if more else 'not more'} row/column structure than chance.")


def graft_takeaway(sweep: pd.DataFrame, capability_map: Mapping[str, str] | None,
                   base: Mapping[str, float] | None, expert_scores: Mapping[str, float] | None = None,
                   keep: float = 0.9) -> str:
    """Per expert, the lowest swept density keeping ``keep`` of its gain over the base
    (of its own score without a base), per criterion; "none" when no swept density does.
    The expert's own score comes from ``expert_scores`` or the sweep's density-1 point."""
    df = own_capability_scores(sweep, capability_map)
    parts = []
    for e, g in df.groupby("expert", sort=False):
        full = g[g["density"] >= 1.0]
        if expert_scores is not None and e in expert_scores:
            own = float(expert_scores[e])
        elif len(full):
            own = float(full["score"].mean())
        else:
            continue
        floor = float(base[e]) if base is not None and e in base else 0.0
        target = floor + keep * (own - floor)
        lows = {}
        for crit, h in g.groupby("criterion", sort=False):
            ok = h[h["score"] >= target - 1e-12]
            lows[crit] = float(ok["density"].min()) if len(ok) else float("nan")
        parts.append(f"{e} " + " / ".join(f"{c} {fmt_sig(d, 2) if np.isfinite(d) else 'none'}"
                                          for c, d in lows.items()))
    crits = " / ".join(pd.unique(df["criterion"]))
    ref = "its gain over the base model" if base else "its own score"
    return (f"Lowest density keeping {keep:.0%} of {ref} ({crits}): " + "; ".join(parts) + ".")


def pair_grid_takeaway(pm: pd.DataFrame, pair) -> str:
    """How alike two experts' pooled log10 v maps are, block by block."""
    a, b = pair
    cols = ["name", "row_block", "col_block"]
    va = pm[pm["expert"] == a].set_index(cols)["log10_v"]
    vb = pm[pm["expert"] == b].set_index(cols)["log10_v"]
    both = pd.concat([va, vb], axis=1, join="inner").dropna()
    r = float(both.iloc[:, 0].corr(both.iloc[:, 1])) if len(both) > 2 else float("nan")
    return f"Block-pooled log10 v of {a} and {b}: Pearson correlation {r:.2f} over {len(both)} blocks of the matrices shown."


def histogram_takeaway(hist: pd.DataFrame) -> str:
    """Where log10 v lies: the central 98% of all entries, and the roles' medians."""
    h = hist.assign(mid=(hist["bin_left"].astype(float) + hist["bin_right"].astype(float)) / 2,
                    count=pd.to_numeric(hist["count"]))

    def quantile(g, q):
        g = g.groupby("mid")["count"].sum().sort_index()
        c = g.cumsum() / g.sum()
        return float(g.index[int(np.searchsorted(c.to_numpy(), q))])

    lo, hi = quantile(h, 0.01), quantile(h, 0.99)
    med = {r: quantile(g, 0.5) for r, g in h.groupby("role", sort=False)}
    r_lo, r_hi = min(med, key=med.get), max(med, key=med.get)
    within = {r: [quantile(ge, 0.5) for _, ge in g.groupby("expert", sort=False)] for r, g in h.groupby("role", sort=False)}
    apart = {r: max(v) - min(v) for r, v in within.items()}
    r_far = max(apart, key=apart.get)
    return (f"98% of the entries have log10 v between {lo:.1f} and {hi:.1f}; the roles' medians range from "
            f"{med[r_lo]:.1f} ({r_lo}) to {med[r_hi]:.1f} ({r_hi}); within a role the experts' medians are at most "
            f"{apart[r_far]:.1f} decades apart ({r_far}).")


def merge_takeaway(table: pd.DataFrame, capability_map: Mapping[str, str] | None, relative: bool) -> str:
    """The best merge by mean score (raw) or by mean and worst retention (relative)."""
    merges = table[~table["model"].astype(str).str.startswith("expert:") & (table["model"] != "base")]
    if not relative or capability_map is None:
        mean = merges.groupby("model", sort=False)["accuracy"].mean()
        base = table[table["model"] == "base"]["accuracy"].mean()
        return (f"Best mean accuracy over the capabilities: {mean.idxmax()} ({mean.max():.3f}); worst: "
                f"{mean.idxmin()} ({mean.min():.3f}); the base model scores {base:.3f}.")
    from curvlens.views.merges import normalized_scores

    rel = normalized_scores(table, capability_map)
    rel = rel[rel["model"].isin(set(merges["model"]))].pivot_table(index="model", columns="capability",
                                                                   values="relative", sort=False)
    avg, worst = rel.mean(axis=1), rel.min(axis=1)
    return (f"Highest mean retention (merge / the capability's expert): {avg.idxmax()} ({avg.max():.2f}); best worst "
            f"capability: {worst.idxmax()} ({worst.max():.2f}); the lowest single retention is {rel.min().min():.2f} "
            f"({rel.min().idxmin()} under {rel.min(axis=1).idxmin()}).")
