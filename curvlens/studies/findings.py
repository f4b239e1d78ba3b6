"""The paper's claims, checked on these experts, with the uncertainty that decides them.

Each finding is computed from the analysis frames, with the numbers that decide it,
their 95% intervals and the rule used, never written by hand. Claims (from the
OTA/FFG paper):

(a) FFG keeps an expert's score at densities where magnitude pruning has lost it.
(b) FFG masks are low-rank, row/column structured, and concentrated in the early
    q/k projections and the embeddings.
(c) The experts' curvature overlaps strongly.
(d) OTA+FFG beats linear, TIES and DARE on mean score and on negative transfer.

How a verdict is decided. A claim is a set of comparisons (per expert, pair,
competitor or check), each a statistic set against a threshold. Each statistic
gets a 95% percentile interval by resampling what it was measured on: the
evaluation items (claims a and d, paired across models:
:mod:`curvlens.studies.item_bootstrap`), the tensors (claims b and c), and, when
the frames hold several seeds (a ``seed`` column), the seeds (the resamples of
every seed are pooled). A comparison is decided only when its whole interval lies
on one side of the threshold. The claim's verdict — ``holds``, ``partly``, ``does
not hold`` — is stated when every way the undecided comparisons could fall gives
the same verdict; otherwise it is ``undecided``, with the numbers.

Capability is measured by one yardstick, the share of the expert's gain over the
base a model keeps (:mod:`curvlens.studies.gain`).

(a) needs a grafting sweep and the base's scores, (d) a merge table; (b) and (c)
only need the experts, so ``curvlens analyze`` states them for anyone's checkpoints.
"""
from __future__ import annotations

import itertools
from collections.abc import Mapping

import numpy as np
import pandas as pd

from curvlens.arguments import frame_arg, real_arg
from curvlens.errors import CurvlensError
from curvlens.math.bootstrap import LEVEL, N_RESAMPLES, YES, decide, interval, possible, resolve
from curvlens.studies.findings_stats import (
    KEEP, lowest_density_steps, mask_statistics, merge_statistics, overlap_statistics,
)
from curvlens.studies.item_bootstrap import ItemBootstrap, of_seed, pool_resamples, seeds_of

FINDINGS_COLUMNS = ["claim", "statement", "verdict", "evidence", "rule"]
#: The columns each rule reads from the frame it takes.
FRAME_COLUMNS = {
    "graft_sweep": ["expert", "criterion", "density", "capability", "score"],
    "mask_stats": ["name", "layer", "role", "numel", "criterion", "density", "kept_frac", "mask_rank",
                   "mask_rank_at_least", "row_sparsity", "col_sparsity"],
    "curvature_overlap": ["expert_a", "expert_b", "numel", "spearman_log", "cosine"],
    "merge_table": ["model", "capability", "accuracy"],
}
#: One row per comparison a verdict rests on (:func:`findings_with_intervals`).
INTERVAL_COLUMNS = ["claim", "subject", "metric", "estimate", "low", "high", "threshold", "outcome", "seeds",
                    "per_seed"]

HOLDS, PARTLY, NOT, UNDECIDED, UNTESTED = "holds", "partly", "does not hold", "undecided", "not measured"
VERDICTS = (HOLDS, PARTLY, NOT, UNDECIDED, UNTESTED)

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
_CI = f"{LEVEL:.0%} interval"
_HOW = (f"each comparison decided only when its {_CI} (bootstrap, {{over}}) lies on one side; the verdict is "
        "undecided unless every way the undecided comparisons could fall gives the same one")


def _row(claim: str, verdict: str, evidence: str, rule: str, intervals: list | None = None) -> dict:
    return {"claim": claim, "statement": STATEMENTS[claim], "verdict": verdict, "evidence": evidence,
            "rule": rule, "intervals": intervals or []}


def _all_some_none(values: tuple) -> str:
    return HOLDS if all(values) else PARTLY if any(values) else NOT


def _verdict(outcomes: list[str], rule=_all_some_none) -> str:
    v = resolve([possible(o) for o in outcomes], rule)
    return UNDECIDED if v is None else v


