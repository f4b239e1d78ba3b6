"""OTA (Optimization-Trajectory-Aware merging) with Fast Fisher Grafting masks: a
curvature-weighted (v**p) merge of FFG-masked task vectors, with the options of
the OTA authors' fork (docs/merge_methods.md says where curvlens differs)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from curvlens.errors import CurvlensError, check_choice
from curvlens.math.blocks import block_size, blocks
from curvlens.math.compress import rank1, rank_r
from curvlens.math.methods.inputs import moment_block
from curvlens.math.methods.native_paths import ota_native, settle_ota_ties
from curvlens.math.methods.params import (
    ParamSpec, boolean, int_at_least, lower_str, path_or_none, real,
)
from curvlens.math.methods.registry import ModelWideSelection, register
from curvlens.math.methods.sparsify import disjoint_mean_parts, one_where_zero, topk_keeper
from curvlens.math.saliency import saliency
from curvlens.roles import param_role
from curvlens.math.topk import TopKKeeper, above, at_least

Tensor = torch.Tensor


def _fork_choice(label: str, value):
    if value is None:
        return None
    value = lower_str(label, value)
    check_choice(label, value, _FORK_COMBINES)
    return value


def _name_or_none(label: str, value):
    if value is not None and not isinstance(value, str):
        raise CurvlensError(f"{label} must be a tensor name (str) or None; got {value!r}")
    return value


_FORK_COMBINES = ("precond", "linear", "ties")

_OTA_PARAMS = (
    ParamSpec("power", 0.5, "Exponent p of the curvature weight v**p, > 0.",
              validate=real(lo=0.0, lo_open=True)),
    ParamSpec("epsilon", 1e-8, "Added to every weight (and to the global-normalise mean), >= 0.",
              validate=real(lo=0.0)),
    ParamSpec("normalise", "none",
              "'global': divide each expert's v**p*scaling by its mean over this tensor.",
              choices=("none", "global"), validate=lower_str),
    ParamSpec("precond_threshold", None,
              "The fork's mask threshold: on v*tau**2 with a base, on v without one.",
              per_expert=True, validate=real(allow_none=True)),
    ParamSpec("ffg_density", None,
              "FFG density in (0, 1]; the driver turns it into a model-wide ffg_threshold. "
              "Called directly: top-k of v*tau**2 within this tensor.",
              per_expert=True, validate=real(lo=0.0, lo_open=True, hi=1.0, allow_none=True)),
    ParamSpec("ffg_threshold", None,
              "FFG saliency threshold t_i (mask v*tau**2 >= t_i); set by the driver from ffg_density.",
              per_expert=True, validate=real(allow_none=True)),
    ParamSpec("ffg_ties", None,
              "With ffg_threshold: keep v*tau**2 > t_i plus the first ffg_ties entries equal to t_i "
              "(set per tensor by the driver so that ffg_density keeps exactly its share).",
              per_expert=True, validate=int_at_least(0, allow_none=True)),
    ParamSpec("fallback_to_base", False,
              "Entries every expert masked: base if true, else the plain mean of the experts.",
              validate=boolean),
    ParamSpec("rank1_approx", False, "Replace a 2-D v by its rank-1 (AdaFactor) approximation.",
              per_expert=True, validate=boolean),
    ParamSpec("rank", None, "Replace a 2-D v by its rank-r truncated SVD, clipped at 0.",
              per_expert=True, validate=int_at_least(1, allow_none=True)),
    ParamSpec("scaling_factor", 1.0, "Multiplies the expert's v**p, > 0.",
              per_expert=True, validate=real(lo=0.0, lo_open=True)),
    ParamSpec("combine", "precond",
              "curvlens's combine of masked task vectors (with a base): precond | linear | ties.",
              choices=("precond", "linear", "ties"), validate=lower_str),
    ParamSpec("masked_task_vector_merge_method", None,
              "The fork's combine, computed as the fork does (precond | linear | ties; linear and ties "
              "see unmasked task vectors unless rescale); None: use combine.",
              validate=_fork_choice),
    ParamSpec("ties_density", None,
              "The fork's TIES trim (masked_task_vector_merge_method: ties): keep |tau| >= its "
              "int(density * numel)-th largest value; None or >= 1 keeps all.",
              validate=real(lo=0.0, allow_none=True)),
    ParamSpec("preconditioner_path", None,
              "Path of the expert's exp_avg_sq file; read by the driver, ignored here.",
              per_expert=True, validate=path_or_none),
    ParamSpec("rescale", False,
              "The fork's rescaling of each masked task vector to its unmasked hybrid norm (needs a base).",
              validate=boolean),
    ParamSpec("approximate_norm", False,
              "With rescale: spectral norms by 10 power iterations (from a fixed seed) instead of exactly.",
              validate=boolean),
    ParamSpec("rescale_relative_threshold", 1e-6,
              "With rescale: a masked norm at or below this share of the unmasked one zeroes the task vector.",
              validate=real(lo=0.0)),
    ParamSpec("tensor_name", None,
              "The tensor's name, set by the driver: the fork skips rank for embeddings and LM heads and "
              "takes a different rescale norm for lm_head.weight / model.embed_tokens.weight.",
              validate=_name_or_none),
)


@register(
    "ota",
    params=_OTA_PARAMS,
    description="OTA: curvature-weighted (v**p) merge of FFG-masked task vectors.",
    needs_base=False,
    needs_moments=True,
    model_wide=ModelWideSelection(density="ffg_density", threshold="ffg_threshold", ties="ffg_ties",
                                  criterion="fisher", rank1="rank1_approx", rank="rank"),
    name_param="tensor_name",
)
def ota(base, experts, moments, p, *, rng, counts) -> Tensor:
    """Optimization-Trajectory-Aware merge, with optional FFG masks.

    Per expert ``i``: ``v_i`` (optionally rank-1 or rank-r compressed) gives the
    weight ``W_i = (normalise(v_i**p * scaling_i) + epsilon) * m_i``, where the
    mask ``m_i`` comes from ``ffg_threshold`` (``v_i tau_i**2 >= t_i``), else
    ``ffg_density`` (per-tensor top-k of ``v_i tau_i**2``), else
    ``precond_threshold`` (the fork's rule), else is all ones.

    * no base: ``sum_i W_i theta_i / sum_i W_i``;
    * base, ``combine='precond'``: ``theta0 + sum_i W_i tau_i / sum_i W_i``;
    * base, ``combine='linear'``: ``theta0 + sum_i m_i tau_i / N``;
    * base, ``combine='ties'``: ``theta0 +`` TIES sign election and disjoint mean
      of the ``m_i tau_i``.

    When any mask is in use, entries with ``sum_i W_i <= 1.1 N epsilon`` (every
    expert masked) become ``theta0`` if ``fallback_to_base`` and there is a base,
    else the plain mean of the experts. Entries with ``sum_i W_i == 0`` and no
    mask (possible only with ``epsilon=0``) get the plain mean too.

    Examples
    --------
    >>> from curvlens.math.methods import get_method
    >>> base = torch.zeros(3)
    >>> experts = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 4.0, 5.0])]
    >>> v = [torch.ones(3), torch.ones(3)]
    >>> get_method("ota")(base, experts, v)  # equal curvature: the plain mean
    tensor([2., 3., 4.])
    >>> get_method("ota")(base, experts, v, ffg_threshold=[5.0, 10.0], fallback_to_base=True)
    tensor([0., 4., 4.])
    """
    b, thetas, vs = base, experts, moments
    n = len(thetas)
    _check_ota_masks(p, has_base=b is not None)
    shape, dev = thetas[0].shape, thetas[0].device
    fork = _fork_combine_name(p)
    # The fork takes no low-rank step for embeddings and LM heads (is_embed)
    ranks = [None] * n if _is_embedding(p["tensor_name"]) else p["rank"]
    compressed = any(p["rank1_approx"]) or any(r is not None for r in ranks)
    fast = ota_native(b, thetas, vs, p, compressed, fork, counts)
    if fast is not None:  # the C kernel: the same bits in one sweep
        return fast.reshape(shape)
    # Compression needs each v whole (a 2-D factorisation); everything else runs
    # in cache-sized blocks, with whole-tensor quantities found in a first pass.
    vs = [_compressed_moment(v.float(), r1, r) if (r1 or r is not None) else v
          for v, r1, r in zip(vs, p["rank1_approx"], ranks)]
    fb = None if b is None else b.reshape(-1)
    flats, vflats = [t.reshape(-1) for t in thetas], [v.reshape(-1) for v in vs]
    numel, size = flats[0].numel(), block_size(dev)
    if fork is not None:
        # the fork's rescale and its linear/ties combines need whole task vectors
        size = max(numel, 1)
    means = [_ota_weight_mean(vflats[i], p, i, size) if p["normalise"] == "global" else None
             for i in range(n)]
    keepers = [None] * n
    for i, (t, ties) in enumerate(zip(p["ffg_threshold"], p["ffg_ties"])):
        if t is not None and ties is not None:
            keepers[i] = TopKKeeper(torch.tensor(t), ties)
    for i, d in enumerate(p["ffg_density"]):
        if d is not None and p["ffg_threshold"][i] is None and d < 1 and numel > 0:
            k = max(1, int(d * numel))

            def score(ix, i=i):
                return saliency(vflats[i][ix].float(), flats[i][ix].float() - fb[ix].float())

            keepers[i] = topk_keeper(score, numel, k, size)
    eps = p["epsilon"]
    out = torch.empty(numel, dtype=torch.float32, device=dev)
    for sl in blocks(numel, size):
        stacked = torch.stack([t[sl].float() for t in flats])
        bb = None if fb is None else fb[sl].float()
        taus = None if bb is None else stacked - bb
        W = torch.empty_like(stacked)
        masks = []
        for i in range(n):
            v = moment_block(vflats[i], sl, i, "ota")
            mask = _ota_mask(v, None if taus is None else taus[i], p, i, keepers[i])
            W[i] = _ota_weight(v, mask, p["power"], p["scaling_factor"][i], means[i], eps)
            masks.append(mask)
        if counts is not None:
            counts.add(masks)
        den = W.sum(dim=0)  # >= 0: every weight is
        any_zero = den.numel() > 0 and float(den.min()) == 0.0
        safe_den = one_where_zero(den) if any_zero else den
        if taus is None:
            merged = (W * stacked).sum(dim=0) / safe_den
        elif fork is not None:
            merged = bb + _fork_combine(fork, W, safe_den, taus, masks, p, shape)
        else:
            merged = bb + _ota_combine(p["combine"], W, safe_den, taus, masks)
        if any(m is not None for m in masks):
            # The fork's test for "every expert masked": only epsilon-sized weight
            # left. Those entries are the fallback's exactly (a select: lerp with a
            # 0/1 weight turns a -0.0 into +0.0 in some positions and not others).
            fully_masked = 1.0 - above(den, n * eps * 1.1)
            use_base = p["fallback_to_base"] and bb is not None
            out[sl] = torch.where(fully_masked > 0, bb if use_base else stacked.mean(dim=0), merged)
        elif any_zero:
            # 0/0 without any mask (epsilon=0 and v=0 for every expert): the plain
            # mean instead of the fork's NaN.
            out[sl] = torch.where(den == 0, stacked.mean(dim=0), merged)
        else:
            out[sl] = merged
    for i, (t, ties) in enumerate(zip(p["ffg_threshold"], p["ffg_ties"])):
        if t is not None and ties is not None:
            # a quota not used up: the selection pass saw other scores than this
            # merge; never keep a different number of entries than the density promised
            settle_ota_ties(counts, i, t, ties, keepers[i].remaining)
    return out.reshape(shape)


def _ota_weight_mean(v: Tensor, p: dict, i: int, size: int) -> Tensor:
    """Mean over the tensor of ``v**power * scaling`` (for ``normalise='global'``),
    summed block by block; one block gives torch's fp32 mean exactly."""
    total = 0.0
    for sl in blocks(v.numel(), size):
        w = torch.pow(moment_block(v, sl, i, "ota"), p["power"])
        if p["scaling_factor"][i] != 1.0:
            w = w * p["scaling_factor"][i]
        total += float(w.sum())
    return torch.tensor(total, dtype=torch.float32, device=v.device) / max(v.numel(), 1)


