"""``MergeResult``: what a merge returns, the merged weights and a report per tensor.

Its notebook display is drawn by the views, which sit above the passes: the
entry layer (``curvlens/__init__.py``) sets :attr:`MergeResult.html_renderer`
to :func:`curvlens.views.rich.merge_result_html`, so nothing here imports a view.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

from curvlens.io.checkpoint import Checkpoint


@dataclass
class MergeResult:
    """A merged model and what happened to each tensor.

    Attributes
    ----------
    checkpoint : Checkpoint
        The merged weights (on disk when ``out`` was given, else in memory).
    report : pandas.DataFrame
        One row per tensor: ``name, layer, role, numel, source, kept_<expert>...,
        all_masked, delta_norm, rel_delta``. ``source`` says what happened to it:
        ``merged``, ``drop`` / ``excluded`` (left out of the merged model by a
        ``tensors`` rule / by the Experts' ``exclude``), or the model it was taken
        from unchanged (``base`` or an expert's name; mask columns NaN there).
        ``rel_delta`` is ``delta_norm`` over the reference's norm (the base, else
        the experts' mean), NaN where the reference is all zero (undefined; the
        views leave such cells empty) or where a taken tensor has no reference.
    method : str
    params : dict
        The resolved parameters (defaults filled in, per-expert lists).
    thresholds : pandas.DataFrame or None
        The model-wide FFG selection per expert, when ``ffg_density`` was used
        (:func:`curvlens.passes.thresholds.model_thresholds`'s columns).
    path : Path or None
    extra : dict
        ``"selections"``: the :class:`~curvlens.passes.thresholds.Selection` per
        expert behind ``thresholds`` (with the per-tensor tie quotas).
    """

    checkpoint: Checkpoint
    report: Any
    method: str
    params: dict
    thresholds: Any = None
    path: Optional[Path] = None
    extra: dict = field(default_factory=dict)

    #: ``renderer(result) -> html`` behind :meth:`_repr_html_`; set by the entry
    #: layer (the views draw it). None: notebooks show the plain repr.
    html_renderer: ClassVar[Optional[Callable[["MergeResult"], str]]] = None

    def summary(self):
        """Model-level numbers: numel-weighted kept fraction per expert and change norm."""
        import pandas as pd

        r = self.report[self.report["source"] == "merged"]
        w = r["numel"] / r["numel"].sum()
        kept = {c: float((r[c] * w).sum()) for c in r.columns if c.startswith("kept_")}
        return pd.Series({"method": self.method, **kept,
                          "all_masked": float((r["all_masked"] * w).sum()),
                          "delta_norm": float((r["delta_norm"] ** 2).sum() ** 0.5)})

    def _repr_html_(self) -> Optional[str]:
        render = type(self).html_renderer
        return render(self) if render is not None else None
