"""Which regime are these experts in? Small edits of one base, or far apart?

Real fine-tunes are small edits: a Llama SFT at lr 1e-5 or a MiniLM fine-tuned by
``transformers.Trainer`` moves its weights by about 1% of their norm, and merges
keep most of every skill. Experts that moved ten times further are another
regime, where every merge loses most of every skill. :func:`edit_norms` measures
the edits in one streaming pass; :func:`regime_table` puts them beside the
task-vector cosines, the curvature overlap and (when scores exist) the merges'
retention, so a user sees at once which regime their experts are in.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd

from curvlens.arguments import frame_arg
from curvlens.errors import CurvlensError
from curvlens.passes.analysis_common import (
    EDIT_NORMS_COLUMNS, aggregate, need_base,  # noqa: F401  (EDIT_NORMS_COLUMNS: its schema, public here)
)
from curvlens.passes.fused import run_pass
from curvlens.passes.analyze_stats import EditNorms
from curvlens.passes.experts import Experts
from curvlens.studies.gain import POOLED, WORST, merge_gain
from curvlens.studies.prediction import merge_retention

REGIME_COLUMNS = ["scope", "subject", "metric", "value"]

#: What real fine-tuning measured (the regime the paper's experts are in), for the
#: report's "typical of real fine-tunes" column: relative edits of all-MiniLM-L6-v2
#: experts fine-tuned by transformers.Trainer at lr 1e-4 (tests/real: 0.004-0.006),
#: and of four MiniLM Trainer experts of 188 steps (0.011-0.012).
REAL_RELATIVE_EDIT = (0.004, 0.012)


def edit_norms(experts: Experts, names: Sequence[str] | None = None, *, device="auto",
               progress: bool = True) -> pd.DataFrame:
    """Squared norms of each expert's edit and of the base, per tensor.

    Returns
    -------
    pandas.DataFrame
        ``expert, name, layer, role, numel, delta_sq, base_sq`` with
        ``delta_sq = ||theta_i - theta_0||^2`` and ``base_sq = ||theta_0||^2``
        (float64 sums). Both add up over tensors; :func:`relative_edit` pools them.
    """
    need_base(experts, "edit_norms")
    return run_pass(experts, [EditNorms(experts)], names, device=device, progress=progress,
                    desc="edit norms")["edit_norms"]


def relative_edit(norms: pd.DataFrame, by: Sequence[str] = ()) -> pd.DataFrame:
    """``||theta_i - theta_0|| / ||theta_0||`` per expert (and ``by`` groups).

    Examples
    --------
    >>> df = pd.DataFrame({"expert": ["a", "a"], "name": ["x", "y"], "layer": pd.array([0, 1], dtype="Int64"),
    ...                    "role": ["q", "k"], "numel": [4, 4], "delta_sq": [0.09, 0.07], "base_sq": [8.0, 8.0]})
    >>> relative_edit(df)["relative_edit"].round(3).tolist()
    [0.1]
    """
    missing = {"expert", "delta_sq", "base_sq"} - set(norms.columns)
    if missing:
        raise CurvlensError(f"norms lacks column(s) {sorted(missing)}; expected an edit_norms frame")
    out = aggregate(norms, by=tuple(by), metrics=["delta_sq", "base_sq"])
    out["relative_edit"] = (out["delta_sq"] / out["base_sq"].where(out["base_sq"] > 0)) ** 0.5
    return out.drop(columns=["delta_sq", "base_sq"])


def regime_table(norms: pd.DataFrame, *, interference: pd.DataFrame | None = None,
                 overlap: pd.DataFrame | None = None, scores: pd.DataFrame | None = None,
                 capabilities: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The regime statistics, one tidy row each: ``scope, subject, metric, value``.

    Parameters
    ----------
    norms : pandas.DataFrame
        :func:`edit_norms`: ``relative_edit`` per expert (scope ``expert``) and per
        role over all experts (scope ``role``).
    interference : pandas.DataFrame, optional
        :func:`~curvlens.passes.analysis_interference.interference`: the
        model-level ``tv_cosine`` per pair (scope ``pair``).
    overlap : pandas.DataFrame, optional
        :func:`~curvlens.passes.analysis_curvature.curvature_overlap`: the
        model-level ``spearman_log`` and ``cosine`` per pair.
    scores, capabilities : optional
        A merge table and expert -> capability: per capability the experts' gain
        over the base and its share of their summed gain (scope ``capability``:
        where one capability holds most of it, it alone decides every pooled
        comparison of merges); each merge's ``gain_kept`` (the
        share of the experts' summed gain over the base it keeps,
        :func:`~curvlens.studies.gain.merge_gain`) and ``worst_gain_kept`` (its
        worst capability's), when the table has the base's rows; and, secondary,
        ``mean_retention`` and ``worst_retention`` (score / the expert's own
        score, which credits the base's own score to every merge; scope ``merge``).
    """
    rows = []
    for r in relative_edit(norms).itertuples():
        rows.append({"scope": "expert", "subject": r.expert, "metric": "relative_edit", "value": r.relative_edit})
    pooled = norms.assign(expert="all")
    for r in relative_edit(pooled, by=("role",)).itertuples():
        rows.append({"scope": "role", "subject": r.role, "metric": "relative_edit", "value": r.relative_edit})
    for df, metrics in ((interference, ("tv_cosine",)), (overlap, ("spearman_log", "cosine"))):
        if df is None:
            continue
        model = aggregate(df, by=())
        for r in model.itertuples():
            for m in metrics:
                rows.append({"scope": "pair", "subject": f"{r.expert_a} / {r.expert_b}", "metric": m,
                             "value": float(getattr(r, m))})
    if scores is not None:
        if capabilities is None:
            raise CurvlensError("regime_table: scores need capabilities (expert -> capability)")
        rows += merge_rows(scores, capabilities)
    return pd.DataFrame(rows, columns=REGIME_COLUMNS)


