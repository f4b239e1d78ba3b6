"""Quadratic objectives over merge coefficients, and their Pareto fronts.

Task arithmetic with one coefficient per expert, θ(c) = θ₀ + Σⱼ cⱼ τⱼ (τⱼ = θⱼ − θ₀),
puts every capability's curvature-predicted loss on an exact quadratic in c::

    Lᵢ(c) = ½ Σ vᵢ (θ(c) − θᵢ)² = ½ (c − eᵢ)ᵀ Gᵢ (c − eᵢ),   Gᵢ[j, l] = Σ vᵢ τⱼ τₗ

(θ(c) − θᵢ = Σⱼ (cⱼ − δᵢⱼ) τⱼ). :func:`tensor_grams` is one tensor's share of the
Gram matrices Gᵢ (summed over tensors by :func:`curvlens.studies.fronts.gram_matrices`);
:func:`quadratic_losses` evaluates the Lᵢ at many c. :func:`fit_quadratic` /
:func:`predict_quadratic` are MAP's surrogate (Li et al.): a full quadratic in c
fitted by least squares to measured scores. :func:`non_dominated` finds the
Pareto-optimal rows of any objective matrix; :func:`front_distance` compares two
fronts in coefficient space.

Everything here is pure: tensors or arrays in, arrays out; no I/O.
"""
from __future__ import annotations

import numpy as np
import torch

from curvlens.arguments import finite_array
from curvlens.errors import CurvlensError
from curvlens.math.blocks import block_size, blocks

__all__ = ["fit_quadratic", "front_distance", "non_dominated", "predict_quadratic", "quadratic_features",
           "quadratic_losses", "quadratic_parts", "sample_coefficients", "scalarized_minimisers", "simplex_weights",
           "squash", "tensor_grams", "unit_rows", "unsquash"]

#: how far inside its range a bounded metric is clipped before the logit (an accuracy
#: of exactly 0 or 1 would otherwise have an infinite logit)
SQUASH_EPS = 0.02


def tensor_grams(moments, task_vectors) -> torch.Tensor:
    """One tensor's share of every expert's Gram matrix: ``G[i, j, l] = Σ vᵢ τⱼ τₗ``.

    Parameters
    ----------
    moments : sequence of torch.Tensor
        vᵢ, one per capability (expert), each of the tensor's shape.
    task_vectors : sequence of torch.Tensor
        τⱼ, one per coefficient, of the same shape.

    Returns
    -------
    torch.Tensor
        float64, shape ``(len(moments), len(task_vectors), len(task_vectors))``,
        on the CPU; symmetric in its last two axes. Accumulated in float64 over
        cache-sized blocks, so a large tensor never needs a whole float64 copy.

    Examples
    --------
    >>> tensor_grams([torch.tensor([1.0, 2.0])], [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])])
    tensor([[[1., 1.],
             [1., 3.]]], dtype=torch.float64)
    """
    vs, taus = list(moments), list(task_vectors)
    if not vs or not taus:
        raise CurvlensError("tensor_grams needs at least one moments tensor and one task vector")
    shape = taus[0].shape
    bad = [tuple(t.shape) for t in vs + taus if t.shape != shape]
    if bad:
        raise CurvlensError(f"tensor_grams: shapes differ ({tuple(shape)} against {bad[:3]})")
    dev = taus[0].device
    out = torch.zeros(len(vs), len(taus), len(taus), dtype=torch.float64, device=dev)
    flat_t = [t.reshape(-1) for t in taus]
    flat_v = [v.reshape(-1) for v in vs]
    for sl in blocks(flat_t[0].numel(), block_size(dev)):
        t = torch.stack([x[sl] for x in flat_t]).double()          # (k, b)
        for i, v in enumerate(flat_v):
            out[i] += (t * v[sl].double()) @ t.T
    return out.cpu()


def quadratic_losses(grams, coefficients, targets=None) -> np.ndarray:
    """``Lᵢ(c) = ½ (c − tᵢ)ᵀ Gᵢ (c − tᵢ)`` for every row c of ``coefficients``.

    Parameters
    ----------
    grams : array (m, k, k)
        One Gram (curvature) matrix per objective.
    coefficients : array (n, k)
    targets : array (m, k), optional
        Each objective's minimiser tᵢ; default the identity rows eᵢ (expert i's
        own weights: cᵢ = 1, the others 0), which needs m == k.

    Returns
    -------
    numpy.ndarray (n, m)

    Examples
    --------
    >>> quadratic_losses([np.eye(2), np.eye(2)], [[1.0, 0.0], [0.5, 0.5]]).tolist()
    [[0.0, 1.0], [0.25, 0.25]]
    """
    g = finite_array("grams", grams)
    c = np.atleast_2d(finite_array("coefficients", coefficients))
    if g.ndim != 3 or g.shape[1] != g.shape[2]:
        raise CurvlensError(f"grams must have shape (m, k, k); got {g.shape}")
    m, k = g.shape[0], g.shape[1]
    if c.shape[1] != k:
        raise CurvlensError(f"coefficients have {c.shape[1]} columns; the Gram matrices are {k} x {k}")
    t = np.eye(k) if targets is None else np.asarray(targets, dtype=np.float64)
    if t.shape != (m, k):
        raise CurvlensError(f"targets must have shape ({m}, {k}); got {t.shape}"
                            + (" (default targets need one Gram matrix per coefficient)" if targets is None else ""))
    d = c[:, None, :] - t[None, :, :]                              # (n, m, k)
    return 0.5 * np.einsum("nij,ijl,nil->ni", d, g, d)


