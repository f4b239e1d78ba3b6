"""Interpolation on the sphere: ``slerp``, ``nuslerp``, ``multislerp`` and ``karcher``
(mergekit 0.1.5 semantics, docs/merge_methods.md).

All four treat a whole tensor (or, for ``nuslerp`` without flattening, each row)
as one vector and interpolate along great circles rather than straight lines.
They need whole-tensor norms and dot products: ``slerp`` gathers them in chunks
of 2**20 entries as mergekit does; the others work on fp32 copies of the whole
tensor, as mergekit does (one copy per model, made from the stored dtype)."""
from __future__ import annotations

import torch

from curvlens.errors import CurvlensError
from curvlens.math.blocks import block_size, blocks
from curvlens.math.checks import fp32_operand, fp32_task_vector
from curvlens.math.methods.params import WEIGHT, ParamSpec, boolean, int_at_least, real
from curvlens.math.methods.registry import register

Tensor = torch.Tensor

#: Entries per chunk of slerp's norms, dot product and combine (mergekit's chunk,
#: so the partial sums, and hence the bits, are the same).
SLERP_CHUNK = 1 << 20


def _required_real(label, value):
    if value is None:
        raise CurvlensError(f"{label} is required (mergekit has no default): give the interpolation "
                            "factor, 0 = the base, 1 = the expert")
    return real()(label, value)


@register(
    "slerp",
    params=(ParamSpec("t", None, "Interpolation factor: 0 gives the base, 1 the expert (required).",
                      validate=_required_real),),
    description="SLERP between the base and one expert, by the angle between the whole tensors.",
    needs_base=True,
    min_experts=1,
    max_experts=1,
)
def slerp(base, experts, moments, p, *, rng, counts) -> Tensor:
    """Spherical linear interpolation from ``base`` (t = 0) to the one expert (t = 1).

    With ``theta`` the angle between the two flattened tensors,
    ``sin((1 - t) theta) / sin(theta) * base + sin(t theta) / sin(theta) * expert``;
    when ``|cos theta| > 0.9995`` (nearly collinear or antipodal) the linear
    ``(1 - t) base + t expert`` instead. Norms below 1e-8 count as 1.

    Examples
    --------
    >>> from curvlens.math.methods import get_method
    >>> get_method("slerp")(torch.tensor([1.0, 0.0]), [torch.tensor([0.0, 1.0])], t=0.5)
    tensor([0.7071, 0.7071])
    """
    a, b = base.reshape(-1), experts[0].reshape(-1)
    n, dev = a.numel(), a.device
    t = torch.tensor(p["t"], dtype=torch.float32, device=dev)
    out = torch.empty(n, dtype=torch.float32, device=dev)
    if n == 0:
        return out.reshape(base.shape)
    chunks = [slice(s, min(n, s + SLERP_CHUNK)) for s in range(0, n, SLERP_CHUNK)]
    # norms of the chunks' norms, as mergekit gathers them
    na = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a[c].float()) for c in chunks]))
    nb = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b[c].float()) for c in chunks]))
    na = torch.where(na > 1e-8, na, 1)
    nb = torch.where(nb > 1e-8, nb, 1)
    dot = torch.stack([((a[c].float() / na) * (b[c].float() / nb)).sum() for c in chunks]).sum().clamp(-1, 1)
    linear = dot.abs() > 0.9995
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    ca = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    cb = torch.where(linear, t, torch.sin(t * theta) / sin_theta)
    for c in chunks:
        out[c] = ca * a[c].float() + cb * b[c].float()
    return out.reshape(base.shape)