def merge_rows(scores: pd.DataFrame, capabilities: Mapping[str, str]) -> list[dict]:
    """The regime table's ``capability`` and ``merge`` rows.

    Per capability (with the base's rows): ``expert_gain`` (the expert's score over
    the base's), ``gain_share`` (its share of the experts' summed gain: the weight it
    has in every pooled gain kept, so one capability with most of the gain decides
    claim (d) alone) and ``eval_items``. Per merge: gain kept, pooled and per
    capability, first; retention second.
    """
    experts = {f"expert: {e}" for e in capabilities}
    with_base = bool((scores["model"] == "base").any())
    gain = merge_gain(scores, capabilities) if with_base else merge_retention(scores, capabilities)
    rows = []
    if with_base:
        ref = gain[(gain["model"] == "base") & ~gain["capability"].isin([POOLED, WORST])]
        lift = (ref["expert_accuracy"] - ref["base_accuracy"]).clip(lower=0)
        n = scores.groupby("capability")["n"].first() if "n" in scores.columns else {}
        for cap, g in zip(ref["capability"], lift):
            rows.append({"scope": "capability", "subject": cap, "metric": "expert_gain", "value": float(g)})
            rows.append({"scope": "capability", "subject": cap, "metric": "gain_share",
                         "value": float(g / lift.sum()) if lift.sum() > 0 else float("nan")})
            if cap in n:
                rows.append({"scope": "capability", "subject": cap, "metric": "eval_items", "value": float(n[cap])})
    for model, grp in gain[~gain["model"].isin(experts | {"base"})].groupby("model", sort=False):
        per_cap = grp[~grp["capability"].isin([POOLED, WORST, "mean"])]
        summary = grp.set_index("capability")
        if with_base:
            rows.append({"scope": "merge", "subject": model, "metric": "gain_kept",
                         "value": float(summary.loc[POOLED, "gain_kept"])})
            rows.append({"scope": "merge", "subject": model, "metric": "worst_gain_kept",
                         "value": float(summary.loc[WORST, "gain_kept"])})
            for r in per_cap.itertuples():
                rows.append({"scope": "merge", "subject": model, "metric": f"gain_kept {r.capability}",
                             "value": float(r.gain_kept)})
        rows.append({"scope": "merge", "subject": model, "metric": "mean_retention",
                     "value": float(per_cap["retention"].mean())})
        rows.append({"scope": "merge", "subject": model, "metric": "worst_retention",
                     "value": float(per_cap["retention"].min())})
    return rows