def non_dominated(objectives, maximize: bool = False) -> np.ndarray:
    """Boolean mask of the Pareto-optimal rows: no other row is at least as good
    in every column and better in one.

    Parameters
    ----------
    objectives : array (n, m)
    maximize : bool
        Larger is better (scores) instead of smaller (losses).

    Examples
    --------
    >>> non_dominated([[1, 2], [2, 1], [2, 2], [1, 2]]).tolist()
    [True, True, False, True]
    """
    f = np.atleast_2d(np.asarray(objectives, dtype=np.float64))
    if maximize:
        f = -f
    if not np.isfinite(f).all():
        raise CurvlensError("non_dominated: objectives must be finite")
    keep = np.ones(len(f), dtype=bool)
    # Each still-undominated point, best sum first, strikes out the points it
    # dominates. A dominated point's victims are also its dominator's, so only
    # the front (plus points not yet struck) ever has to be compared.
    for i in np.argsort(f.sum(1), kind="stable"):
        if not keep[i]:
            continue
        rest = np.flatnonzero(keep)
        g = f[rest]
        beaten = (f[i] <= g).all(1) & (f[i] < g).any(1)
        keep[rest[beaten]] = False
    return keep


def quadratic_features(coefficients) -> np.ndarray:
    """Design matrix of a full quadratic in c: ``1, c_j, c_j c_l (j <= l)``.

    Examples
    --------
    >>> quadratic_features([[2.0, 3.0]]).tolist()
    [[1.0, 2.0, 3.0, 4.0, 6.0, 9.0]]
    """
    c = np.atleast_2d(np.asarray(coefficients, dtype=np.float64))
    k = c.shape[1]
    cols = [np.ones(len(c))] + [c[:, j] for j in range(k)]
    cols += [c[:, j] * c[:, l] for j in range(k) for l in range(j, k)]
    return np.stack(cols, axis=1)


def fit_quadratic(coefficients, values) -> np.ndarray:
    """Least-squares weights of :func:`quadratic_features` for ``values`` (MAP's
    surrogate of one capability's score). Fewer samples than features gives the
    minimum-norm solution (``numpy.linalg.lstsq``).

    Examples
    --------
    >>> c = np.array([[0.0], [1.0], [2.0], [3.0]])
    >>> fit_quadratic(c, 1 + 2 * c[:, 0] - c[:, 0] ** 2).round(6).tolist()
    [1.0, 2.0, -1.0]
    """
    x = quadratic_features(finite_array("coefficients", coefficients))
    y = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(y) != len(x):
        raise CurvlensError(f"fit_quadratic: {len(x)} coefficient rows but {len(y)} values")
    ok = np.isfinite(y)
    if ok.sum() == 0:
        raise CurvlensError("fit_quadratic: no finite values to fit")
    # LAPACK given a NaN or an Inf prints to stdout and returns garbage: never hand it one
    finite_array("fit_quadratic's design matrix (coefficients too large to square)", x[ok])
    return finite_array("fit_quadratic's weights", np.linalg.lstsq(x[ok], y[ok], rcond=None)[0])


def squash(values, low: float = 0.0, high: float = 1.0, eps: float = SQUASH_EPS) -> np.ndarray:
    """The logit of ``values`` rescaled from ``[low, high]`` to (0, 1), clipped to
    ``[eps, 1 - eps]`` first: a bounded metric (an accuracy) on an unbounded scale,
    where a quadratic surrogate can be fitted and its prediction mapped back into
    the range by :func:`unsquash` (MAP squashes bounded metrics the same way).

    Examples
    --------
    >>> squash([0.5, 1.0], eps=0.1).round(4).tolist()
    [0.0, 2.1972]
    """
    if not high > low:
        raise CurvlensError(f"squash: the range needs low < high; got ({low}, {high})")
    u = (np.asarray(values, dtype=np.float64) - low) / (high - low)
    u = np.clip(u, eps, 1.0 - eps)
    return np.log(u) - np.log1p(-u)


def unsquash(z, low: float = 0.0, high: float = 1.0) -> np.ndarray:
    """The inverse of :func:`squash` (up to its clipping): always inside ``[low, high]``.

    Examples
    --------
    >>> unsquash(squash([0.3, 0.7])).round(6).tolist()
    [0.3, 0.7]
    """
    z = np.asarray(z, dtype=np.float64)
    return low + (high - low) / (1.0 + np.exp(-z))


def predict_quadratic(weights, coefficients) -> np.ndarray:
    """The fitted quadratic at every row of ``coefficients``."""
    return quadratic_features(coefficients) @ np.asarray(weights, dtype=np.float64)


