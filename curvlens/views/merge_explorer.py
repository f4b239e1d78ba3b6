"""The merge explorer: pick a method and its parameters with sliders, see the scores.

An ``ipywidgets.VBox`` driven like the other explorers (:mod:`curvlens.views.explorers`):
``controls``, ``figure``, ``figures``, ``update()``.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import pandas as pd

from curvlens.errors import CurvlensError
from curvlens.views._common import check_frame, require_widgets
from curvlens.views.widget_output import assemble, show_figure

__all__ = ["merge_explorer", "MERGE_SLIDERS"]

#: Default parameter sliders of :func:`merge_explorer`:
#: method -> {parameter: (min, max, step, default)}.
MERGE_SLIDERS: dict[str, dict[str, tuple[float, float, float, float]]] = {
    "linear": {},
    "task_arithmetic": {"lambda": (0.0, 2.0, 0.05, 1.0)},
    "ties": {"density": (0.05, 1.0, 0.05, 0.5), "lambda": (0.0, 2.0, 0.05, 1.0)},
    "dare_linear": {"density": (0.05, 1.0, 0.05, 0.5)},
    "dare_ties": {"density": (0.05, 1.0, 0.05, 0.5)},
    "fisher": {},
    "ota": {"power": (0.1, 1.0, 0.05, 0.5), "ffg_density": (0.05, 1.0, 0.05, 1.0)},
}



def _slider_specs(methods) -> dict[str, dict[str, tuple[float, float, float, float]]]:
    if methods is None:
        return {k: dict(v) for k, v in MERGE_SLIDERS.items()}
    if isinstance(methods, Mapping):
        out = {}
        for name, params in methods.items():
            out[str(name)] = {}
            for p, spec in dict(params or {}).items():
                if len(spec) != 4:
                    raise CurvlensError(
                        f"merge_explorer: slider for {name}.{p} must be (min, max, step, "
                        f"default); got {spec!r}")
                lo, hi, step, default = map(float, spec)
                if not lo <= default <= hi or step <= 0:
                    raise CurvlensError(f"merge_explorer: slider for {name}.{p} needs "
                                        f"min <= default <= max and step > 0; got {spec!r}")
                out[str(name)][p] = (lo, hi, step, default)
        return out
    if isinstance(methods, str):
        methods = [methods]
    return {str(m): dict(MERGE_SLIDERS.get(str(m), {})) for m in methods}


def _score_table_html(table: pd.DataFrame) -> str:
    pivot = table.pivot_table(index="model", columns="capability", values="accuracy",
                              sort=False)
    pivot["mean"] = pivot.mean(axis=1)
    return pivot.to_html(float_format="{:.3f}".format, border=0,
                         classes="curvlens-scores")


def merge_explorer(run_merge: Callable[[str, dict], pd.DataFrame],
                   methods: Sequence[str] | Mapping[str, Mapping[str, Sequence[float]]] | None
                   = None, *, reference: pd.DataFrame | None = None,
                   capability_map: Mapping[str, str] | None = None, run_now: bool = True):
    """Pick a merge method and its main parameters, run it, see the scores.

    Parameters
    ----------
    run_merge : callable ``(method, params) -> DataFrame``
        Runs one merge and evaluates it, returning merge-table rows
        (``model, method, capability, accuracy, n``). Injected, so a notebook can
        pass a real merge + evaluation on the zoo and a test a fast fake.
    methods : sequence of str, or mapping method -> {param: (min, max, step, default)}
        Methods in the dropdown and their sliders (default :data:`MERGE_SLIDERS`;
        names without known sliders get none).
    reference : pandas.DataFrame, optional
        Rows shown next to every result (base model, experts).
    capability_map : mapping expert -> capability, optional
        Enables the ``normalized`` check box (score / matching expert's score;
        needs the experts' rows in ``reference``).
    run_now : bool
        Run the first method once at construction.

    Returns
    -------
    ipywidgets.VBox
        ``.controls``: ``method`` and one slider per ``"<method>.<param>"`` (plus
        ``normalized``); ``.figure``: the score plot; ``.table``: the rows shown;
        ``.status`` / ``.progress``: the progress indicator; ``.calls``: the
        ``(method, params)`` run so far (results are cached per call).
    """
    widgets = require_widgets()
    from curvlens.views.merges import merge_scores_plotly

    if not callable(run_merge):
        raise CurvlensError(f"merge_explorer: run_merge must be callable; got "
                            f"{type(run_merge).__name__}")
    specs = _slider_specs(methods)
    if not specs:
        raise CurvlensError("merge_explorer: methods is empty")
    if reference is not None:
        check_frame(reference, ["model", "capability", "accuracy"], "merge_explorer reference")
    controls: dict[str, Any] = {"method": widgets.Dropdown(options=list(specs),
                                                           value=next(iter(specs)),
                                                           description="method")}
    boxes = {}
    for m, params in specs.items():
        sliders = []
        for p, (lo, hi, step, default) in params.items():
            s = widgets.FloatSlider(value=default, min=lo, max=hi, step=step, description=p,
                                    continuous_update=False, readout_format=".2f")
            controls[f"{m}.{p}"] = s
            sliders.append(s)
        boxes[m] = widgets.VBox(sliders)
    if capability_map is not None:
        controls["normalized"] = widgets.Checkbox(value=False,
                                                  description="relative to expert")
    params_area = widgets.VBox([boxes[controls["method"].value]])
    progress = widgets.IntProgress(value=0, min=0, max=1, bar_style="", layout={"width": "160px"})
    status = widgets.Label("")
    table_html = widgets.HTML()
    out = widgets.Output()
    figures: dict[str, Any] = {}
    cache: dict[tuple, pd.DataFrame] = {}

    def current_params() -> dict:
        m = controls["method"].value
        return {p: round(controls[f"{m}.{p}"].value, 10) for p in specs[m]}

    def redraw():
        table = box.table
        if table is None:
            return
        normalized = bool(controls.get("normalized") and controls["normalized"].value)
        try:
            fig = merge_scores_plotly(table, capability_map, normalized=normalized)
        except CurvlensError as err:
            status.value = f"cannot draw: {err}"
            return
        box.figure = figures["scores"] = fig
        show_figure(out, fig)

    def run(*_):
        m = controls["method"].value
        params = current_params()
        key = (m, tuple(sorted(params.items())))
        label = f"{m}(" + ", ".join(f"{k}={v:g}" for k, v in params.items()) + ")"
        if key not in cache:
            progress.bar_style, progress.value = "info", 0
            status.value = f"running {label} ..."
            t0 = time.perf_counter()
            try:
                result = run_merge(m, dict(params))
                check_frame(result, ["model", "capability", "accuracy"],
                            "merge_explorer: run_merge's result")
            except Exception as err:  # shown in the widget; a callback must not raise
                progress.bar_style, progress.value = "danger", 1
                status.value = f"{label} failed: {type(err).__name__}: {err}"
                box.error = err
                return
            box.calls.append((m, dict(params)))
            cache[key] = result
            status.value = f"{label}: done in {time.perf_counter() - t0:.1f} s"
        else:
            status.value = f"{label}: cached"
        box.error = None
        progress.bar_style, progress.value = "success", 1
        result = cache[key]
        table = result if reference is None else pd.concat(
            [reference[~reference["model"].isin(result["model"])], result], ignore_index=True)
        box.table = table
        table_html.value = _score_table_html(table)
        redraw()

    def on_method(change):
        params_area.children = [boxes[change["new"]]]
        run()

    top = [controls["method"], params_area]
    if "normalized" in controls:
        top.append(controls["normalized"])
    box = assemble(widgets, [widgets.HBox(top), widgets.HBox([progress, status]), table_html,
                              out], controls, run, figures)
    box.progress, box.status, box.table_widget = progress, status, table_html
    box.table, box.error, box.calls = None, None, []
    controls["method"].observe(on_method, names="value")
    for name, ctl in controls.items():
        if "." in name:
            m = name.split(".", 1)[0]
            ctl.observe(lambda ch, m=m: run() if controls["method"].value == m else None,
                        names="value")
    if "normalized" in controls:
        controls["normalized"].observe(lambda ch: redraw(), names="value")
    if run_now:
        run()
    return box