def _interval_row(claim, subject, metric, per_seed: dict, threshold, *, strict=True, above=True) -> dict:
    """One comparison: the observed value per seed, the pooled interval, the outcome
    of "the statistic is above (``above``) / below the threshold"."""
    seeds = list(per_seed)
    est = float(np.nanmean([float(a[0]) for a in per_seed.values()]))
    low, high = interval(pool_resamples(per_seed.values()))
    if above:
        outcome = decide(low, high, threshold, strict=strict)
    else:  # below: the interval of -x above -threshold
        outcome = decide(-high, -low, -threshold, strict=strict)
    return {"claim": claim, "subject": subject, "metric": metric, "estimate": est, "low": low, "high": high,
            "threshold": threshold, "outcome": outcome, "seeds": len(seeds),
            "per_seed": "/".join(f"{float(a[0]):.3g}" for a in per_seed.values())}


def _ci(r: dict, fmt: str = "{:.2f}") -> str:
    s = fmt.format(r["estimate"])
    if np.isfinite(r["low"]) and np.isfinite(r["high"]) and not (r["low"] == r["high"] == r["estimate"]):
        s += f" [{fmt.format(r['low'])}, {fmt.format(r['high'])}]"
    if r["seeds"] > 1:
        s += f" (seeds {r['per_seed']})"
    return s


def _over(items: bool, seeds: int, what: str = "evaluation items") -> str:
    parts = [what if items else f"{what}: none given, binomial where n is known"]
    if seeds > 1:
        parts.append(f"{seeds} seeds pooled")
    return ", ".join(parts)


def finding_grafting(sweep: pd.DataFrame | None, capabilities: Mapping[str, str] | None,
                     reference: pd.DataFrame | None, *, boot: ItemBootstrap | None = None) -> dict:
    """(a): per expert, the lowest swept density at which each criterion keeps
    :data:`KEEP` of the expert's gain over the base on its capability.

    Parameters
    ----------
    sweep : pandas.DataFrame
        :func:`~curvlens.studies.graft.graft_sweep` (with ``correct``, the
        per-item results, for item intervals; with ``seed`` for several seeds).
    capabilities : mapping
        Expert -> its capability.
    reference : pandas.DataFrame
        A merge table holding the ``base`` rows (where a graft falls back to: the
        gain is measured from there) and, optionally, each ``expert: NAME`` row
        (else the sweep's density 1.0 is the expert's own score).
    boot : ItemBootstrap, optional
        Shared with the other findings so that all resample the same items.
    """
    boot = boot or ItemBootstrap()
    rule = (f"per expert: the lowest swept density at which a grafted expert keeps >= {KEEP:.0%} of its gain over "
            "the base (graft - base >= 0.9 (own - base); the base's score is where a graft falls back to); FFG "
            "wins an expert if it reaches it at a lower density step than magnitude; holds if FFG wins every "
            "expert, partly if some, does not hold if none; " + _HOW.format(over="evaluation items, paired"))
    if sweep is None or not capabilities:
        return _row("a", UNTESTED, "needs a grafting sweep with scores", rule)
    if reference is None or not (reference["model"] == "base").any():
        return _row("a", UNTESTED, "needs the base's scores (the gain over the base is what grafting keeps)",
                    rule)
    steps = lowest_density_steps(sweep, reference, capabilities, boot)
    rows, parts, left = [], [], []
    for e, st in steps.items():
        above = {s: r for s, r in st["seeds"].items() if r["gain"][0] > 0}
        if not above:
            left.append(e)
            continue
        ds = st["densities"]
        name = lambda i: f"{ds[int(i)]:g}" if i < len(ds) else "none swept"  # noqa: E731
        r = _interval_row("a", e, "steps magnitude - FFG", {s: r["magnitude"] - r["fisher"] for s, r in
                                                            above.items()}, 0.0)
        rows.append(r)
        f0 = "/".join(name(r_["fisher"][0]) for r_ in above.values())
        m0 = "/".join(name(r_["magnitude"][0]) for r_ in above.values())
        parts.append(f"{e}: FFG {f0} vs magnitude {m0} (steps saved {_ci(r, '{:.0f}')}: {r['outcome']})")
    if not rows:
        return _row("a", UNTESTED, "no expert scores above the base on its own capability", rule)
    verdict = _verdict([r["outcome"] for r in rows])
    evidence = "; ".join(parts)
    if left:
        evidence += f" (not above the base, left out: {', '.join(left)})"
    return _row("a", verdict, evidence, rule, rows)


