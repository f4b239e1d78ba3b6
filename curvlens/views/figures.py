"""Regenerate every static figure from the analysis frames: ``render_all``.

The ``curvlens figures`` command computes the frames on the zoo and calls
:func:`render_all`; a user can call it on frames computed from their own experts.
Each figure is written once per format, with a fixed style and fixed file
metadata, so the same frames give byte-identical PNG and PDF files; a
``README.md`` beside them lists every figure with a caption (what it shows) and a
takeaway computed from its data (:mod:`curvlens.views.takeaways`), and names the
data's source. Wherever a figure shows a score or an overlap it also shows what it
is measured against: the base model's score, the chance level of unrelated
experts, a random mask of the same density.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from curvlens.errors import CurvlensError, check_choice
from curvlens.io.atomic import make_partial
from curvlens.views._common import figure_style, first_seen, metric_label
from curvlens.views.baselines import jaccard_chance

__all__ = ["FRAME_KEYS", "draw_figures", "render_all", "save_figure"]

#: The frames ``render_all`` understands (the analysis layer's names).
FRAME_KEYS = ("curvature_stats", "curvature_overlap", "mask_stats", "mask_overlap",
              "interference", "predicted_loss", "graft_sweep", "pooled_moments",
              "log10_histogram", "merge_table")

# Metadata that would differ between runs (dates, versions) is left out.
_METADATA = {
    "png": {"Software": None},
    "pdf": {"Creator": None, "Producer": None, "CreationDate": None},
    "svg": {"Date": None, "Creator": None},
}


def save_figure(fig, path, *, dpi: float | None = None) -> Path:
    """Save a matplotlib figure deterministically (no dates or versions in the file).

    The format follows the suffix (``.png``, ``.pdf`` or ``.svg``).
    """
    path = Path(path)
    fmt = check_choice("format", path.suffix.lstrip(".").lower(), list(_METADATA))
    with figure_style():
        fig.savefig(path, format=fmt, metadata=_METADATA[fmt], dpi=dpi)
    return path


@dataclass(frozen=True)
class _Spec:
    stem: str
    frame: str
    caption: str
    draw: Callable[[], Any]
    takeaway: Callable[[], str] | None = None


def _closest(values, target: float) -> float:
    vals = sorted({float(v) for v in values})
    return min(vals, key=lambda d: (abs(d - target), d))


def _pair_metrics_spec(stem: str, frame: str, table, lead: str, metrics, what: str) -> _Spec:
    """A figure of expert x expert matrices, one panel per metric of ``table``, each
    with the metric's chance level marked."""
    from curvlens.views.pairs import pair_matrix_heatmap
    from curvlens.views.takeaways import pairs_takeaway

    return _Spec(stem, frame, lead + ": " + ", ".join(metric_label(m) for m in metrics)
                 + " (the chance level of unrelated experts marked on each colour bar).",
                 lambda: _panels(lambda m, ax: pair_matrix_heatmap(table, m, ax=ax), metrics),
                 lambda: pairs_takeaway(table, metrics, what))


def _pair_mean_spec(stem: str, frame: str, table, metric: str, caption: str, title: str, chance: str,
                    label: str) -> _Spec:
    """A layer x role heatmap of ``metric``, the numel-weighted mean over expert
    pairs, with its chance level in the title and its computed takeaway."""
    from curvlens.views import takeaways as tk
    from curvlens.views.heatmaps import layer_role_heatmap

    return _Spec(stem, frame, caption,
                 lambda: layer_role_heatmap(table, metric, annotate=True,
                                            title=f"{title} (mean over expert pairs; chance {chance})").figure,
                 lambda: tk.layer_role_takeaway(table, metric, label))


def _panels(draw_one, items, ncols: int = 3, size=(3.7, 3.0)):
    """One figure with a panel per item; ``draw_one(item, ax)`` draws each."""
    import matplotlib.pyplot as plt

    n = len(items)
    ncols = min(n, ncols)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows),
                             squeeze=False)
    for item, ax in zip(items, axes.flat):
        draw_one(item, ax)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig


def _scores_of(frames, capability_map, model) -> dict[str, float] | None:
    """Expert -> the score of ``model`` (a name, or a pattern with ``{expert}``) on the
    expert's capability, from the merge table."""
    table = frames.get("merge_table")
    if table is None or capability_map is None:
        return None
    out = {}
    for e, c in capability_map.items():
        rows = table[(table["model"] == model.format(expert=e)) & (table["capability"] == c)]
        if len(rows):
            out[e] = float(rows["accuracy"].mean())
    return out or None


