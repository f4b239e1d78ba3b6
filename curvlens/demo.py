"""The main job: build (or load) the demo zoo, evaluate, merge, write a report.

``curvlens demo --out DIR`` calls :func:`run_demo`. Everything lands in ``DIR``:
``merge_table.csv`` (model, method, capability, accuracy), ``report.html``
(self-contained: tables and interactive figures, no network needed to view it)
and the analysis tables as CSV.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from curvlens.demo_report import score_pivot
from curvlens.io.atomic import AtomicDir

# (label, method, params): the merges the demo compares. Densities follow the
# paper's range (FFG keeps 0.2-0.46 of entries per expert); eps as its config.
DEMO_MERGES: tuple[tuple[str, str, dict], ...] = (
    ("linear (average)", "linear", {}),
    ("task arithmetic", "task_arithmetic", {"lambda": 0.5}),
    ("TIES", "ties", {"density": 0.5}),
    ("DARE-TIES", "dare_ties", {"density": 0.5, "seed": 0}),
    ("OTA", "ota", {"epsilon": 1e-26}),
    ("OTA+FFG", "ota", {"epsilon": 1e-26, "ffg_density": 0.3, "fallback_to_base": True}),
)

#: A wider grid, for studies that need merges of clearly different quality (how
#: well the predicted loss ranks merges: ``benchmarks/predicted_ranking.py``).
RANKING_GRID: tuple[tuple[str, str, dict], ...] = (
    ("linear", "linear", {}),
    ("task_arithmetic l=0.3", "task_arithmetic", {"lambda": 0.3}),
    ("task_arithmetic l=0.5", "task_arithmetic", {"lambda": 0.5}),
    ("task_arithmetic l=1.0", "task_arithmetic", {"lambda": 1.0}),
    ("ties d=0.2", "ties", {"density": 0.2}),
    ("ties d=0.5", "ties", {"density": 0.5}),
    ("dare_ties d=0.3", "dare_ties", {"density": 0.3, "seed": 0}),
    ("dare_ties d=0.5", "dare_ties", {"density": 0.5, "seed": 0}),
    ("fisher", "fisher", {}),
    ("ota", "ota", {"epsilon": 1e-26}),
    ("ota+ffg d=0.1", "ota", {"epsilon": 1e-26, "ffg_density": 0.1, "fallback_to_base": True}),
    ("ota+ffg d=0.3", "ota", {"epsilon": 1e-26, "ffg_density": 0.3, "fallback_to_base": True}),
)

#: One or two merges of every method family that merges N experts over a base, for
#: studies of the predicted loss over every family (``benchmarks/predicted_ranking.py``,
#: ``tests/real/study.py``): label -> (method, params, family). Families: ``dense``
#: (every entry of every edit used), ``trim`` (entries dropped by magnitude, not
#: rescaled), ``drop-rescale`` (entries dropped at random and the rest rescaled:
#: unbiased in expectation), ``curvature mask`` (OTA with FFG masks).
FAMILY_GRID: dict[str, tuple[str, dict, str]] = {
    "linear": ("linear", {}, "dense"),
    "task_arithmetic l=0.3": ("task_arithmetic", {"lambda": 0.3}, "dense"),
    "task_arithmetic l=0.5": ("task_arithmetic", {"lambda": 0.5}, "dense"),
    "task_arithmetic l=1.0": ("task_arithmetic", {"lambda": 1.0}, "dense"),
    "model_stock": ("model_stock", {}, "dense"),
    "multislerp": ("multislerp", {}, "dense"),
    "karcher": ("karcher", {}, "dense"),
    "fisher": ("fisher", {}, "dense"),
    "ota": ("ota", {"epsilon": 1e-26}, "dense"),
    "ties d=0.2": ("ties", {"density": 0.2}, "trim"),
    "ties d=0.5": ("ties", {"density": 0.5}, "trim"),
    "breadcrumbs d=0.5": ("breadcrumbs", {"density": 0.5}, "trim"),
    "breadcrumbs_ties d=0.5": ("breadcrumbs_ties", {"density": 0.5}, "trim"),
    "sce": ("sce", {}, "trim"),
    "dare_linear d=0.3": ("dare_linear", {"density": 0.3, "seed": 0}, "drop-rescale"),
    "dare_linear d=0.5": ("dare_linear", {"density": 0.5, "seed": 0}, "drop-rescale"),
    "dare_ties d=0.3": ("dare_ties", {"density": 0.3, "seed": 0}, "drop-rescale"),
    "dare_ties d=0.5": ("dare_ties", {"density": 0.5, "seed": 0}, "drop-rescale"),
    "della d=0.5": ("della", {"density": 0.5, "seed": 0}, "drop-rescale"),
    "della_linear d=0.5": ("della_linear", {"density": 0.5, "seed": 0}, "drop-rescale"),
    # the same, averaged (normalize: divide by the summed weights) instead of summed
    "dare_linear d=0.5 avg": ("dare_linear", {"density": 0.5, "seed": 0, "normalize": True}, "drop-rescale"),
    "dare_ties d=0.5 avg": ("dare_ties", {"density": 0.5, "seed": 0, "normalize": True}, "drop-rescale"),
    "della_linear d=0.5 avg": ("della_linear", {"density": 0.5, "seed": 0, "normalize": True}, "drop-rescale"),
    "breadcrumbs d=0.5 avg": ("breadcrumbs", {"density": 0.5, "normalize": True}, "trim"),
    "ota+ffg d=0.1": ("ota", {"epsilon": 1e-26, "ffg_density": 0.1, "fallback_to_base": True}, "curvature mask"),
    "ota+ffg d=0.3": ("ota", {"epsilon": 1e-26, "ffg_density": 0.3, "fallback_to_base": True}, "curvature mask"),
}

#: Model-wide densities of the FFG-vs-magnitude grafting sweep (the paper reports
#: FFG densities of 0.2-0.46; lower ones show where magnitude pruning breaks).
GRAFT_DENSITIES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
MASK_DENSITIES = (0.1, 0.3)


def analysis_frames(zoo, experts, merges: dict, table, *, device="auto", progress=True,
                    graft_densities=GRAFT_DENSITIES, echo=lambda s: None) -> dict:
    """Every analysis of the paper on the zoo, as the tidy frames the views draw.

    Returns
    -------
    dict
        ``{frame name: DataFrame}`` with the keys of :data:`curvlens.views.figures.FRAME_KEYS`,
        plus ``merge_predicted_loss`` (model-level predicted loss per merge).
    """
    from curvlens import zoo as zoo_mod
    from curvlens.passes import analysis as A
    from curvlens.studies.graft import graft_sweep

    kw = {"device": device, "progress": progress}
    frames = {"merge_table": table}
    echo("analysis: curvature, FFG and magnitude masks, interference and predicted loss, in one pass ...")
    # one pass over the experts feeds them all (cl.analyze); the same frames as one call each
    fused = A.analyze(experts, ["curvature_stats", "curvature_overlap", "log10_histogram", "mask_stats",
                                "mask_overlap", "interference", "compare_merges"],
                      densities=MASK_DENSITIES, overlap_density=0.3, merges=merges, **kw)
    frames.update({k: v for k, v in fused.items() if k != "compare_merges"})
    ffg_label = next((k for k in merges if "FFG" in k), next(iter(merges)))
    frames["predicted_loss"] = A.predicted_loss(experts, merges[ffg_label], **kw)
    frames["merge_predicted_loss"] = fused["compare_merges"]
    names = experts.tensor_names(floating_only=True)
    last = max(g for g in experts.describe()["layer"].dropna())
    grid = [n for n in names if (".layers.0." in n or f".layers.{last}." in n) and n.endswith("proj.weight")]
    frames["pooled_moments"] = A.pooled_moments(experts, grid, masks_density=0.3, **kw)
    echo(f"analysis: grafting sweep at densities {list(graft_densities)} (FFG vs magnitude) ...")
    frames["graft_sweep"] = graft_sweep(
        experts, graft_densities, evaluate=lambda sd: zoo_mod.evaluate(sd, zoo=zoo, device=device), **kw)
    frames.update(regime_frames(experts, frames, zoo.capabilities, **kw))
    return frames


def regime_frames(experts, frames: dict, capabilities=None, *, device="auto", progress=True) -> dict:
    """``edit_norms``, ``regime``, ``findings`` and ``finding_intervals`` from the
    experts and the frames already computed (what ``curvlens demo`` and
    ``curvlens analyze`` report)."""
    from curvlens.studies.regime import edit_norms, regime_table

    norms = frames.get("edit_norms")
    out = {"edit_norms": norms if norms is not None else edit_norms(experts, device=device, progress=progress)}
    table = frames.get("merge_table")
    out["regime"] = regime_table(out["edit_norms"], interference=frames.get("interference"),
                                 overlap=frames.get("curvature_overlap"),
                                 scores=table if capabilities else None, capabilities=capabilities)
    out.update(findings_frames(experts, frames, capabilities))
    return out


def findings_frames(experts, frames: dict, capabilities=None) -> dict:
    """``findings`` and ``finding_intervals`` from the frames (of one seed, or of
    several with a ``seed`` column)."""
    from curvlens.studies.findings import findings_with_intervals

    shapes = {n: tuple(experts.reference.shape(n)) for n in experts.tensor_names(floating_only=True)}
    verdicts, intervals = findings_with_intervals(frames, capabilities=capabilities, shapes=shapes)
    return {"findings": verdicts, "finding_intervals": intervals}


#: The frames the findings read: with several seeds, these are pooled over seeds.
FINDING_FRAMES = ("merge_table", "graft_sweep", "mask_stats", "curvature_overlap")


def pooled_frames(per_seed: dict[int, dict]) -> dict:
    """The findings' frames of several seeds, concatenated with a ``seed`` column."""
    import pandas as pd

    return {k: pd.concat([f[k].assign(seed=s) for s, f in per_seed.items()], ignore_index=True)
            for k in FINDING_FRAMES if all(k in f for f in per_seed.values())}