def finding_masks(mask_stats: pd.DataFrame | None, shapes: Mapping[str, tuple] | None,
                  density: float = 0.3, *, n_resamples: int = N_RESAMPLES) -> dict:
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
            "or two; " + _HOW.format(over="tensors"))
    if mask_stats is None or not shapes:
        return _row("b", UNTESTED, "needs mask_stats", rule)
    ms = mask_stats[(mask_stats["criterion"] == "fisher") & np.isclose(mask_stats["density"], density)]
    if ms.empty:
        return _row("b", UNTESTED, f"no fisher masks at density {density}", rule)
    per = {s: mask_statistics(of_seed(ms, s), shapes, n_resamples) for s in seeds_of(ms)}
    checks = [("low-rank", "rel_rank", LOW_RANK, False), ("structured", "empty", STRUCTURED, True),
              ("concentrated", "concentration", CONCENTRATED, True)]
    rows = [_interval_row("b", label, key, {s: p[key] for s, p in per.items()}, thr, above=above)
            for label, key, thr, above in checks]
    bounded = any(p["bounded"] for p in per.values())
    verdict = _verdict([r["outcome"] for r in rows])
    evidence = (f"mean rank / full rank {'>= ' if bounded else ''}{_ci(rows[0])}; empty rows or columns "
                f"{_ci(rows[1])}; kept density early q/k + embeddings / model {_ci(rows[2])}")
    met = [r["subject"] for r in rows if r["outcome"] == YES]
    if met:
        evidence += " (" + ", ".join(met) + ")"
    return _row("b", verdict, evidence, rule, rows)


def finding_overlap(overlap: pd.DataFrame | None, *, n_resamples: int = N_RESAMPLES) -> dict:
    """(c): the model-level Spearman of log v of every pair."""
    rule = (f"model-level Spearman of log v (over the entries either expert updated), every pair: holds if all "
            f">= {STRONG}, partly if all >= {SOME}; " + _HOW.format(over="tensors"))
    if overlap is None or overlap.empty:
        return _row("c", UNTESTED, "needs curvature_overlap (two or more experts with moments)", rule)
    per = {s: overlap_statistics(of_seed(overlap, s), n_resamples) for s in seeds_of(overlap)}
    pairs = list(dict.fromkeys(k for p in per.values() for k in p))
    rows = []
    for a, b in pairs:
        vals = {s: p[a, b] for s, p in per.items() if (a, b) in p}
        for thr in (STRONG, SOME):
            rows.append(_interval_row("c", f"{a}/{b}", f"spearman_log >= {thr}", vals, thr, strict=False))

    def level(values):  # per pair: (>= STRONG, >= SOME)
        strong, some = values[0::2], values[1::2]
        if any(s and not m for s, m in zip(strong, some)):
            return "impossible"
        return HOLDS if all(strong) else PARTLY if all(some) else NOT

    combos = itertools.product(*(possible(r["outcome"]) for r in rows))
    verdicts = {level(c) for c in combos} - {"impossible"}
    verdict = verdicts.pop() if len(verdicts) == 1 else UNDECIDED
    evidence = "Spearman of log v: " + "; ".join(f"{r['subject']} {_ci(r)}" for r in rows[0::2])
    return _row("c", verdict, evidence, rule, rows)


def finding_merges(scores: pd.DataFrame | None, capabilities: Mapping[str, str] | None,
                   labels: Mapping[str, str], *, boot: ItemBootstrap | None = None) -> dict:
    """(d): OTA+FFG against the others on the pooled gain kept (mean score) and on
    the worst capability's gain kept (negative transfer)."""
    boot = boot or ItemBootstrap()
    rule = ("capability as the share of each expert's gain over the base kept, (merged - base) / (expert - base) "
            "(capabilities where the expert is not above the base left out): mean score as the pooled gain "
            "kept, sum(merged - base) / sum(expert - base) (it orders merges as their mean accuracy does), "
            "negative transfer as the worst capability's gain kept; OTA+FFG beats another merge on a measure "
            "if the difference is > 0; holds if it beats every other on both, partly if on some, does not hold "
            "if on none; " + _HOW.format(over="evaluation items, paired across merges"))
    if scores is None or not capabilities:
        return _row("d", UNTESTED, "needs a merge table with scores", rule)
    present = {k: v for k, v in labels.items() if v in set(scores["model"])}
    if "ota_ffg" not in present or len(present) < 2:
        return _row("d", UNTESTED, f"the merge table lacks {sorted(set(labels.values()) - set(present.values()))}",
                    rule)
    if not (scores["model"] == "base").any():
        return _row("d", UNTESTED, "needs the base's scores (the gain over the base is the yardstick)", rule)
    stats = merge_statistics(scores, capabilities, list(present.values()), boot)
    seeds = [s for s in stats if s != "left_out" and present["ota_ffg"] in stats[s]]
    if not seeds:
        return _row("d", UNTESTED, "the merge table lacks the base's or an expert's own scores", rule)
    ours = present["ota_ffg"]
    rows, parts = [], []
    for key, label in present.items():
        if key == "ota_ffg":
            continue
        for stat, word in (("pooled_gain", "pooled gain"), ("worst_gain", "worst gain")):
            diff = {s: stats[s][ours][stat] - stats[s][label][stat] for s in seeds if label in stats[s]}
            rows.append(_interval_row("d", label, f"{stat}: OTA+FFG - other", diff, 0.0))
        parts.append(f"{label} {_point(stats, seeds, label)}; OTA+FFG - {label}: pooled {_ci(rows[-2])}, "
                     f"worst {_ci(rows[-1])}")
    verdict = _verdict([r["outcome"] for r in rows])
    left = sorted({c for s in seeds for c in stats["left_out"].get(s, [])})
    evidence = f"OTA+FFG {_point(stats, seeds, ours)}; " + "; ".join(parts)
    if left:
        evidence += f" (capabilities where the expert is not above the base, left out of the gains: {left})"
    return _row("d", verdict, evidence, rule, rows)