def _ota_weight(
    v: Tensor, mask: Optional[Tensor], power: float, scaling: float, mean: Optional[Tensor], eps: float
) -> Tensor:
    """``(normalise(v**power * scaling) + eps) * mask``, in the fork's order;
    ``mean`` is the whole tensor's mean of ``v**power * scaling`` for
    ``normalise='global'`` and None otherwise."""
    w = torch.pow(v, power)
    if scaling != 1.0:
        w = w * scaling
    if mean is not None:
        w = w / (mean + eps)
    w = w + eps
    return w if mask is None else w * mask


def _check_ota_masks(p: dict, *, has_base: bool) -> None:
    uses_ffg = any(x is not None for x in p["ffg_threshold"] + p["ffg_density"])
    stray = [i for i, (t, k) in enumerate(zip(p["ffg_threshold"], p["ffg_ties"])) if k is not None and t is None]
    if stray:
        raise CurvlensError(f"ota: ffg_ties is given for expert(s) {stray} without an ffg_threshold")
    uses_precond = any(x is not None for x in p["precond_threshold"])
    if uses_ffg and uses_precond:
        raise CurvlensError(
            "ota: give either precond_threshold (the fork's parameter) or "
            "ffg_density/ffg_threshold, not both; got "
            f"precond_threshold={p['precond_threshold']}, ffg_density={p['ffg_density']}, "
            f"ffg_threshold={p['ffg_threshold']}"
        )
    if uses_ffg and not has_base:
        raise CurvlensError(
            "ota: ffg_density/ffg_threshold score the task vectors v*tau**2 and need a base "
            "tensor; got base=None"
        )
    if p["combine"] != "precond" and not has_base:
        raise CurvlensError(
            f"ota: combine={p['combine']!r} combines task vectors and needs a base tensor; "
            "got base=None (use combine='precond')"
        )
    fork_given = p["masked_task_vector_merge_method"] is not None
    if fork_given and p["combine"] != "precond":
        raise CurvlensError(
            f"ota: give either combine (curvlens's) or masked_task_vector_merge_method (the fork's), not both; "
            f"got combine={p['combine']!r}, masked_task_vector_merge_method={p['masked_task_vector_merge_method']!r}")
    if (fork_given or p["rescale"]) and not has_base:
        raise CurvlensError(
            "ota: masked_task_vector_merge_method and rescale act on task vectors and need a base tensor "
            "(the fork ignores them without one); got base=None")
    if p["rescale"] and p["combine"] != "precond":
        raise CurvlensError(f"ota: rescale is the fork's option; use it with masked_task_vector_merge_method, "
                            f"not combine={p['combine']!r}")
    if p["ties_density"] is not None and p["masked_task_vector_merge_method"] != "ties":
        raise CurvlensError("ota: ties_density is the fork's TIES trim and needs "
                            f"masked_task_vector_merge_method: ties; got {p['masked_task_vector_merge_method']!r}")
    for i, (r1, r) in enumerate(zip(p["rank1_approx"], p["rank"])):
        if r1 and r is not None:
            raise CurvlensError(
                f"ota: expert {i} sets both rank1_approx=True and rank={r}; choose one"
            )


