"""``merge``: merge experts with a registered method, streaming one tensor at a time.

The front door of every merge (``cl.merge``, ``curvlens merge``, the studies):
it checks the request, resolves the method's parameters, decides what happens to
each tensor (``tensors`` rules), states the merge as the YAML saved beside the
weights (:func:`~curvlens.config.merge_config.merge_yaml`) with its tokenizer
files (:mod:`curvlens.config.tokenizer`), and hands the
:class:`~curvlens.passes.merge.MergeJob` to the driver
(:func:`~curvlens.passes.merge.run_merge`), which streams and writes it.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from curvlens.config.merge_config import merge_yaml
from curvlens.config.options import TokenizerOptions, WriteOptions
from curvlens.config.param_settings import VaryingParams
from curvlens.config.tokenizer import tokenizer_files
from curvlens.errors import CurvlensError
from curvlens.io.atomic import claim_output
from curvlens.io.checkpoint import PathLike
from curvlens.io.dtypes import parse_dtype
from curvlens.math.methods import get_method, resolve_params
from curvlens.math.methods.inputs import check_arity
from curvlens.math.methods.params import per_tensor_keys
from curvlens.passes.experts import Experts
from curvlens.passes.merge import (
    MergeJob, OutputFiles, PerTensorParams, left_out_rows, plan_tensors, run_merge, taken_from,
)
from curvlens.passes.merge_result import MergeResult
from curvlens.passes.preflight import level_warning, preflight
from curvlens.runtime import resolve_device, use_threads

__all__ = ["merge"]


#: Heads a saved config when parameters varied by a Python callable, which YAML cannot state.
_CALLABLE_NOTE = ("# curvlens: parameters that vary by tensor came from a Python callable (tensor_params); this "
                  "config states only the constant ones and does not re-run the same merge\n")


def merge(
    experts: Experts,
    method: str,
    out: PathLike | None = None,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = None,
    input_dtype: str | torch.dtype | None = None,
    tensors=None,
    tensor_params=None,
    threads: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    writing: WriteOptions | None = None,
    tokenizer: TokenizerOptions | None = None,
    selection: str = "auto",
    **params,
) -> MergeResult:
    """Merge ``experts`` with ``method``, streaming one tensor at a time.

    Parameters
    ----------
    experts : Experts
        Base (if the method uses one), experts and (for fisher/ota) moments.
    method : str
        A registered method: see :func:`curvlens.list_methods`.
    out : path, optional
        Write the merged model here as an HF dir (config/tokenizer copied from the
        base or first expert, plus ``merge_report.csv`` and the merge config). Without
        it the merged tensors are kept in memory (fine for small models only).
    device : str
        ``"auto"``: CUDA when present. The math is fp32 on this device.
    dtype : str or torch.dtype, optional
        Output dtype of floating tensors; default: each tensor's dtype in the
        experts (promoted when experts store it differently, e.g. bf16 and fp32
        give fp32), whatever the base's. Integer and bool tensors keep theirs.
        A merged value the output dtype cannot hold (beyond fp16's 65504) is an
        error, never an Inf.
    input_dtype : str or torch.dtype, optional
        Round every floating input (base and experts, not moments) to this dtype
        before merging, as mergekit reads inputs in its config's ``dtype``.
    tensors : mapping or list of (pattern, action), optional
        Per-tensor control, first matching pattern first (patterns of
        :mod:`curvlens.tensor_filter`): ``"drop"`` leaves the tensor out of the
        merged model, ``"base"`` or an expert's name takes it unchanged from that
        model, ``"merge"`` merges it. E.g. ``{"classifier": "drop", "*.pooler.*":
        "base"}`` merges the shared body and keeps no task's head. Tensors the
        Experts ``exclude`` are left out unless a rule takes them from a model.
        Neither the model-wide FFG selection nor the report's mask columns see
        tensors that are not merged.
    tensor_params : callable, optional
        ``tensor_params(name) -> {param: value}``: parameters that vary by tensor
        (mergekit's gradients and filters,
        :class:`curvlens.config.param_settings.VaryingParams`), resolved with
        ``params`` for each tensor.
    threads : int, optional
        Torch intra-op threads on a CPU for every pass of this merge; default
        :func:`curvlens.runtime.get_threads` (1: see :mod:`curvlens.runtime`).
    progress : bool
        Show progress bars.
    overwrite : bool
        Replace an existing ``out``.
    writing : WriteOptions, optional
        Shard size and the config text saved beside the weights.
    tokenizer : TokenizerOptions, optional
        Which tokenizer is written beside the weights (mergekit's
        ``tokenizer_source``, ``chat_template``, ``pad_to_multiple_of``).
    selection : {"auto", "exact", "scout"}
        How a model-wide selection (``ffg_density``) is found, always exactly:
        ``"exact"`` in two reads (:func:`curvlens.passes.thresholds.model_selections`),
        ``"scout"`` in one read bracketed by a small sample
        (:func:`curvlens.passes.scout.scout_selections`), ``"auto"`` the scout
        where the files allow sampling them (safetensors) and the moments are
        not compressed.
    **params
        The method's parameters (per-expert ones as a scalar or a list). A
        method's model-wide parameter (``ota``'s ``ffg_density``) becomes an exact
        selection per expert in two streaming passes first.

    Returns
    -------
    MergeResult
    """
    with use_threads(threads):
        if not isinstance(experts, Experts):
            raise CurvlensError(f"merge takes an Experts (e.g. Experts.from_dirs(base, [dirs])); "
                                f"got a {type(experts).__name__}")
        if not isinstance(method, str):
            raise CurvlensError(f"method must be a method name (str); got {method!r}")
        m = get_method(method)
        # parameters that vary by tensor are checked per tensor (a required one, slerp's t, too)
        p = resolve_params(m, params, len(experts), per_tensor=per_tensor_keys(tensor_params, experts.tensor_names()))
        if m.needs_base and experts.base is None:
            raise CurvlensError(f"merge method {method!r} needs a base model; the Experts have none")
        check_arity(m, experts.base is not None, len(experts))  # e.g. slerp: one expert
        if m.needs_moments and not experts.has_moments:
            lacking = [e.name for e in experts.experts if e.moments is None]
            raise CurvlensError(f"merge method {method!r} needs second moments; expert(s) {lacking} have none")
        if m.needs_moments:  # experts trained differently: say so before their levels decide the merge
            warn = level_warning(preflight(experts), m, p)
            if warn:
                warnings.warn(warn, stacklevel=2)
        out_dtype, in_dtype = parse_dtype(dtype), parse_dtype(input_dtype)
        dev = resolve_device(device)
        writing, tokenizer = writing or WriteOptions(), tokenizer or TokenizerOptions()
        tok_source = tokenizer.source if tokenizer.source not in (None, "base", "union") else None
        if out is not None:  # before any work: never onto or into an input of the job
            claim_output(out, [experts, tok_source], overwrite=overwrite)
        per_tensor = PerTensorParams(m, params, p, tensor_params, len(experts))
        if in_dtype is not None:
            experts = experts.rounded(in_dtype)
        actions, merged = plan_tensors(experts, tensors)
        files = None
        if out is not None:
            # the config states what was requested (re-runnable), before model-wide thresholds
            text = writing.config_text or ((_CALLABLE_NOTE if tensor_params is not None and not isinstance(
                tensor_params, VaryingParams) else "") + merge_yaml(m, experts, p, out_dtype, tensors, in_dtype))
            tok_dir, tok_files = tokenizer_files(experts, experts.model_dir(), tokenizer)
            files = OutputFiles(experts.model_dir(), text, writing.max_shard_size, tok_files, tok_dir,
                                inputs=[*merged.input_paths(), *([Path(tok_source)] if tok_source else [])])
        elif tokenizer.given:
            raise CurvlensError("tokenizer options (source, chat_template, pad_to_multiple_of) concern the "
                                "written model's tokenizer: give an output directory")
        job = MergeJob(method, m, merged, dict(p), per_tensor, taken_from(experts, actions),
                       left_out_rows(experts, actions), experts.names, out_dtype, in_dtype, selection)
        return run_merge(job, out, files, device=dev, progress=progress, overwrite=overwrite)
