"""Model-wide mask thresholds: one scalar per expert from a target density.

FFG keeps, for each expert, the entries whose saliency ``v * tau^2`` is in the top
``density`` fraction *of the whole model*, so how dense each layer and role ends up
is an outcome, not a setting. That needs the model-wide quantile of hundreds of
millions of saliencies, found here in one streaming pass with
:class:`curvlens.math.quantile.TopKSketch` (a histogram over float bit patterns:
memory independent of model size; the threshold is exact up to one histogram bin
whose share of entries is reported as ``max_density_error``).

The merge engine (``ota`` with ``ffg_density``) and the mask analyses use the same
function, so a mask analysed is the mask merged.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from curvlens.errors import CurvlensError
from curvlens.math.blocks import block_size, blocks
from curvlens.math.compress import rank1, rank_r
from curvlens.streams.experts import Experts, TensorGroup

CRITERIA = ("fisher", "magnitude")


def compress_moments(moments, rank1_approx=False, rank=None):
    """Moments as OTA sees them: 2-D tensors optionally replaced by their rank-1
    (AdaFactor) or rank-r approximation; vectors are already O(n) and kept.

    ``rank1_approx`` and ``rank`` are one value for all experts or a list per expert.
    """
    if moments is None:
        return None
    n = len(moments)
    r1s = _per_expert(rank1_approx, n, "rank1_approx")
    ranks = _per_expert(rank, n, "rank")
    out = []
    for v, r1, r in zip(moments, r1s, ranks):
        if v.ndim != 2 or not (r1 or r):
            out.append(v)
        else:
            out.append(rank1(v) if r1 else rank_r(v, int(r)))
    return out


def mask_scores(group: TensorGroup, criterion: str = "fisher", moments=None) -> list[torch.Tensor]:
    """Per-expert scores whose top entries a mask keeps.

    ``fisher``: saliency ``v * tau^2`` (the diagonal-Fisher estimate of the loss rise
    when that entry of the edit is reverted); ``magnitude``: ``|tau|``.
    """
    taus = group.task_vectors
    if criterion == "magnitude":
        return [t.abs() for t in taus]
    if criterion != "fisher":
        raise CurvlensError(f"criterion={criterion!r} is not valid; expected one of {CRITERIA}")
    moments = group.moments if moments is None else moments
    if moments is None:
        raise CurvlensError(f"{group.name}: the fisher criterion needs second moments")
    return [v * t.square() for v, t in zip(moments, taus)]


def score_chunks(group: TensorGroup, criterion: str = "fisher", *, chunk: int = 1 << 22):
    """Yield ``(i, scores)``: expert ``i``'s mask scores, ``chunk`` entries at a time.

    The same numbers as :func:`mask_scores`, computed from the stored dtypes one
    cache-sized block at a time (:mod:`curvlens.math.blocks`) into one reused fp32
    buffer: consume each chunk before asking for the next.
    """
    if criterion not in CRITERIA:
        raise CurvlensError(f"criterion={criterion!r} is not valid; expected one of {CRITERIA}")
    if group.base is None:
        raise CurvlensError(f"{group.name}: task vectors need a base model")
    if criterion == "fisher" and group.moments is None:
        raise CurvlensError(f"{group.name}: the fisher criterion needs second moments")
    fb = group.base.reshape(-1)
    n = fb.numel()
    size = block_size(fb.device)
    buf = torch.empty(min(chunk, n), dtype=torch.float32, device=fb.device)
    for i, e in enumerate(group.experts):
        fe = e.reshape(-1)
        fv = group.moments[i].reshape(-1) if criterion == "fisher" else None
        for start in range(0, n, chunk):
            out = buf[: min(n, start + chunk) - start]
            for sl in blocks(out.numel(), size):
                ix = slice(start + sl.start, start + sl.stop)
                tau = fe[ix].float() - fb[ix].float()
                if fv is None:
                    torch.abs(tau, out=out[sl])
                else:
                    torch.mul(fv[ix].float(), tau.square_(), out=out[sl])
            yield i, out


def sketch_scores(experts: Experts, criterion: str = "fisher", *, rank1_approx: bool = False,
                  rank: int | None = None, device="auto", progress: bool = True) -> list:
    """One streaming pass: a :class:`~curvlens.math.quantile.TopKSketch` of every
    expert's mask scores over the whole model (one per expert, in order)."""
    from curvlens.math.quantile import TopKSketch

    sketches = [TopKSketch() for _ in experts.names]
    names = experts.tensor_names(floating_only=True)
    # rank-1/rank-r moments need whole fp32 tensors; otherwise score block by block
    compressed = bool(rank1_approx or rank)
    for g in experts.iter_tensors(names, device=device, moments=criterion == "fisher",
                                  dtype=torch.float32 if compressed else None,
                                  progress=progress, desc=f"{criterion} thresholds"):
        if compressed:
            scores = mask_scores(g, criterion, compress_moments(g.moments, rank1_approx, rank))
            for sk, sc in zip(sketches, scores):
                sk.update(sc)
        else:
            for i, sc in score_chunks(g, criterion):
                sketches[i].update(sc)
    return sketches


def _per_expert(value, n: int, label: str) -> list:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise CurvlensError(f"{label} has {len(value)} entries but there are {n} experts")
        return list(value)
    return [value] * n


def model_thresholds(
    experts: Experts,
    density: float | Sequence[float],
    *,
    criterion: str = "fisher",
    rank1_approx: bool = False,
    rank: int | None = None,
    device: str | torch.device | None = "auto",
    progress: bool = True,
):
    """One pass over the model: the score threshold per expert that keeps ``density``.

    Parameters
    ----------
    experts : Experts
        Needs a base (task vectors) and, for ``fisher``, moments.
    density : float or sequence of float
        Target fraction of entries kept, model-wide, per expert (in (0, 1]).
    criterion : {"fisher", "magnitude"}
    rank1_approx, rank
        Score with compressed moments (as OTA does when asked to).

    Returns
    -------
    pandas.DataFrame
        One row per expert: ``expert, criterion, density, threshold, kept, total,
        realized_density, max_density_error``.
    """
    import pandas as pd

    if experts.base is None:
        raise CurvlensError("model-wide mask thresholds need a base model (task vectors)")
    densities = [float(d) for d in _per_expert(density, len(experts), "density")]
    for name, d in zip(experts.names, densities):
        if not 0.0 < d <= 1.0:
            raise CurvlensError(f"density for expert {name!r} must be in (0, 1], got {d}")
    sketches = sketch_scores(experts, criterion, rank1_approx=rank1_approx, rank=rank, device=device,
                             progress=progress)
    rows = []
    for name, d, sk in zip(experts.names, densities, sketches):
        t, kept, total, err = sk.threshold(d)
        rows.append({"expert": name, "criterion": criterion, "density": d, "threshold": float(t),
                     "kept": int(kept), "total": int(total),
                     "realized_density": kept / total if total else float("nan"),
                     "max_density_error": float(err)})
    return pd.DataFrame(rows)