def _compressed_moment(v: Tensor, use_rank1: bool, rank: Optional[int]) -> Tensor:
    # The fork compresses v before both the mask and the weight, so both see
    # the approximation.
    if use_rank1:
        return rank1(v)
    if rank is not None:
        return rank_r(v, rank)
    return v


def _ota_mask(v: Tensor, tau: Optional[Tensor], p: dict, i: int,
              keeper: Optional[TopKKeeper] = None) -> Optional[Tensor]:
    """fp32 0/1 mask of expert ``i`` on this block (None: no mask)."""
    if p["ffg_threshold"][i] is not None:
        if keeper is not None:  # exact model-wide selection: ties split by the driver's quota
            return keeper(saliency(v, tau))
        return at_least(saliency(v, tau), p["ffg_threshold"][i])
    if p["ffg_density"][i] is not None:
        if keeper is None:  # density 1: keep everything
            return torch.ones_like(v, dtype=torch.float32)
        return keeper(saliency(v, tau))
    t = p["precond_threshold"][i]
    if t is None:
        return None
    # The fork scores v*tau**2 when a base is present, and v alone otherwise.
    return at_least(v, t) if tau is None else at_least(saliency(v, tau), t)


def _ota_combine(
    how: str, W: Tensor, safe_den: Tensor, taus: Tensor, masks: Sequence[Optional[Tensor]]
) -> Tensor:
    """Merged task vector from the (N, ...) stack ``taus`` (which it may overwrite)."""
    if how == "precond":
        # Masked entries already have weight 0.
        return (W * taus).sum(dim=0) / safe_den
    for i, m in enumerate(masks):
        if m is not None:
            taus[i] = taus[i] * m  # our own stack, not an input
    if how == "linear":
        # The fork averages over all N experts, masked or not.
        return taus.mean(dim=0)
    # TIES's disjoint mean with unit weights: the divisor counts agreeing experts
    mixed, divisor = disjoint_mean_parts(taus, None)
    return mixed / divisor


