"""``sparse_soup``: average sparse experts so that the soup keeps their sparsity mask.

Zimmer et al. (sparse model soups): models pruned to the same mask can be averaged
and the average keeps that mask. This driver checks, tensor by tensor, whether the
experts' zero patterns agree, reports where they do not, and writes a soup whose
zeros are exactly the chosen mask (:mod:`curvlens.math.sparse_soup` has the
rules), streaming one tensor at a time through the merge's writer.

A disagreement is never accepted silently: with ``mask="agree"`` (the default) it
is an error (nothing is written; the error carries the full report), with
``"union"`` or ``"intersection"`` a warning names the tensors, and the report
always says where.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from curvlens.arguments import weights_arg
from curvlens.errors import CurvlensError
from curvlens.io.checkpoint import Checkpoint, PathLike
from curvlens.io.dtypes import output_dtype, parse_dtype
from curvlens.io.writer import ModelWriter
from curvlens.math.merge_report import cast_checked
from curvlens.math.sparse_soup import MASK_RULES, soup_support, sparse_average, zero_pattern
from curvlens.runtime import use_threads
from curvlens.passes.analysis_common import need_experts
from curvlens.passes.experts import Experts
from curvlens.runtime import resolve_device

_BASE_COLUMNS = ["name", "layer", "role", "numel", "shared_zeros", "disagreeing", "agree"]
_TAIL_COLUMNS = ["soup_zeros", "cancelled"]


def _columns(names: Sequence[str]) -> list[str]:
    return [*_BASE_COLUMNS, *(f"zeros_{n}" for n in names), *_TAIL_COLUMNS]


@dataclass
class SparseSoupResult:
    """A sparse soup and its per-tensor sparsity report.

    Attributes
    ----------
    checkpoint : Checkpoint
        The soup (on disk when ``out`` was given, else in memory).
    report : pandas.DataFrame
        One row per tensor: ``name, layer, role, numel, shared_zeros`` (zero in
        every expert), ``disagreeing`` (zero in some experts, not all), ``agree``,
        ``zeros_<expert>`` (per expert), ``soup_zeros`` (zeros written) and
        ``cancelled`` (kept entries whose average came out exactly 0, e.g. +a and
        -a, or that underflowed the output dtype).
    mask : str
        The mask rule used.
    weights : list of float
    path : Path or None
    method : str
        ``"sparse_soup"`` (so a merge table labels it).
    """

    checkpoint: Checkpoint
    report: Any
    mask: str
    weights: list
    path: Path | None = None
    method: str = "sparse_soup"

    @property
    def disagreements(self) -> pd.DataFrame:
        """The report's rows where the experts' zero patterns differ."""
        return self.report[~self.report["agree"]].reset_index(drop=True)


def sparsity_check(experts: Experts, names: Sequence[str] | None = None, *, device="auto",
                   progress: bool = True) -> pd.DataFrame:
    """Do the experts' zero patterns agree? One row per floating tensor, nothing written.

    Returns
    -------
    pandas.DataFrame
        ``name, layer, role, numel, shared_zeros, disagreeing, agree,
        zeros_<expert>...`` (see :class:`SparseSoupResult`).

    Examples
    --------
    >>> from curvlens.passes.experts import Expert
    >>> a = {"w": torch.tensor([0.0, 1.0, 2.0])}
    >>> b = {"w": torch.tensor([0.0, 0.0, 5.0])}
    >>> ex = Experts(None, [Expert("a", Checkpoint.open(a)), Expert("b", Checkpoint.open(b))])
    >>> sparsity_check(ex, device="cpu", progress=False)[["name", "shared_zeros", "disagreeing", "agree"]]
      name  shared_zeros  disagreeing  agree
    0    w             1            1  False
    """
    need_experts(experts, "sparsity_check")
    floating = [n for n in (names or experts.tensor_names()) if experts.reference.dtype(n).is_floating_point]
    rows = []
    for g in experts.iter_tensors(floating, device=device, dtype=None, moments=False, base=False,
                                  progress=progress, desc="sparsity check"):
        rows.append(_row(g, experts.names, zero_pattern(g.experts)))
    return pd.DataFrame(rows, columns=_columns(experts.names)[:-len(_TAIL_COLUMNS)])


def sparse_soup(experts: Experts, out: PathLike | None = None, *, mask: str = "agree",
                weights: Sequence[float] | None = None, dtype: str | torch.dtype | None = None,
                device="auto", overwrite: bool = False, max_shard_size: int | str = "1GB",
                threads: int | None = None, progress: bool = True) -> SparseSoupResult:
    """Average sparse experts into a soup whose zeros are exactly their shared mask.

    Parameters
    ----------
    experts : Experts
        The ingredients (a base, when present, is not read; moments are not needed:
        ``Experts.from_dirs(None, dirs, moments=False)``). Tensors the Experts
        ``exclude`` are left out of the soup. Integer tensors are taken from the
        first expert.
    out : path, optional
        Write the soup here as an HF dir (config/tokenizer of the first expert,
        plus ``sparsity_report.csv``), atomically; else keep it in memory.
    mask : {"agree", "union", "intersection"}
        ``"agree"``: the experts must share their zero pattern in every tensor;
        any disagreement is a :class:`CurvlensError` listing the tensors (nothing
        is written; the error's ``report`` attribute holds the full report).
        ``"union"``: keep every entry some expert keeps; zeros exactly where all
        experts are zero. ``"intersection"``: keep only entries every expert keeps;
        zero wherever any expert is zero. Both warn when masks disagree.
    weights : sequence of float, optional
        Per-expert weights of the average (default uniform); a pruned entry
        counts as 0 in it, as in plain averaging.
    dtype : str or torch.dtype, optional
        Output dtype of floating tensors (default: the experts' own).
    device, overwrite, max_shard_size, threads, progress
        As in :func:`curvlens.merge`.

    Returns
    -------
    SparseSoupResult

    Examples
    --------
    >>> from curvlens.passes.experts import Expert
    >>> a = {"w": torch.tensor([0.0, 1.0, 0.0, 4.0])}
    >>> b = {"w": torch.tensor([0.0, 3.0, 0.0, 2.0])}
    >>> ex = Experts(None, [Expert("a", Checkpoint.open(a)), Expert("b", Checkpoint.open(b))])
    >>> sparse_soup(ex, device="cpu", progress=False).checkpoint["w"]
    tensor([0., 2., 0., 3.])
    """
    need_experts(experts, "sparse_soup")
    if mask not in MASK_RULES:
        raise CurvlensError(f"mask must be one of {list(MASK_RULES)}; got {mask!r}")
    names = experts.names
    weights = [1.0] * len(names) if weights is None else weights_arg("weights", weights, len(names))
    out_dtype = parse_dtype(dtype)
    dev = resolve_device(device)
    order = experts.tensor_names()
    writer_cm = nullcontext()
    if out is not None:
        plan = [(n, experts.shape(n), output_dtype(experts.stored_dtype(n), out_dtype)) for n in order]
        # config and tokenizer of the first expert (a base, when present, is not read)
        writer_cm = ModelWriter(out, experts.model_dir(names[0]), max_shard_size=max_shard_size,
                                overwrite=overwrite, plan=plan, inputs=experts.input_paths())
    rows, kept = [], {}
    with use_threads(threads), writer_cm as writer:
        for g in experts.iter_tensors(order, device=dev, dtype=None, moments=False, base=False,
                                      progress=progress, desc=f"sparse soup ({mask})"):
            target = output_dtype(experts.stored_dtype(g.name), out_dtype)
            if not g.experts[0].is_floating_point():
                t = g.experts[0].to("cpu")
                rows.append({"name": g.name, "layer": g.layer, "role": g.role, "numel": t.numel(), "agree": True})
            else:
                pattern = zero_pattern(g.experts)
                keep = soup_support(g.experts, mask)
                t = cast_checked(sparse_average(g.experts, weights, keep), target, g.name)
                soup_zeros = int((t == 0).sum())
                row = _row(g, names, pattern)
                row.update(soup_zeros=soup_zeros, cancelled=soup_zeros - int((~keep).sum()))
                rows.append(row)
            if writer is not None:
                writer.add(g.name, t, made_by=f"the sparse soup with weights {weights}")
            else:
                kept[g.name] = t
        report = pd.DataFrame(rows, columns=_columns(names))
        report["agree"] = report["agree"].astype(bool)
        bad = report[~report["agree"]]
        if len(bad):
            listing = "; ".join(f"{r.name}: {int(r.disagreeing)} of {int(r.numel)} entries zero in some "
                                f"experts only" for r in bad.head(5).itertuples())
            more = f" (and {len(bad) - 5} more tensors)" if len(bad) > 5 else ""
            if mask == "agree":
                err = CurvlensError(f"sparse_soup: the experts' zero patterns disagree in {len(bad)} of "
                                    f"{len(report)} tensors: {listing}{more}. Nothing was written; choose "
                                    "mask='union' (zeros where all are zero) or 'intersection' (zeros where "
                                    "any is zero), or see curvlens.passes.sparse_soup.sparsity_check")
                err.report = report
                raise err
            warnings.warn(f"sparse_soup: the experts' zero patterns disagree in {len(bad)} tensors ({listing}"
                          f"{more}); mask={mask!r} decides them (SparseSoupResult.disagreements lists them)",
                          stacklevel=2)
        if writer is not None:
            writer.extra_files["sparsity_report.csv"] = report.to_csv(index=False)
    ckpt = Checkpoint.open(out) if out is not None else Checkpoint.open(kept)
    report["layer"] = report["layer"].astype("Int64")
    return SparseSoupResult(ckpt, report, mask, weights, Path(out) if out is not None else None)


def _row(g, names, pattern: dict) -> dict:
    row = {"name": g.name, "layer": g.layer, "role": g.role, "numel": g.experts[0].numel(),
           "shared_zeros": pattern["shared_zeros"], "disagreeing": pattern["disagreeing"],
           "agree": pattern["disagreeing"] == 0}
    row.update({f"zeros_{n}": z for n, z in zip(names, pattern["zeros"])})
    return row