def regime_verdict(table: pd.DataFrame) -> str:
    """One sentence on the regime, from the experts' relative edits.

    Examples
    --------
    >>> t = pd.DataFrame({"scope": ["expert"], "subject": ["a"], "metric": ["relative_edit"], "value": [0.01]})
    >>> regime_verdict(t).startswith("small edits")
    True
    """
    table = frame_arg("table", table, ["scope", "metric", "value"])
    if table is None:
        return "no relative edit measured"
    edits = table[(table["scope"] == "expert") & (table["metric"] == "relative_edit")]["value"]
    if edits.empty or not edits.notna().any():
        return "no relative edit measured"
    hi = float(edits.max())
    lo_real, hi_real = REAL_RELATIVE_EDIT
    span = f"relative edits {float(edits.min()):.3g}-{hi:.3g} (real fine-tunes measured: {lo_real}-{hi_real})"
    if hi <= 0.03:
        return f"small edits of one base, the regime of real fine-tuning: {span}"
    if hi <= 0.1:
        return f"moderate edits, several times those of real fine-tunes: {span}"
    return f"large edits, far from the regime of real fine-tuning: {span}"



#: Scopes of :func:`regime_table`, in the order a reader meets them, with what their table holds.
REGIME_SCOPES = {
    "expert": "relative edit ||theta_i - theta_0|| / ||theta_0|| per expert",
    "role": "relative edit per role, all experts pooled",
    "pair": "model-level task-vector cosine and curvature overlap per expert pair",
    "capability": "per capability: the experts' gain over the base, its share of their summed gain (what it "
                  "weighs in a pooled comparison of merges) and the evaluation size",
    "merge": "per merge: the gain kept (merged - base) / (expert - base), pooled, worst and per capability; "
             "secondary, retention (score / the expert's own), mean and worst",
}


def regime_by_scope(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """:func:`regime_table` as one small wide table per scope, each with only the
    metrics that scope has (no column of NaN for another scope's metrics).

    Returns
    -------
    dict
        scope -> DataFrame indexed by ``subject`` (named after the scope), one
        column per metric, in :data:`REGIME_SCOPES` order (other scopes after),
        scopes without rows left out.

    Examples
    --------
    >>> t = pd.DataFrame({"scope": ["expert", "pair", "pair"], "subject": ["a", "a / b", "a / b"],
    ...                   "metric": ["relative_edit", "tv_cosine", "cosine"], "value": [0.01, 0.2, 0.9]})
    >>> {k: list(v.columns) for k, v in regime_by_scope(t).items()}
    {'expert': ['relative_edit'], 'pair': ['tv_cosine', 'cosine']}
    """
    missing = set(REGIME_COLUMNS) - set(table.columns)
    if missing:
        raise CurvlensError(f"regime_by_scope: the table lacks column(s) {sorted(missing)}; expected a "
                            "regime_table frame")
    present = list(dict.fromkeys(table["scope"]))
    order = [s for s in REGIME_SCOPES if s in present] + [s for s in present if s not in REGIME_SCOPES]
    out = {}
    for scope in order:
        rows = table[table["scope"] == scope]
        wide = rows.pivot_table(index="subject", columns="metric", values="value", sort=False, dropna=False)
        wide = wide[list(dict.fromkeys(rows["metric"]))].dropna(axis=1, how="all")
        wide.columns.name = None
        out[scope] = wide.rename_axis(scope)
    return out
