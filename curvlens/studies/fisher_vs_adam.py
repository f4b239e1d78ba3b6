"""``fisher_vs_adam``: does Adam's ``exp_avg_sq`` stand in for a real Fisher?

For experts that have both their Adam second moments and a data Fisher
(:func:`curvlens.passes.fisher_estimate.estimate_fisher`), three comparisons, each made
by the existing analyses on an :class:`Experts` holding every expert twice
(``<expert>|adam`` and ``<expert>|fisher``, same weights, different moments):

* ``curvature_overlap`` -- Adam v against the Fisher of the same expert, and the
  between-expert overlaps under each curvature (do both say the experts overlap
  alike?), pooled to model level by :func:`aggregate`;
* ``mask_jaccard`` -- the Jaccard of each expert's FFG masks (model-wide density)
  built from Adam v and from the Fisher;
* ``merge_score`` -- merges (OTA+FFG by default) with each curvature, scored by ``evaluate``.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import pandas as pd

from curvlens.errors import CurvlensError
from curvlens.io.moments import Moments
from curvlens.passes.analysis import aggregate, curvature_overlap, mask_overlap
from curvlens.passes.experts import Expert, Experts

#: Columns of :func:`fisher_vs_adam`.
FISHER_VS_ADAM_COLUMNS = ["analysis", "curvature", "expert_a", "expert_b", "method", "metric", "value"]
#: The OTA+FFG merge compared (the demo's).
OTA_FFG = {"epsilon": 1e-26, "ffg_density": 0.3, "fallback_to_base": True}
#: The merges made with each curvature by default: label -> (method, parameters).
DEFAULT_MERGES = {"OTA+FFG": ("ota", OTA_FFG)}
_OVERLAP_METRICS = ("cosine", "pearson_log", "spearman_log", "jaccard_top1", "jaccard_top10")


def paired_experts(experts: Experts, fisher: Mapping[str, object] | Sequence[object]) -> Experts:
    """Every expert twice, ``<name>|adam`` (its own moments) and ``<name>|fisher`` (the
    given Fisher: a moments path or :class:`Moments`), same base and weights."""
    names = experts.names
    if not isinstance(fisher, Mapping):
        fisher = list(fisher)
        if len(fisher) != len(names):
            raise CurvlensError(f"fisher has {len(fisher)} entries but there are {len(names)} experts")
        fisher = dict(zip(names, fisher))
    missing = [n for n in names if n not in fisher]
    if missing or not experts.has_moments:
        raise CurvlensError(f"fisher_vs_adam needs each expert's Adam moments and a Fisher; no Fisher for "
                            f"{missing}" if missing else "fisher_vs_adam: some experts have no Adam moments")
    pairs = []
    for e in experts.experts:
        f = fisher[e.name]
        f = f if isinstance(f, Moments) else Moments.open(f, checkpoint=e.checkpoint)
        pairs += [Expert(f"{e.name}|adam", e.checkpoint, e.moments, e.path),
                  Expert(f"{e.name}|fisher", e.checkpoint, f, e.path)]
    return Experts(experts.base, pairs, exclude=experts.exclude)


def fisher_vs_adam(experts: Experts, fisher: Mapping[str, object] | Sequence[object], *,
                   density: float = 0.3, evaluate: Callable | None = None,
                   merges: Mapping[str, tuple[str, Mapping]] | None = None, device="auto",
                   progress: bool = True) -> pd.DataFrame:
    """Compare each expert's Adam ``exp_avg_sq`` with its data Fisher.

    Parameters
    ----------
    experts : Experts
        With a base and the Adam moments.
    fisher : mapping or sequence
        Expert name -> its Fisher (a moments path such as the ``out`` given to
        :func:`estimate_fisher`, or a :class:`Moments`), or one per expert in order.
    density : float
        Model-wide FFG density of the masks compared.
    evaluate : callable, optional
        ``evaluate(checkpoint) -> DataFrame`` with ``capability`` and ``accuracy``
        (or ``score``), e.g. ``zoo.evaluate``. Without it no merge is made.
    merges : mapping, optional
        The merges made with each curvature, label -> (method, parameters); default
        :data:`DEFAULT_MERGES`, the demo's OTA+FFG (``ffg_density`` 0.3); e.g. add
        ``{"Fisher": ("fisher", {})}`` for Fisher-weighted averaging.
    device, progress
        As everywhere.

    Returns
    -------
    pandas.DataFrame
        ``analysis, curvature, expert_a, expert_b, method, metric, value``:

        * ``curvature_overlap`` rows: ``curvature`` ``"adam~fisher"`` (expert_a's Adam v
          against its own Fisher, expert_b empty) or ``"adam"`` / ``"fisher"`` (the
          pair expert_a, expert_b under that curvature), one row per metric of
          :func:`curvature_overlap` pooled over the model by :func:`aggregate`;
        * ``mask_jaccard`` rows: ``"adam~fisher"``, metric ``jaccard@<density>``;
        * ``merge_score`` rows (with ``evaluate``): ``curvature`` ``"adam"`` or
          ``"fisher"``, ``expert_a`` the capability, ``method`` the merge's label,
          metric ``accuracy``.

    Notes
    -----
    The mask comparison holds every expert's two FFG masks in memory (one bool per
    parameter each), and the merges are made in memory: meant for the zoo and
    models of a few hundred million parameters.
    """
    from curvlens.config.merge import merge

    both = paired_experts(experts, fisher)
    names = experts.names
    same = [(f"{n}|adam", f"{n}|fisher") for n in names]
    between = {c: [(f"{a}|{c}", f"{b}|{c}") for i, a in enumerate(names) for b in names[i + 1:]]
               for c in ("adam", "fisher")}
    rows = []
    ov = aggregate(curvature_overlap(both, pairs=same + between["adam"] + between["fisher"], device=device,
                                     progress=progress), by=())
    for r in ov.itertuples(index=False):
        a, ca = r.expert_a.rsplit("|", 1)
        b, cb = r.expert_b.rsplit("|", 1)
        curv, other = ("adam~fisher", None) if a == b else (ca, b)
        rows += [{"analysis": "curvature_overlap", "curvature": curv, "expert_a": a, "expert_b": other,
                  "metric": m, "value": float(getattr(r, m))} for m in _OVERLAP_METRICS]
    masks = aggregate(mask_overlap(both, density, pairs=same, device=device, progress=progress), by=())
    for r in masks.itertuples(index=False):
        rows.append({"analysis": "mask_jaccard", "curvature": "adam~fisher", "expert_a": r.expert_a.rsplit("|", 1)[0],
                     "expert_b": None, "metric": f"jaccard@{density:g}", "value": float(r.jaccard)})
    if evaluate is not None:
        for label, (method, params) in (DEFAULT_MERGES if merges is None else merges).items():
            for curv in ("adam", "fisher"):
                sub = both.subset([f"{n}|{curv}" for n in names])
                result = merge(sub, method, device=device, progress=progress, **dict(params))
                scores = evaluate(result.checkpoint)
                col = "accuracy" if "accuracy" in scores else "score"
                rows += [{"analysis": "merge_score", "curvature": curv, "expert_a": s.capability,
                          "expert_b": None, "method": label, "metric": "accuracy", "value": float(getattr(s, col))}
                         for s in scores.itertuples()]
    return pd.DataFrame(rows, columns=FISHER_VS_ADAM_COLUMNS)