def regime_lines(frames: dict) -> list[str]:
    """The regime table and the findings as text (printed by the demo and analyze)."""
    from curvlens.studies.findings import findings_lines
    from curvlens.studies.regime import REGIME_SCOPES, regime_by_scope, regime_verdict

    reg = frames["regime"]
    lines = [f"\nregime: {regime_verdict(reg)}"]
    for scope, table in regime_by_scope(reg).items():  # one table per scope: only its own metrics
        lines += [f"\n{REGIME_SCOPES.get(scope, scope)}:", table.round(4).to_string()]
    return lines + findings_lines(frames["findings"])


def evaluate_and_merge(zoo, experts, *, device="auto", progress=True, echo=lambda s: None):
    """Score the base, every expert and every demo merge on every capability.

    Returns
    -------
    table : pandas.DataFrame
        ``model, method, capability, accuracy, n`` (``merge_table.csv``).
    merges : dict
        label -> :class:`~curvlens.passes.merge_result.MergeResult` (in memory).
    """
    from curvlens.config.merge import merge

    merges = {}
    for label, method, params in DEMO_MERGES:
        echo(f"merging: {label} ...")
        merges[label] = merge(experts, method, device=device, progress=progress, **params)
    return zoo.score(merges, device=device), merges


def run_demo(out: str | os.PathLike, *, config: str = "default", device: str = "auto",
             overwrite: bool = False, progress: bool = True, seed: int = 0, seeds=None,
             echo: Callable[[str], None] = lambda s: None, cache_dir=None, analyses: bool = True) -> dict:
    """Run the demo end to end and write its outputs to ``out``.

    Parameters
    ----------
    out : path
        Output dir; written atomically, refused if it exists unless ``overwrite``.
    config : {"default", "quick"}
        Which zoo.
    echo : callable
        Where progress text and the final tables go (the CLI passes ``print``).
    seed, seeds : int, sequence of int
        The zoo's seed; with ``seeds`` (e.g. ``(0, 1, 2)``), one zoo per seed is
        built and analysed, the findings pool all of them (their intervals span
        the seeds as well as the evaluation items; ``findings_by_seed.csv`` has
        each seed's own verdicts, ``*_all_seeds.csv`` the frames they read, with a
        ``seed`` column) and the rest of the report shows the first seed.
        Each further seed costs one more zoo build.
    analyses : bool
        Also run every analysis (curvature overlap, masks, interference, grafting
        sweep) and put it in the report.

    Returns
    -------
    dict
        ``{"table", "pivot", "zoo", "path", "merges", "frames"}`` (of the first seed).
    """
    from curvlens.demo_report import demo_sections
    from curvlens.views.report import write_report

    out = Path(out)
    AtomicDir(out, overwrite=overwrite)  # refuse a bad output before the long part
    t0 = time.perf_counter()
    seeds = [seed] if seeds is None else [int(s) for s in dict.fromkeys(seeds)]
    runs = {s: _demo_seed(config, s, device=device, progress=progress, echo=echo, cache_dir=cache_dir,
                          analyses=analyses, t0=t0) for s in seeds}
    zoo, experts, merges, frames = runs[seeds[0]]
    table = frames["merge_table"]
    pivot = score_pivot(table)
    if analyses and len(seeds) > 1:
        import pandas as pd

        by_seed = [findings_frames(experts, f, zoo.capabilities)["findings"].assign(seed=s)
                   for s, (_, _, _, f) in runs.items()]
        frames["findings_by_seed"] = pd.concat(by_seed, ignore_index=True)
        pooled = pooled_frames({s: r[3] for s, r in runs.items()})
        frames.update(findings_frames(experts, pooled, zoo.capabilities))
        frames.update({f"{k}_all_seeds": df for k, df in pooled.items()})
        frames["findings"] = frames["findings"].assign(seeds=" ".join(map(str, seeds)))
    if analyses:
        for line in summary_lines(frames, zoo) + regime_lines(frames):
            echo(line)

    # the zoo is an input too: the report never goes into it
    with AtomicDir(out, overwrite=overwrite, inputs=[r[0].root for r in runs.values()]) as tmp:
        for key, df in frames.items():
            df.to_csv(tmp / f"{key}.csv", index=False)
        for label, res in merges.items():
            res.report.to_csv(tmp / f"merge_report_{_slug(label)}.csv", index=False)
        write_report(tmp / "report.html", demo_sections(zoo, experts, frames, merges, config),
                     title="curvlens demo report")
    echo(f"\nwrote {out / 'merge_table.csv'} and {out / 'report.html'} "
         f"({time.perf_counter() - t0:.0f} s in all)")
    return {"table": table, "pivot": pivot, "zoo": zoo, "path": out, "merges": merges, "frames": frames}