def _specs(frames: Mapping[str, pd.DataFrame], capability_map, density, experts, shapes) -> list[_Spec]:
    from curvlens.views import takeaways as tk
    from curvlens.views.curves import density_curve_panels
    from curvlens.views.distributions import log10_histogram_grid
    from curvlens.views.heatmaps import layer_role_heatmaps
    from curvlens.views.merges import merge_scores
    from curvlens.views.pair_grid import pair_grid
    from curvlens.views.pairs import pair_matrix_heatmap

    specs: list[_Spec] = []
    f = frames

    def present(key, candidates):
        return [m for m in candidates if m in f[key].columns]

    if "curvature_stats" in f:
        specs.append(_Spec(
            "curvature_median_log10", "curvature_stats",
            "Median log10 of the Adam second moment v per layer and role, one panel per "
            "expert, shared colour scale.",
            lambda: layer_role_heatmaps(f["curvature_stats"], "median_log10", by="expert",
                                        title="Median log10 v by layer and role"),
            lambda: tk.curvature_takeaway(f["curvature_stats"])))
    if "curvature_overlap" in f:
        ov = f["curvature_overlap"]
        specs.append(_pair_mean_spec("overlap_pearson_by_layer_role", "curvature_overlap", ov, "pearson_log",
                                     "Pearson correlation of log10 v between experts per layer and role "
                                     "(numel-weighted mean over expert pairs; 0 for unrelated experts).",
                                     "Curvature overlap", "0", "The Pearson correlation of log10 v"))
        specs.append(_pair_metrics_spec(
            "overlap_pairs", "curvature_overlap", ov,
            "Curvature overlap between expert pairs, numel-weighted over all tensors",
            present("curvature_overlap", ["cosine", "pearson_log", "spearman_log",
                                          "jaccard_top10", "jaccard_top1"]), "Curvature overlap"))
    if "mask_stats" in f:
        ms = f["mask_stats"]
        d = _closest(ms["density"], 0.3) if density is None else float(density)
        for crit in first_seen(ms["criterion"]):
            specs.append(_Spec(
                f"mask_kept_frac_{_slug(crit)}", "mask_stats",
                f"Fraction of each tensor kept by the {crit} mask at model-wide density "
                f"{d:g} (a uniform mask keeps {d:g} everywhere), per layer and role, one panel per expert.",
                lambda crit=crit, d=d: layer_role_heatmaps(
                    ms, "kept_frac", by="expert", criterion=crit, density=d, vmin=0.0,
                    vmax=1.0, title=f"Kept fraction, {crit} mask, density {d:g}"),
                lambda crit=crit, d=d: tk.layer_role_takeaway(
                    ms, "kept_frac", f"At density {d:g} the {crit} mask's kept fraction (mean over experts)",
                    criterion=crit, density=d)))
            metrics = present("mask_stats", ["row_sparsity", "col_sparsity"])
            if metrics and shapes is not None:
                specs.append(_Spec(
                    f"mask_structure_{_slug(crit)}", "mask_stats",
                    f"Fraction of all-zero rows and columns of the {crit} masks at density "
                    f"{d:g} (mean over experts), beside what random masks of the same per-tensor "
                    "densities would leave empty.",
                    lambda crit=crit, d=d: _mask_structure(ms, shapes, crit, d),
                    lambda crit=crit, d=d: tk.mask_structure_takeaway(ms, shapes, crit, d)))
    if "mask_overlap" in f:
        mo = f["mask_overlap"]
        d = _closest(mo["density"], 0.3) if density is None else float(density)
        crits = first_seen(mo["criterion"])
        specs.append(_Spec(
            "mask_overlap_pairs", "mask_overlap",
            f"Jaccard overlap of the experts' masks at density {d:g}, one panel per "
            f"criterion; independent random masks give d / (2 - d) = {jaccard_chance(d):.3f}.",
            lambda d=d, crits=crits: _panels(lambda c, ax: pair_matrix_heatmap(
                mo, "jaccard", ax=ax, criterion=c, density=d, chance=jaccard_chance(d),
                title=f"{c} masks, density {d:g}"), crits),
            lambda d=d: tk.mask_overlap_takeaway(mo, d)))
    if "interference" in f:
        it = f["interference"]
        specs.append(_pair_metrics_spec(
            "interference_pairs", "interference", it,
            "Task interference between expert pairs, numel-weighted over tensors",
            present("interference", ["tv_cosine", "sign_conflict", "curvature_weighted_conflict"]),
            "Task interference"))
        if "sign_conflict" in it.columns:
            specs.append(_pair_mean_spec("sign_conflict_by_layer_role", "interference", it, "sign_conflict",
                                         "Fraction of entries whose task-vector signs disagree, per layer and "
                                         "role (mean over expert pairs; 0.5 for independent signs).",
                                         "Sign conflict", "0.5", "The sign conflict (chance 0.5)"))
    if "predicted_loss" in f:
        specs.append(_Spec(
            "predicted_loss_by_layer_role", "predicted_loss",
            "Predicted loss increase (diagonal-Fisher estimate) of each expert under the demo's OTA+FFG merge, "
            "per layer and role (mean over the tensors of a cell), one panel per expert.",
            lambda: layer_role_heatmaps(f["predicted_loss"], "predicted_loss_increase",
                                        by="expert", weight=None,
                                        title="Predicted loss increase under the OTA+FFG merge"),
            lambda: tk.layer_role_takeaway(f["predicted_loss"], "predicted_loss_increase",
                                           "The predicted loss increase (mean over experts)", weight=None)))
    if "graft_sweep" in f:
        base = _scores_of(f, capability_map, "base")
        own = _scores_of(f, capability_map, "expert: {expert}")
        specs.append(_Spec(
            "graft_density_curves", "graft_sweep",
            "Grafted expert score vs density (log scale), one panel per expert with its own score range: FFG "
            "(Fisher saliency, solid) against magnitude pruning (dashed); grey: the expert itself (density 1), "
            "from the merge table or the sweep"
            + ("; dotted: the base model, where a graft falls back to at density 0" if base else "")
            + (" (score on the expert's own capability)." if capability_map else "."),
            lambda base=base, own=own: density_curve_panels(f["graft_sweep"], capability_map, base=base,
                                                            expert_scores=own),
            lambda base=base, own=own: tk.graft_takeaway(f["graft_sweep"], capability_map, base, own)))
    if "pooled_moments" in f:
        pm = f["pooled_moments"]
        pair = experts if experts is not None else first_seen(pm["expert"])[:2]
        if len(pair) == 2:
            specs.append(_Spec(
                "moments_pair_grid", "pooled_moments",
                f"Block-pooled log10 v of {pair[0]} and {pair[1]} side by side for selected "
                "layers and roles (shared colour scale); outlines: FFG mask keeps >= 50%.",
                lambda pair=pair: pair_grid(pm, pair),
                lambda pair=pair: tk.pair_grid_takeaway(pm, pair)))
    if "log10_histogram" in f:
        specs.append(_Spec(
            "log10_v_histograms", "log10_histogram",
            "Distribution of log10 v per role, one line per expert (fraction of entries "
            "per bin; the x range spans the occupied bins).",
            lambda: log10_histogram_grid(f["log10_histogram"], by="role"),
            lambda: tk.histogram_takeaway(f["log10_histogram"])))
    if "merge_table" in f:
        mt = f["merge_table"]
        specs.append(_Spec(
            "merge_scores", "merge_table",
            "Held-out exact-match accuracy per capability for the base model, the experts "
            "and each merge (the base model's row is the baseline).",
            lambda: merge_scores(mt).figure,
            lambda: tk.merge_takeaway(mt, capability_map, relative=False)))
        if capability_map is not None:
            specs.append(_Spec(
                "merge_relative_scores", "merge_table",
                "Accuracy relative to the capability's own expert (1 = no loss; below 1: "
                "negative transfer; the base model's row is the baseline).",
                lambda: merge_scores(mt, capability_map, normalized=True).figure,
                lambda: tk.merge_takeaway(mt, capability_map, relative=True)))
    return specs


