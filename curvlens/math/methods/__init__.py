"""Merge methods: pure per-tensor functions in a registry, one module per family.

==================  =========================================================
module              what it holds
==================  =========================================================
``registry``        :class:`MergeMethod`, :func:`register`, :func:`get_method`,
                    :func:`list_methods`, :func:`method_params`, :func:`resolve_params`, :class:`MaskCounts`
``params``          :class:`ParamSpec`, validators, parameters methods share
``inputs``          the checks every method's inputs get (run by the registry)
``sparsify``        top-k / random-drop sparsifiers, TIES's disjoint mean
``linear``          ``linear``
``task_arithmetic`` ``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``
``breadcrumbs``     ``breadcrumbs``, ``breadcrumbs_ties`` (outlier-band sparsification)
``della``           ``della``, ``della_linear`` (magnitude-ranked random drop)
``model_stock``     ``model_stock``
``spherical``       ``slerp``, ``nuslerp``, ``multislerp``, ``karcher``
``sce``             ``sce``
``fusion``          ``arcee_fusion``
``passthrough``     ``passthrough``
``fisher_merge``    ``fisher``
``ota``             ``ota`` (with FFG masks)
==================  =========================================================

A new method is a new module: a kernel decorated with :func:`register`, imported
below. The exact semantics, and where they match mergekit 0.1.5 and the OTA
authors' fork, are in ``docs/merge_methods.md``.

Examples
--------
>>> import torch
>>> base = torch.zeros(3)
>>> experts = [torch.tensor([1.0, -2.0, 3.0]), torch.tensor([3.0, 1.0, -1.0])]
>>> get_method("ties")(base, experts, None)
tensor([ 2., -2.,  3.])
>>> p = resolve_params("linear", {"weight": [1, 3]}, n_experts=2)
>>> p["weight"], p["normalize"]
([1.0, 3.0], True)
"""
from curvlens.math.methods import (
    breadcrumbs, della, fisher_merge, fusion, linear, model_stock, ota, passthrough, sce, spherical, task_arithmetic,
)
from curvlens.math.methods.params import ParamSpec
from curvlens.math.methods.registry import (
    MaskCounts, MergeMethod, ModelWideSelection, get_method, list_methods, method_params, register, resolve_params,
)

#: The modules whose kernels register on import (named so the imports are used).
FAMILIES = (task_arithmetic, breadcrumbs, della, linear, model_stock, spherical, sce, fusion, passthrough,
            fisher_merge, ota)

__all__ = ["MaskCounts", "MergeMethod", "ModelWideSelection", "ParamSpec", "get_method", "list_methods", "method_params",
           "register", "resolve_params"]
