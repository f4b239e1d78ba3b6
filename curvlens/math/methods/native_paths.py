"""The C paths of the OTA and TIES merges: which of their options the kernels of
:mod:`curvlens.math.native.merges` implement, and the torch code's parameters
turned into the kernels' arguments.

Each function returns the merged fp32 tensor, or None when the options or the
inputs are outside what the kernel does; the method then runs its torch code.
Both give the same bits (``tests/math/test_native_merges.py``), so which one ran
never shows in a result.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from curvlens.errors import CurvlensError
from curvlens.math.methods.registry import MaskCounts
from curvlens.math.native.merges import MaskedMerge, kth_largest_magnitude, ota_merge, ties_merge

Tensor = torch.Tensor

__all__ = ["ota_native", "ties_native", "settle_ota_ties"]


def _record(res: MaskedMerge, counts: Optional[MaskCounts], masked: bool) -> Tensor:
    if counts is not None and masked:
        counts.add_totals(res.kept, res.any_kept)
    return res.out


def ota_native(base: Optional[Tensor], experts: Sequence[Tensor], moments: Sequence[Tensor], p: dict,
               compressed: bool, fork: Optional[str], counts: Optional[MaskCounts]) -> Optional[Tensor]:
    """OTA's merge by ``cl_ota_merge``: a base, ``combine='precond'``, no fork
    combine, no compression, ``normalise='none'``, a power of 1, 0.5 or 2, masks
    from thresholds (the driver's model-wide FFG selections, the fork's
    ``precond_threshold``) or none."""
    if base is None or fork is not None or compressed or p["combine"] != "precond" or p["normalise"] != "none":
        return None
    n = base.numel()
    if n == 0:
        return None
    masks = []
    for i in range(len(experts)):
        t, ties, d, pre = p["ffg_threshold"][i], p["ffg_ties"][i], p["ffg_density"][i], p["precond_threshold"][i]
        if t is not None:
            masks.append((t, -1 if ties is None else ties))
        elif d is not None:
            if d < 1:  # a per-tensor top-k (the method called directly): the torch code's
                return None
            masks.append((-1.0, -1))  # density 1 keeps every entry (scores are >= 0)
        elif pre is not None:
            masks.append((pre, -1))
        else:
            masks.append(None)
    eps = p["epsilon"]
    # the torch code's "every expert masked" test, above(den, n * eps * 1.1), at its fp32 cut
    cut = float(torch.tensor(float(len(experts) * eps * 1.1), dtype=torch.float32))
    res = ota_merge(base, experts, moments, power=p["power"], scaling=p["scaling_factor"], eps=eps, masks=masks,
                    cut=cut, fallback_to_base=p["fallback_to_base"])
    if res is None:
        return None
    for i, (t, ties) in enumerate(zip(p["ffg_threshold"], p["ffg_ties"])):
        if t is not None and ties is not None:  # as the torch code
            settle_ota_ties(counts, i, t, ties, res.remaining[i])
    return _record(res, counts, any(m is not None for m in masks))


def settle_ota_ties(counts: Optional[MaskCounts], i: int, t: float, ties: int, left: int) -> None:
    """Expert ``i``'s tie quota ``ties`` at threshold ``t``, ``left`` of it unused:
    recorded under the driver's tie budget (:class:`MaskCounts`), else refused
    when not used up (the selection pass saw other scores than this merge: never
    keep another number of entries than the density promised)."""
    if counts is not None and counts.tie_budget:
        counts.ties_left[i] = int(left)
    elif left > 0:
        raise CurvlensError(f"ota: expert {i} should keep {ties} entries tied at the threshold {t!r} but "
                            f"only {ties - left} exist; scores differ from the selection pass")


def ties_native(base: Tensor, experts: Sequence[Tensor], p: dict, counts: Optional[MaskCounts]) -> Optional[Tensor]:
    """TIES (magnitude sparsification, sign consensus, no ``rescale``) by
    ``cl_ties_merge``, the per-tensor top-k thresholds found by
    :func:`~curvlens.math.native.merges.kth_largest_magnitude`."""
    n = base.numel()
    if n == 0 or p["rescale"]:
        return None
    masks = []
    for x, density in zip(experts, p["density"]):
        if density >= 1:
            masks.append(None)
            continue
        k = max(1, int(density * n))  # mergekit's k
        found = kth_largest_magnitude(base, x, k)
        if found is None:
            return None
        kth, above, _ = found
        masks.append((kth, k - above))
    unit = all(w == 1.0 for w in p["weight"])
    res = ties_merge(base, experts, masks=masks, weights=None if unit else p["weight"], normalize=p["normalize"],
                     lam=p["lambda"])
    if res is None:
        return None
    return _record(res, counts, any(m is not None for m in masks))