def _demo_seed(config, seed, *, device, progress, echo, cache_dir, analyses, t0):
    """One seed of the demo: (zoo, experts, merges, frames)."""
    from curvlens import zoo as zoo_mod

    echo(f"building or loading the {config!r} zoo (seed {seed}) ...")
    zoo = zoo_mod.build(config, seed=seed, progress=progress, cache_dir=cache_dir)
    experts = zoo.experts()
    echo(f"zoo ready in {time.perf_counter() - t0:.0f} s: {experts}")
    table, merges = evaluate_and_merge(zoo, experts, device=device, progress=progress, echo=echo)
    echo(f"\naccuracy per capability (held-out, exact match; seed {seed}):")
    echo(score_pivot(table).round(3).to_string())
    frames = {"merge_table": table}
    if analyses:
        frames = analysis_frames(zoo, experts, merges, table, device=device, progress=progress, echo=echo)
    return zoo, experts, merges, frames


def summary_lines(frames: dict, zoo) -> list[str]:
    """The headline numbers: model-level curvature overlap, FFG vs magnitude."""
    from curvlens.passes.analysis import aggregate
    from curvlens.studies.graft import ffg_vs_magnitude_summary

    lines = ["\nmodel-level curvature overlap between experts (numel-weighted over tensors):"]
    model = aggregate(frames["curvature_overlap"], by=())
    lines.append(model.round(3).to_string(index=False))
    if "graft_sweep" in frames:
        lines.append("\nFFG vs magnitude grafting, score on the expert's own capability:")
        summary = ffg_vs_magnitude_summary(frames["graft_sweep"], zoo.capabilities)
        lines.append(summary.round(3).to_string(index=False))
    return lines


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_")