def _mask_structure(ms, shapes, crit, d):
    """2 x 2 panels: empty rows / columns, observed against a random mask of the same densities."""
    from curvlens.views.heatmaps import layer_role_heatmap
    from curvlens.views.takeaways import random_row_sparsity

    sub = random_row_sparsity(ms[(ms["criterion"] == crit) & np.isclose(ms["density"].astype(float), d)], shapes)
    items = [("row_sparsity", "empty rows"), ("random_row_sparsity", "empty rows, random mask"),
             ("col_sparsity", "empty columns"), ("random_col_sparsity", "empty columns, random mask")]
    fig = _panels(lambda item, ax: layer_role_heatmap(sub, item[0], ax=ax, vmin=0.0, vmax=1.0, title=item[1]),
                  items, ncols=2, size=(5.2, 3.0))
    fig.suptitle(f"{crit} masks at model-wide density {d:g} (mean over experts)")
    return fig


def _slug(s: Any) -> str:
    return "".join(c if c.isalnum() else "_" for c in str(s).lower()).strip("_")


def _check_frames(frames, formats=None) -> list[str]:
    if not isinstance(frames, Mapping):
        raise CurvlensError(f"render_all: frames must be a mapping name -> DataFrame; got "
                            f"{type(frames).__name__}")
    unknown = sorted(set(frames) - set(FRAME_KEYS))
    if unknown:
        raise CurvlensError(f"render_all: unknown frames {unknown}; expected any of "
                            f"{list(FRAME_KEYS)}")
    for key, df in frames.items():
        if not isinstance(df, pd.DataFrame):
            raise CurvlensError(f"render_all: frames[{key!r}] must be a DataFrame; got "
                                f"{type(df).__name__}")
    if formats is None:
        return []
    formats = [check_choice("formats", str(x).lower(), list(_METADATA)) for x in formats]
    if not formats:
        raise CurvlensError("render_all: formats is empty")
    return formats


