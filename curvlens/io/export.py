"""``export_moments``: write a live optimizer's second moments keyed by name.

Any training loop can produce curvlens's input with one call at the end of
training; the file has the layout of the OTA paper's released experts.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from curvlens.errors import CurvlensError
from curvlens.io.checkpoint import PathLike
from curvlens.io.writer import write_tensor_file


def export_moments(optimizer: torch.optim.Optimizer, model: torch.nn.Module, path: PathLike) -> Path:
    """Write the optimizer's ``exp_avg_sq`` as fp32 safetensors keyed by parameter name.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        An Adam-family optimizer that has taken at least one step.
    model : torch.nn.Module
        The model whose parameters the optimizer updates (names come from
        ``model.named_parameters()``).
    path : path
        Output file, conventionally ``<expert_dir>/export/exp_avg_sq.safetensors``.
        Parent directories are created.

    Returns
    -------
    pathlib.Path
        The written file. Its metadata records ``step``, ``betas`` and ``eps``.

    Raises
    ------
    CurvlensError
        If a trainable parameter has no ``exp_avg_sq`` (not Adam, or never stepped),
        or a moment is NaN or Inf (nothing is written).
    """
    names = {id(p): n for n, p in model.named_parameters()}
    tensors: dict[str, torch.Tensor] = {}
    steps, betas, eps = set(), set(), set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise CurvlensError("optimizer holds a parameter that is not in model.named_parameters()")
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" not in state:
                if p.requires_grad:
                    raise CurvlensError(
                        f"parameter {names[id(p)]!r} has no 'exp_avg_sq' in the optimizer state; "
                        "export after at least one Adam/AdamW step"
                    )
                continue
            tensors[names[id(p)]] = state["exp_avg_sq"].detach().to("cpu", torch.float32).contiguous()
            if "step" in state:
                steps.add(int(float(state["step"])))
            if "betas" in group:
                betas.add(tuple(float(b) for b in group["betas"]))
            if "eps" in group:
                eps.add(float(group["eps"]))
    if not tensors:
        raise CurvlensError("the optimizer has no second moments to export")
    meta = {"format": "pt", "content": "adam exp_avg_sq"}
    if len(steps) == 1:
        meta["step"] = str(steps.pop())
    if len(betas) == 1:
        b = betas.pop()
        meta["betas"] = json.dumps(list(b))
        meta["beta2"] = repr(b[1])
    if len(eps) == 1:
        meta["eps"] = repr(eps.pop())
    # atomic (never a half-written file under the real name) and finite
    return write_tensor_file(tensors, path, metadata=meta, overwrite=True)