def quadratic_parts(weights, k: int) -> tuple[float, np.ndarray, np.ndarray]:
    """``(a, b, H)`` with ``f(c) = a + bᵀc + ½ cᵀHc`` for :func:`quadratic_features` weights.

    Examples
    --------
    >>> a, b, h = quadratic_parts([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2)
    >>> float(a), b.tolist(), h.tolist()
    (1.0, [2.0, 3.0], [[8.0, 5.0], [5.0, 12.0]])
    """
    w = np.asarray(weights, dtype=np.float64)
    if len(w) != 1 + k + k * (k + 1) // 2:
        raise CurvlensError(f"{len(w)} weights are not a full quadratic in {k} coefficients")
    h = np.zeros((k, k))
    i = 1 + k
    for j in range(k):
        for l in range(j, k):
            h[j, l] += w[i] if j != l else 2 * w[i]
            if j != l:
                h[l, j] += w[i]
            i += 1
    return float(w[0]), w[1:1 + k].copy(), h


def simplex_weights(n: int, m: int, seed: int = 0) -> np.ndarray:
    """``n`` weight vectors on the (m-1)-simplex: its m vertices first, then
    uniform (Dirichlet(1)) draws.

    Examples
    --------
    >>> simplex_weights(3, 2)[:2].tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    rng = np.random.default_rng(seed)
    first = np.eye(m)[:n]
    return np.concatenate([first, rng.dirichlet(np.ones(m), size=max(0, n - m))])


def scalarized_minimisers(hessians, linears, weights, low: float = -np.inf, high: float = np.inf) -> np.ndarray:
    """For each weight vector w, the stationary point of ``Σₘ wₘ (½ cᵀHₘc + bₘᵀc)``,
    clipped to ``[low, high]``.

    With positive semi-definite Hₘ (convex objectives) every unclipped point is
    Pareto-optimal, and sweeping w over the simplex traces the whole front: the
    candidates that make a sampled front sharp. A singular weighted Hessian gets
    the minimum-norm solution (``numpy.linalg.lstsq``).

    Examples
    --------
    >>> scalarized_minimisers([np.eye(1), np.eye(1)], [[-1.0], [-3.0]], [[0.5, 0.5], [1.0, 0.0]]).tolist()
    [[2.0], [1.0]]
    """
    h = finite_array("hessians", hessians)
    b = finite_array("linears", linears)
    w = np.atleast_2d(finite_array("weights", weights))
    # sums of finite terms can still overflow; LAPACK must never see a NaN or an Inf
    hw = finite_array("the weighted Hessians", np.einsum("nm,mjl->njl", w, h))
    bw = finite_array("the weighted linear terms", np.einsum("nm,mj->nj", w, b))
    out = np.stack([np.linalg.lstsq(hw[i], -bw[i], rcond=None)[0] for i in range(len(w))])
    return np.clip(out, low, high)


def sample_coefficients(n: int, k: int, low: float = 0.0, high: float = 1.0, seed: int = 0,
                        corners: bool = True) -> np.ndarray:
    """``n`` coefficient vectors in ``[low, high]^k``: the k unit vectors (each
    expert alone, when they lie in the box) first if ``corners``, then uniform
    random draws (reproducible from ``seed``).

    Examples
    --------
    >>> sample_coefficients(3, 2, corners=True)[:2].tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    if n < 1 or k < 1:
        raise CurvlensError(f"sample_coefficients needs n >= 1 and k >= 1; got n={n}, k={k}")
    if not high > low:
        raise CurvlensError(f"bounds must satisfy low < high; got ({low}, {high})")
    rng = np.random.default_rng(seed)
    first = np.eye(k) if corners and low <= 0.0 and high >= 1.0 else np.empty((0, k))
    first = first[:n]
    rest = rng.uniform(low, high, size=(n - len(first), k))
    return np.concatenate([first, rest])


def unit_rows(coefficients) -> np.ndarray:
    """Boolean mask of the rows that are unit vectors eᵢ: each expert alone.

    Examples
    --------
    >>> unit_rows([[1.0, 0.0], [0.5, 0.5], [0.0, 1.0], [1.0, 1.0]]).tolist()
    [True, False, True, False]
    """
    c = np.atleast_2d(np.asarray(coefficients, dtype=np.float64))
    return (np.isclose(c, 0.0) | np.isclose(c, 1.0)).all(1) & np.isclose(c.sum(1), 1.0)


def front_distance(a, b) -> float:
    """Symmetric mean nearest-neighbour distance between two point sets (rows):
    the mean over ``a`` of the distance to the nearest row of ``b`` and over ``b``
    to ``a``, averaged. 0 when the sets coincide.

    Examples
    --------
    >>> front_distance([[0.0, 0.0]], [[3.0, 4.0], [0.0, 1.0]])
    2.0
    """
    a = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b = np.atleast_2d(np.asarray(b, dtype=np.float64))
    if not len(a) or not len(b):
        return float("nan")
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return float(0.5 * (d.min(1).mean() + d.min(0).mean()))