def _nuslerp_pair(t: float, v0: Tensor, v1: Tensor, flatten: bool, row_wise: bool) -> Tensor:
    """mergekit's ``nuslerp`` of two fp32 tensors: each vector (the whole tensor,
    each slice along the last dim, or with ``row_wise`` along dim 0) interpolated
    by its own angle; collinear pairs linearly.

    The same operations in the same order as mergekit's, with the temporaries
    freed or reused as soon as they are done (a 32000 x 1024 embedding is 131 MB
    per fp32 copy, and this holds three of them at a time instead of seven)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u.mul_(v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7))  # u0 * u1
    cos = torch.sum(u, dim=-1, keepdim=True).clamp(-1, 1)
    del u
    collinear = (1 - cos.square()) <= 1e-8 ** 2
    theta = torch.acos(torch.where(collinear, 0, cos))
    out = torch.sin((1 - t) * theta) * v0
    out.add_(torch.sin(t * theta) * v1).div_(torch.sin(theta))
    if bool(collinear.any()):
        out = torch.where(collinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


@register(
    "nuslerp",
    params=(
        WEIGHT,
        ParamSpec("nuslerp_flatten", True, "Interpolate the whole tensor as one vector (else per row).",
                  validate=boolean),
        ParamSpec("nuslerp_row_wise", False,
                  "Without flattening: interpolate the vectors along dim 0 instead of the last dim.",
                  validate=boolean),
    ),
    description="SLERP of two experts (or their task vectors, with a base) at t = w_2 / (w_1 + w_2).",
    needs_base=False,
    min_experts=2,
    max_experts=2,
)
def nuslerp(base, experts, moments, p, *, rng, counts) -> Tensor:
    """mergekit's ``nuslerp``: slerp of the two experts, or of their task vectors
    around the base, at ``t = weight[1] / (weight[0] + weight[1])`` (0.5 when the
    weights sum to less than 1e-6 in magnitude).

    Examples
    --------
    >>> from curvlens.math.methods import get_method
    >>> get_method("nuslerp")(None, [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])])
    tensor([0.7071, 0.7071])
    """
    w = p["weight"]
    total = w[0] + w[1]
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    if base is None:
        return _nuslerp_pair(t, experts[0].float(), experts[1].float(), p["nuslerp_flatten"], p["nuslerp_row_wise"])
    # the task vectors made in one fp32 copy each (x - b, b widened exactly), and
    # the base added back into the result: the same values as b + pair(x0 - b, x1 - b)
    d0, d1 = fp32_task_vector(experts[0], base), fp32_task_vector(experts[1], base)
    out = _nuslerp_pair(t, d0, d1, p["nuslerp_flatten"], p["nuslerp_row_wise"])
    del d0, d1
    return out.add_(fp32_operand(base)) if out.is_contiguous() else base.float() + out


@register(
    "multislerp",
    params=(
        WEIGHT,
        ParamSpec("normalize_weights", True, "Divide the weights by their sum.", validate=boolean),
        ParamSpec("eps", 1e-8, "Guard added to norms, >= 0.", validate=real(lo=0.0)),
    ),
    description="Barycentric SLERP of N experts (or task vectors, with a base) via the tangent space.",
    needs_base=False,
)
def multislerp(base, experts, moments, p, *, rng, counts) -> Tensor:
    """mergekit's ``multislerp`` (see docs/merge_methods.md for the exact steps).

    Raises
    ------
    CurvlensError
        If ``normalize_weights`` and the weights sum to 0, or the weighted mean of
        the unit vectors vanishes with more than two experts (mergekit raises too).

    Examples
    --------
    >>> from curvlens.math.methods import get_method
    >>> out = get_method("multislerp")(None, [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])])
    >>> torch.allclose(out, torch.tensor([0.7071, 0.7071]), atol=1e-4)
    True
    """
    if len(experts) == 1:
        return experts[0].float().clone()
    eps = p["eps"]
    stack = torch.stack([e.float() for e in experts])
    b = None if base is None else base.float()
    if b is not None:
        stack -= b
    flat = stack.reshape(stack.shape[0], -1)
    w = torch.tensor(p["weight"], dtype=torch.float32, device=flat.device)
    if p["normalize_weights"]:
        if sum(p["weight"]) == 0:
            raise CurvlensError(f"multislerp: weights sum to 0 with normalize_weights=True; got {p['weight']}")
        w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if stack.shape[0] != 2:
            raise CurvlensError(
                "multislerp: the weighted mean of the experts' unit vectors is zero (antipodal "
                "experts with balancing weights); expected weights that do not cancel"
            )
        out = (stack[0] * w[0] + stack[1] * w[1]).view(stack.shape[1:])
        return out if b is None else out + b
    mean = mean / mean_norm
    dots = (units * mean).sum(-1, keepdim=True)
    tangent = ((units - dots * mean) * w.view(-1, 1)).sum(0)
    tnorm = torch.norm(tangent) + eps
    out = mean * torch.cos(tnorm) + tangent * (torch.sin(tnorm) / tnorm)
    out = (out * (norms.squeeze(-1) * w).sum()).view(stack.shape[1:])
    return out if b is None else out + b


@register(
    "karcher",
    params=(
        ParamSpec("max_iter", 10, "Most fixed-point iterations of the Riemannian mean, >= 0.",
                  validate=int_at_least(0)),
        ParamSpec("tol", 1e-5, "Stop when the tangent step's norm falls below this, >= 0.",
                  validate=real(lo=0.0)),
    ),
    description="Karcher (Riemannian) mean of the models' directions on the sphere, times their mean norm.",
    needs_base=False,
)
def karcher(base, experts, moments, p, *, rng, counts) -> Tensor:
    """mergekit's ``karcher``: the equal-weight Karcher mean of the models' unit
    vectors on the hypersphere, scaled by the mean of their norms. A base, when
    given, is one more model in the mean (mergekit adds ``base_model`` to the
    inputs), placed last.

    Examples
    --------
    >>> from curvlens.math.methods import get_method
    >>> get_method("karcher")(None, [torch.tensor([3.0, 0.0]), torch.tensor([0.0, 1.0])])
    tensor([1.4142, 1.4142])
    """
    models = list(experts) + ([] if base is None else [base])
    if len(models) == 1:
        return models[0].float().clone()
    tol = p["tol"]
    alpha = 1.0 / len(models)
    # each model's unit vector made from one fp32 copy (divided in place), so only
    # the units are held, not the models' fp32 copies as well
    norms, units = [], []
    for m in models:
        x = m.float()
        nm = torch.linalg.vector_norm(x)
        norms.append(nm)
        units.append(torch.zeros_like(x) if float(nm) == 0.0 else (x / nm if x is m else x.div_(nm)))
        del x
    valid = [i for i, nm in enumerate(norms) if float(nm) > tol]
    if not valid:
        return torch.zeros_like(units[0])
    total = sum(alpha for _ in valid)
    share = [alpha / total for _ in valid]
    us = [units[i] for i in valid]
    mean = torch.zeros_like(us[0])
    for a, u in zip(share, us):
        mean += a * u
    mnorm = torch.linalg.vector_norm(mean)
    mean = us[0].clone() if float(mnorm) < tol else mean / mnorm
    # mean is a fresh tensor (never one of the units), so it is updated in place;
    # each term a * (theta / sin) * (u - dot * mean) is made block by block in one
    # small buffer (every operation is per entry: the same values as whole tensors)
    flat_mean, flat_us = mean.reshape(-1), [u.reshape(-1) for u in us]
    size = min(flat_mean.numel(), block_size(mean.device)) or 1
    term = torch.empty(size, dtype=mean.dtype, device=mean.device)
    for _ in range(p["max_iter"]):
        # every dot against this iteration's mean, before the step is made
        coefs = []
        for a, u in zip(share, flat_us):
            dot = torch.clamp(torch.dot(flat_mean, u), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) >= tol:
                coefs.append((u, dot, a * (theta / torch.sin(theta))))
        step = torch.zeros_like(flat_mean)
        for sl in blocks(flat_mean.numel(), size):
            t = term[: sl.stop - sl.start]
            for u, dot, c in coefs:
                torch.mul(flat_mean[sl], dot, out=t)
                step[sl] += torch.sub(u[sl], t, out=t).mul_(c)
        snorm = torch.linalg.vector_norm(step)
        if float(snorm) < tol:
            break
        # cos(s) * mean + sin(s) * (step / s), the step reused for its own term
        mean.mul_(torch.cos(snorm)).add_(step.div_(snorm).mul_(torch.sin(snorm)).reshape(mean.shape))
        del step
        unorm = torch.linalg.vector_norm(mean)
        if float(unorm) > tol:
            mean.div_(unorm)
    del term
    scale = sum(alpha * nm for nm in norms)
    return mean.mul_(scale)  # in place: the same product as scale * mean, one copy fewer