def _point(stats: dict, seeds: list, label: str) -> str:
    """A merge's observed mean accuracy, pooled and worst gain kept (mean over seeds)."""
    val = lambda k: float(np.nanmean([stats[s][label][k][0] for s in seeds if label in stats[s]]))  # noqa: E731
    return (f"mean accuracy {val('mean_accuracy'):.3f}, gain kept pooled {val('pooled_gain'):.2f} / worst "
            f"{val('worst_gain'):.2f}")


def findings_with_intervals(frames: Mapping[str, pd.DataFrame], *, capabilities: Mapping[str, str] | None = None,
                            shapes: Mapping[str, tuple] | None = None, labels: Mapping[str, str] | None = None,
                            density: float = 0.3, n_resamples: int = N_RESAMPLES,
                            seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every claim's verdict, and the intervals it rests on.

    Parameters
    ----------
    frames : mapping
        Analysis frames by the demo's keys: ``graft_sweep``, ``mask_stats``,
        ``curvature_overlap``, ``merge_table`` (any may be missing: that claim is
        then ``not measured``). Frames of several zoo seeds carry a ``seed`` column.
    capabilities : mapping, optional
        Expert -> capability (for the claims that need scores).
    shapes : mapping, optional
        Tensor name -> shape (``experts.reference.shape``), for relative ranks.
    labels : mapping, optional
        Merge-table labels of ``ota_ffg``, ``linear``, ``ties``, ``dare``
        (default: the demo's).
    density : float
        The FFG density claim (b) is read at.
    n_resamples, seed : int
        Bootstrap resamples per statistic, and the seed of the draws.

    Returns
    -------
    verdicts : pandas.DataFrame
        ``claim, statement, verdict, evidence, rule``, claims a-d.
    intervals : pandas.DataFrame
        :data:`INTERVAL_COLUMNS`: per comparison, the observed ``estimate`` (mean
        over seeds), the pooled interval ``low``-``high``, the ``threshold`` and the
        ``outcome`` (``yes`` / ``no`` / ``undecided``); ``per_seed`` the observed
        values.
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
    boot = ItemBootstrap(n_resamples, seed)
    table = frames.get("merge_table")
    rows = [finding_grafting(frames.get("graft_sweep"), capabilities, table, boot=boot),
            finding_masks(frames.get("mask_stats"), shapes, density, n_resamples=n_resamples),
            finding_overlap(frames.get("curvature_overlap"), n_resamples=n_resamples),
            finding_merges(table, capabilities, labels, boot=boot)]
    intervals = pd.DataFrame([i for r in rows for i in r["intervals"]], columns=INTERVAL_COLUMNS)
    return pd.DataFrame(rows, columns=FINDINGS_COLUMNS), intervals


def findings(frames: Mapping[str, pd.DataFrame], **kwargs) -> pd.DataFrame:
    """Every claim's verdict, from whichever frames exist (the first frame of
    :func:`findings_with_intervals`, which takes the same arguments)."""
    return findings_with_intervals(frames, **kwargs)[0]


def findings_lines(df: pd.DataFrame) -> list[str]:
    """The findings as text lines (what the demo prints)."""
    out = [f"\nfindings (the paper's claims on these experts, {_CI}s; rules in report.html):"]
    for r in df.itertuples():
        out.append(f"  ({r.claim}) {r.statement}: {r.verdict.upper()} -- {r.evidence}")
    return out

