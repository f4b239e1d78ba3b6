"""Moment tensors made small enough to look at: block means of a 2-D view (the
paper's heatmap grids) and histograms of ``log10 v``, computed in bands and chunks
so no float64 copy of a whole tensor is made."""
from __future__ import annotations

import torch

__all__ = ["as_2d", "block_means", "log10_bin_counts"]


def as_2d(t: torch.Tensor) -> torch.Tensor:
    if t.ndim == 0:
        return t.reshape(1, 1)
    if t.ndim == 1:
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], -1)


def block_means(x: torch.Tensor, bm: int, bn: int, fn) -> torch.Tensor:
    """Means of ``fn(x)`` over ``bm x bn`` blocks (the last ones may be smaller),
    computed a band of rows at a time so ``fn(x)`` never exists whole."""
    m, n = x.shape
    nb_r, nb_c = -(-m // bm), -(-n // bn)
    pad_c = nb_c * bn - n
    out = torch.empty(nb_r, nb_c, dtype=torch.float64, device=x.device)
    band = max(1, (1 << 22) // max(1, bm * n))  # row blocks per band: ~4M entries
    for r0 in range(0, nb_r, band):
        r1 = min(nb_r, r0 + band)
        rows = x[r0 * bm:min(m, r1 * bm)]
        y = fn(rows).double()
        pad_r = (r1 - r0) * bm - y.shape[0]
        y = torch.nn.functional.pad(y, (0, pad_c, 0, pad_r))
        out[r0:r1] = y.reshape(r1 - r0, bm, nb_c, bn).sum(dim=(1, 3))
    rc = torch.full((nb_r,), float(bm), dtype=torch.float64, device=x.device)
    rc[-1] = m - (nb_r - 1) * bm
    cc = torch.full((nb_c,), float(bn), dtype=torch.float64, device=x.device)
    cc[-1] = n - (nb_c - 1) * bn
    return out / torch.outer(rc, cc)




def log10_bin_counts(v: torch.Tensor, edges: torch.Tensor, *, chunk: int = 1 << 22) -> torch.Tensor:
    """Counts of ``log10 v`` in the bins ``[edges[i], edges[i+1])`` (the last bin
    closed), as int64 on the CPU; zeros (log10 = -inf) and values outside the
    edges are not counted.

    Examples
    --------
    >>> log10_bin_counts(torch.tensor([2e-3, 5e-2, 0.5, 0.0]), torch.tensor([-3.0, -2.0, 0.0], dtype=torch.float64))
    tensor([1, 2])
    """
    nb = edges.numel() - 1
    flat = v.reshape(-1)
    out = torch.zeros(nb, dtype=torch.int64)
    for s in range(0, flat.numel(), chunk):
        lg = torch.log10(flat[s:s + chunk].double())
        idx = torch.bucketize(lg, edges, right=True) - 1
        idx[lg == edges[-1]] = nb - 1  # the last bin is closed
        idx = idx[(idx >= 0) & (idx < nb)]
        out += torch.bincount(idx, minlength=nb).cpu()
    return out