def draw_figures(frames: Mapping[str, pd.DataFrame], *, capability_map: Mapping[str, str] | None = None,
                 density: float | None = None, experts: Sequence[str] | None = None,
                 shapes: Mapping[str, tuple] | None = None):
    """Every static figure the frames allow, drawn one at a time.

    Yields ``(stem, caption, takeaway, figure)``: the file stem, what the figure
    shows, one sentence computed from its data, and the matplotlib Figure (drawn in
    the fixed style; the caller saves and closes it). Arguments as :func:`render_all`.
    """
    _check_frames(frames)
    for spec in _specs(frames, capability_map, density, experts, shapes):
        try:
            with figure_style():
                drawn = spec.draw()
                takeaway = spec.takeaway() if spec.takeaway is not None else ""
        except CurvlensError as err:
            raise CurvlensError(f"render_all: figure {spec.stem!r} from "
                                f"frames[{spec.frame!r}]: {err}") from err
        yield spec.stem, spec.caption, takeaway, getattr(drawn, "figure", drawn)


def render_all(frames: Mapping[str, pd.DataFrame], out_dir: str | os.PathLike,
               formats: Sequence[str] = ("pdf", "png"), *,
               capability_map: Mapping[str, str] | None = None, density: float | None = None,
               experts: Sequence[str] | None = None, shapes: Mapping[str, tuple] | None = None,
               source: str | None = None, dpi: float = 200) -> list[Path]:
    """Write every static figure the given frames allow, plus ``README.md``.

    Parameters
    ----------
    frames : mapping name -> DataFrame
        Any of :data:`FRAME_KEYS`; figures needing a missing frame are skipped.
    out_dir : path
        Created if needed; existing files of the same names are replaced.
    formats : sequence of {"pdf", "png", "svg"}
        One file per figure and format.
    capability_map : mapping expert -> capability, optional
        Scores grafted experts on their own capability (with the base model's score
        as the floor, from the merge table) and adds the relative merge scores figure.
    density : float, optional
        Density of the mask figures (default: the density present closest to 0.3).
    experts : pair of str, optional
        The experts of the moment pair grid (default: the first two).
    shapes : mapping tensor name -> shape, optional
        Needed by the mask-structure figures (a random mask's empty rows depend on
        the matrix's shape): e.g. ``dict(zip(d["name"], d["shape"]))`` of
        ``experts.describe()``. Without it those figures are left out.
    source : str, optional
        Where the frames come from (which zoo or experts), stated at the top of the
        README.
    dpi : float
        Resolution of raster formats.

    Returns
    -------
    list of pathlib.Path
        The figure files written, in README order (the README itself is
        ``out_dir / "README.md"``).
    """
    import matplotlib.pyplot as plt

    formats = _check_frames(frames, formats)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Draw and save everything into a scratch dir first: a failing figure leaves
    # out_dir as it was, never half-updated.
    # a marked partial dir (the one mechanism of curvlens.io.atomic): swept by the
    # next run if this one is killed outright
    tmp = make_partial(out, "render")
    names: list[str] = []
    lines = []
    try:
        for stem, caption, takeaway, fig in draw_figures(frames, capability_map=capability_map, density=density,
                                                         experts=experts, shapes=shapes):
            try:
                files = [save_figure(fig, tmp / f"{stem}.{fmt}", dpi=dpi).name for fmt in formats]
            finally:
                plt.close(fig)
            names += files
            lines.append(f"- {', '.join(f'`{n}`' for n in files)}: {caption}"
                         + (f"\n  *Takeaway:* {takeaway}" if takeaway else ""))
        readme = ["# Figures", ""]
        if source:
            readme += [f"Data: {source}.", ""]
        readme += ["Written by `curvlens.views.render_all` from the analysis frames "
                   f"({', '.join(k for k in FRAME_KEYS if k in frames)}). Per figure: its files, what it shows, "
                   "and a takeaway computed from the same data.", "", *lines, ""]
        (tmp / "README.md").write_text("\n".join(readme))
        for name in names + ["README.md"]:
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / name for name in names]