# The fork's is_embed (mergekit's architecture files mark the input embedding and
# the LM head) and its name list for the l1->RMS rescale norm.
_FORK_EMBED_NAMES = ("lm_head.weight", "model.embed_tokens.weight")


def _is_embedding(name: Optional[str]) -> bool:
    return name is not None and param_role(name)[1] in ("embed", "lm_head")


def _fork_combine_name(p: dict) -> Optional[str]:
    """The fork's combine when the fork's whole-tensor path is needed, else None
    (its ``precond`` without rescale is curvlens's ``precond``, computed in blocks)."""
    how = p["masked_task_vector_merge_method"]
    if p["rescale"]:
        return how or "precond"
    return how if how in ("linear", "ties") else None


def _fork_combine(how: str, W: Tensor, safe_den: Tensor, taus: Tensor, masks: Sequence[Optional[Tensor]],
                  p: dict, shape) -> Tensor:
    """The fork's merged task vector from the whole (N, numel) stack ``taus``
    (overwritten): rescale (masks applied, hybrid norm restored), then
    ``precond`` (weighted mean), ``linear`` (mean of the N) or ``ties`` (trim by
    ``ties_density``, sign election, mean of the agreeing entries over N)."""
    n = taus.shape[0]
    if p["rescale"]:
        for i in range(n):
            taus[i] = _fork_rescaled(taus[i], masks[i], p, shape)
    if how == "precond":
        return (W * taus).sum(dim=0) / safe_den
    if how == "linear":
        return taus.mean(dim=0)
    density = p["ties_density"]
    if density is not None and density < 1.0:
        for i in range(n):
            k = int(density * taus.shape[1])
            if k == 0:
                taus[i] = 0.0
                continue
            mag = taus[i].abs()
            kth = torch.kthvalue(mag, mag.numel() - k + 1).values
            taus[i] = taus[i] * (mag >= kth)
    elected = torch.sign(taus.sum(dim=0))
    elected[elected == 0] = 1.0
    taus *= torch.sign(taus) == elected
    return taus.mean(dim=0)


