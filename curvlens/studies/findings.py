"""The paper's claims, checked on these experts: holds / partly / does not hold.

Each finding is computed from the analysis frames, with the numbers that decide it
and the rule used, never written by hand. Claims (from the OTA/FFG paper):

(a) FFG keeps an expert's score at densities where magnitude pruning has lost it.
(b) FFG masks are low-rank, row/column structured, and concentrated in the early
    q/k projections and the embeddings.
(c) The experts' curvature overlaps strongly.
(d) OTA+FFG beats linear, TIES and DARE on mean score and on negative transfer.

(a) needs a grafting sweep with scores, (d) a merge table; (b) and (c) only need
the experts, so ``curvlens analyze`` states them for anyone's checkpoints.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from curvlens.arguments import frame_arg, real_arg
from curvlens.errors import CurvlensError
from curvlens.passes.analysis_common import aggregate

FINDINGS_COLUMNS = ["claim", "statement", "verdict", "evidence", "rule"]
#: The columns each rule reads from the frame it takes.
FRAME_COLUMNS = {
    "graft_sweep": ["expert", "criterion", "density", "capability", "score"],
    "mask_stats": ["name", "layer", "role", "numel", "criterion", "density", "kept_frac", "mask_rank",
                   "mask_rank_at_least", "row_sparsity", "col_sparsity"],
    "curvature_overlap": ["expert_a", "expert_b", "numel", "spearman_log", "cosine"],
    "merge_table": ["model", "capability", "accuracy"],
}

HOLDS, PARTLY, NOT, UNTESTED = "holds", "partly", "does not hold", "not measured"

#: Thresholds of the rules (stated in each finding's ``rule``).
KEEP = 0.9            # (a) "keeps the score": at least 90% of the expert's own score
LOW_RANK = 0.5        # (b) mean mask rank / full rank below this
STRUCTURED = 0.1      # (b) mean fraction of empty rows or columns above this
CONCENTRATED = 1.5    # (b) kept density in early q/k + embeddings / model density
STRONG, SOME = 0.7, 0.4  # (c) Spearman of log v, every pair: >= STRONG holds, >= SOME partly

STATEMENTS = {
    "a": "FFG keeps an expert's score at densities where magnitude pruning has lost it",
    "b": "FFG masks are low-rank, row/column structured, and concentrated in early q/k and the embeddings",
    "c": "the experts' curvature overlaps strongly",
    "d": "OTA+FFG beats linear, TIES and DARE on mean score and on negative transfer",
}


def _row(claim: str, verdict: str, evidence: str, rule: str) -> dict:
    return {"claim": claim, "statement": STATEMENTS[claim], "verdict": verdict, "evidence": evidence,
            "rule": rule}


def finding_grafting(sweep: pd.DataFrame | None, own_scores: Mapping[str, float] | None,
                     capabilities: Mapping[str, str] | None,
                     base_scores: Mapping[str, float] | None = None) -> dict:
    """(a): per expert, the lowest density at which each criterion keeps KEEP of
    the expert's gain over the base on its capability.

    A grafted expert falls back to the base where its mask is off, so where the base
    already answers part of a capability, "keeps 90% of the score" would be met by
    the base alone; the gain ``own - base`` is what grafting can keep or lose.
    ``base_scores`` (capability -> the base's score) defaults to 0 for every
    capability (a base that cannot do any of them).
    """
    rule = (f"per expert: the lowest swept density at which a grafted expert keeps >= {KEEP:.0%} of its "
            "gain over the base (own score - base score; the base's score is where a graft falls back to); "
            "holds if FFG's is lower than magnitude's for every expert, partly for some")
    if sweep is None or not capabilities or not own_scores:
        return _row("a", UNTESTED, "needs a grafting sweep with scores", rule)
    from curvlens.studies.graft import ffg_vs_magnitude_summary

    s = ffg_vs_magnitude_summary(sweep, capabilities)
    base_scores = base_scores or {}
    wins, parts, skipped = 0, [], []
    for e, grp in s.groupby("expert", sort=False):
        own = own_scores.get(e)
        base = float(base_scores.get(capabilities.get(e), 0.0))
        if own is None or not own - base > 0:
            skipped.append(e)
            continue
        lowest = {}
        for c in ("fisher", "magnitude"):
            ok = grp[grp[c] - base >= KEEP * (own - base)]["density"]
            lowest[c] = float(ok.min()) if len(ok) else np.inf
        wins += lowest["fisher"] < lowest["magnitude"]
        parts.append(f"{e}: FFG {_dens(lowest['fisher'])} vs magnitude {_dens(lowest['magnitude'])}")
    if not parts:
        return _row("a", UNTESTED, "no expert scores above the base on its own capability", rule)
    verdict = HOLDS if wins == len(parts) else PARTLY if wins else NOT
    evidence = "; ".join(parts)
    if skipped:
        evidence += f" (not above the base, left out: {', '.join(skipped)})"
    return _row("a", verdict, evidence, rule)


def _dens(d: float) -> str:
    return f"{d:g}" if np.isfinite(d) else "none swept"


def finding_masks(mask_stats: pd.DataFrame | None, shapes: Mapping[str, tuple] | None,
                  density: float = 0.3) -> dict:
    """(b): relative rank, empty rows/columns and where FFG's kept entries sit."""
    if mask_stats is not None and not mask_stats.empty:
        # the density asked for, else the swept one closest to it
        ds = sorted(set(mask_stats.loc[mask_stats["criterion"] == "fisher", "density"].astype(float)))
        if ds and not any(np.isclose(ds, density)):
            density = min(ds, key=lambda d: abs(d - density))
    rule = (f"FFG masks at density {density:g}: low-rank if the numel-weighted mean of rank / min(shape) over "
            f"matrices is < {LOW_RANK}; structured if the mean fraction of empty rows or columns (the larger) "
            f"is > {STRUCTURED}; concentrated if the kept density in the embeddings and the q/k projections of "
            f"the first half of the layers is > {CONCENTRATED}x the model's; holds if all three, partly if one "
            "or two")
    if mask_stats is None or not shapes:
        return _row("b", UNTESTED, "needs mask_stats", rule)
    ms = mask_stats[(mask_stats["criterion"] == "fisher") & np.isclose(mask_stats["density"], density)]
    if ms.empty:
        return _row("b", UNTESTED, f"no fisher masks at density {density}", rule)
    mats = ms[ms["name"].map(lambda n: len(shapes.get(n, ())) == 2)].copy()
    full = mats["name"].map(lambda n: min(shapes[n]))
    # a bounded rank counts at its bound: the ratio is then a lower bound, and says so
    rank = mats["mask_rank"].fillna(mats["mask_rank_at_least"])
    bounded = bool(mats["mask_rank"].isna().any())
    rel = float(np.average(rank / full, weights=mats["numel"]))
    empty = float(np.average(np.maximum(mats["row_sparsity"], mats["col_sparsity"]), weights=mats["numel"]))
    layers = ms["layer"].dropna()
    half = (int(layers.max()) + 1) / 2 if len(layers) else 0
    early = ms["role"].eq("embed") | (ms["role"].isin(["q", "k"]) & ms["layer"].notna()
                                     & (ms["layer"].fillna(0) < half))
    kept = lambda d: float(np.average(d["kept_frac"], weights=d["numel"])) if len(d) else np.nan  # noqa: E731
    ratio = kept(ms[early]) / kept(ms) if kept(ms) > 0 else np.nan
    checks = {"low-rank": rel < LOW_RANK, "structured": empty > STRUCTURED, "concentrated": ratio > CONCENTRATED}
    n = sum(checks.values())
    verdict = HOLDS if n == 3 else PARTLY if n else NOT
    evidence = (f"mean rank / full rank {'>= ' if bounded else ''}{rel:.2f}; empty rows or columns {empty:.2f}; "
                f"kept density early q/k + embeddings / model {ratio:.2f}")
    if n:
        evidence += " (" + ", ".join(k for k, v in checks.items() if v) + ")"
    return _row("b", verdict, evidence, rule)


def finding_overlap(overlap: pd.DataFrame | None) -> dict:
    """(c): the model-level Spearman of log v of every pair."""
    rule = (f"model-level Spearman of log v (over the entries either expert updated), every pair: holds if all "
            f">= {STRONG}, partly if all >= {SOME}")
    if overlap is None or overlap.empty:
        return _row("c", UNTESTED, "needs curvature_overlap (two or more experts with moments)", rule)
    model = aggregate(overlap, by=())
    rho = model["spearman_log"].astype(float)
    lo = float(rho.min())
    verdict = HOLDS if lo >= STRONG else PARTLY if lo >= SOME else NOT
    pairs = "; ".join(f"{r.expert_a}/{r.expert_b} {r.spearman_log:.2f}" for r in model.itertuples())
    return _row("c", verdict, f"Spearman of log v: {pairs} (cosine of v, mean {model['cosine'].mean():.2f})", rule)


def finding_merges(scores: pd.DataFrame | None, capabilities: Mapping[str, str] | None,
                   labels: Mapping[str, str]) -> dict:
    """(d): mean score and worst retention of OTA+FFG against the others."""
    rule = ("mean score over capabilities, and negative transfer as the worst capability's retention (merged / "
            "the expert's own score): holds if OTA+FFG is at least as good as every other on both, partly if on "
            "one of them or against some")
    if scores is None or not capabilities:
        return _row("d", UNTESTED, "needs a merge table with scores", rule)
    from curvlens.studies.prediction import merge_retention

    ret = merge_retention(scores, capabilities)
    present = {k: v for k, v in labels.items() if v in set(ret["model"])}
    if "ota_ffg" not in present or len(present) < 2:
        return _row("d", UNTESTED, f"the merge table lacks {sorted(set(labels.values()) - set(present.values()))}",
                    rule)
    stats = {}
    for key, label in present.items():
        g = ret[(ret["model"] == label) & (ret["capability"] != "mean")]
        stats[key] = (float(g["accuracy"].mean()), float(g["retention"].min()))
    ours = stats.pop("ota_ffg")
    beat_mean = [k for k, (m, _) in stats.items() if ours[0] >= m]
    beat_worst = [k for k, (_, w) in stats.items() if ours[1] >= w]
    both = len(beat_mean) == len(stats) and len(beat_worst) == len(stats)
    verdict = HOLDS if both else PARTLY if beat_mean or beat_worst else NOT
    evidence = (f"OTA+FFG mean {ours[0]:.3f}, worst retention {ours[1]:.2f}; "
                + "; ".join(f"{present[k]} {m:.3f}, {w:.2f}" for k, (m, w) in stats.items()))
    return _row("d", verdict, evidence, rule)


def findings(frames: Mapping[str, pd.DataFrame], *, capabilities: Mapping[str, str] | None = None,
             shapes: Mapping[str, tuple] | None = None, labels: Mapping[str, str] | None = None,
             density: float = 0.3) -> pd.DataFrame:
    """Every claim's verdict, from whichever frames exist.

    Parameters
    ----------
    frames : mapping
        Analysis frames by the demo's keys: ``graft_sweep``, ``mask_stats``,
        ``curvature_overlap``, ``merge_table`` (any may be missing: that claim is
        then ``not measured``).
    capabilities : mapping, optional
        Expert -> capability (for the claims that need scores).
    shapes : mapping, optional
        Tensor name -> shape (``experts.reference.shape``), for relative ranks.
    labels : mapping, optional
        Merge-table labels of ``ota_ffg``, ``linear``, ``ties``, ``dare``
        (default: the demo's).
    density : float
        The FFG density claim (b) is read at.

    Returns
    -------
    pandas.DataFrame
        ``claim, statement, verdict, evidence, rule``, claims a-d.
    """
    if not isinstance(frames, Mapping):
        raise CurvlensError(f"frames must be a mapping name -> DataFrame; got a {type(frames).__name__}")
    for name, value in (("capabilities", capabilities), ("shapes", shapes), ("labels", labels)):
        if value is not None and not isinstance(value, Mapping):
            raise CurvlensError(f"{name} must be a mapping; got a {type(value).__name__}")
    density = real_arg("density", density, lo=0.0, lo_open=True, hi=1.0)
    # a frame lacking the columns a rule reads is an error; an empty one is "not measured"
    frames = {k: frame_arg(f"frames[{k!r}]", frames.get(k), cols) for k, cols in FRAME_COLUMNS.items()}
    labels = dict(labels or {"ota_ffg": "OTA+FFG", "linear": "linear (average)", "ties": "TIES",
                             "dare": "DARE-TIES"})
    table = frames.get("merge_table")
    own = None
    if table is not None and capabilities:
        own = {}
        for e, cap in capabilities.items():
            r = table[(table["model"] == f"expert: {e}") & (table["capability"] == cap)]
            if len(r):
                own[e] = float(r["accuracy"].iloc[0])
    base = None
    if table is not None:
        rows_b = table[table["model"] == "base"]
        base = dict(zip(rows_b["capability"], rows_b["accuracy"].astype(float))) if len(rows_b) else None
    rows = [finding_grafting(frames.get("graft_sweep"), own, capabilities, base),
            finding_masks(frames.get("mask_stats"), shapes, density),
            finding_overlap(frames.get("curvature_overlap")),
            finding_merges(table, capabilities, labels)]
    return pd.DataFrame(rows, columns=FINDINGS_COLUMNS)


def findings_lines(df: pd.DataFrame) -> list[str]:
    """The findings as text lines (what the demo prints)."""
    out = ["\nfindings (the paper's claims on these experts; rules in report.html):"]
    for r in df.itertuples():
        out.append(f"  ({r.claim}) {r.statement}: {r.verdict.upper()} -- {r.evidence}")
    return out
