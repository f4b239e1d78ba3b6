"""The flat public API: ``import curvlens as cl`` is all a notebook needs, and every
name means one thing across layers."""
import importlib
import inspect
import pkgutil

import curvlens as cl

ANALYSES = ["curvature_stats", "curvature_overlap", "moment_compression", "pooled_moments", "log10_histogram",
            "ffg_masks", "mask_stats", "mask_overlap", "mask_thresholds", "graft_sweep", "ffg_vs_magnitude_summary",
            "interference", "predicted_loss", "compare_merges", "aggregate"]


def test_everything_a_notebook_needs_is_at_the_top():
    for name in ["Checkpoint", "Moments", "Experts", "merge", "load_merge_config", "list_methods",
                 "export_moments", "CurvlensError", *ANALYSES]:
        assert name in cl.__all__ and callable(getattr(cl, name)), name
    assert set(cl.__all__) <= set(dir(cl))
    assert cl.views.layer_role_heatmap and cl.zoo.build  # lazy submodules


def test_views_export_drawing_functions_and_explorers_only():
    for name in cl.views.__all__:
        obj = getattr(cl.views, name)
        assert name in ("OKABE_ITO",) or callable(obj), name
    assert "FRAME_KEYS" not in cl.views.__all__ and "result_html" not in cl.views.__all__


def _public_functions():
    """name -> modules defining a public function of that name (below curvlens/)."""
    seen: dict[str, set[str]] = {}
    for info in pkgutil.walk_packages(cl.__path__, "curvlens."):
        if ".zoo" in info.name or info.name.endswith("__main__"):
            continue
        mod = importlib.import_module(info.name)
        for name, obj in vars(mod).items():
            if not name.startswith("_") and inspect.isfunction(obj) and obj.__module__ == info.name:
                seen.setdefault(name, set()).add(info.name.split(".")[1])
    return seen


def test_a_function_name_means_one_thing_across_layers():
    clashes = {n: layers for n, layers in _public_functions().items() if len(layers) > 1}
    assert not clashes, clashes