def _fork_rescaled(tau: Tensor, mask: Optional[Tensor], p: dict, shape) -> Tensor:
    """One task vector masked and scaled back to its unmasked hybrid norm, as the fork."""
    masked = tau if mask is None else tau * mask
    whole = _hybrid_norm(tau.reshape(shape), p)
    if whole != whole:  # NaN: no norm for this shape, the mask only
        return masked
    part = _hybrid_norm(masked.reshape(shape), p)
    if part == part and part > whole * p["rescale_relative_threshold"]:
        return masked * (whole / part)
    return torch.zeros_like(tau)


def _hybrid_norm(t: Tensor, p: dict) -> float:
    """The fork's "hybrid norm": l1->RMS operator norm for its two embedding names,
    RMS->RMS operator norm for 2-D tensors, RMS for vectors, NaN otherwise."""
    if t.numel() == 0:
        return 0.0
    nan = float("nan")
    if p["tensor_name"] in _FORK_EMBED_NAMES:
        if t.ndim != 2:
            return nan
        # max column 2-norm over sqrt(rows)
        cols = torch.linalg.vector_norm(t, ord=2, dim=0).max()
        return float((1 / torch.sqrt(torch.tensor(t.shape[0]))) * cols)
    if t.ndim >= 2:
        if t.ndim != 2:
            return nan
        rows, cols = t.shape
        spectral = _power_iteration(t) if p["approximate_norm"] else torch.linalg.matrix_norm(t, ord=2)
        return float(torch.sqrt(torch.tensor(cols / rows)) * spectral)
    if t.ndim == 1:
        return float(torch.sqrt(torch.mean(t.pow(2))))
    return nan


def _power_iteration(w: Tensor, steps: int = 10) -> Tensor:
    """Largest singular value by ``steps`` power iterations on w.T w. The fork
    starts from an unseeded random vector; curvlens from a fixed seed, so its
    results repeat (and agree with the fork's only approximately)."""
    g = torch.Generator(device=w.device).manual_seed(0)
    x = torch.randn(w.shape[1], generator=g, device=w.device, dtype=w.dtype)
    x = x / torch.linalg.vector_norm(x)
    for _ in range(steps):
        x = w.T @ (w @ x)
        size = torch.linalg.vector_norm(x)
        if float(size) == 0.0:
            return torch.zeros((), device=w.device)
        x = x / size
    return torch.linalg.vector_norm(w @ x)
