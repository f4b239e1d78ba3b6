"""A mask's kept entries, indexed once, and the rank sketches' products over them
(``curvlens/math/native/sparse.c``): what :mod:`curvlens.math.sketches` uses in
place of its dense :class:`~curvlens.math.sketches.RowBlocks` on the CPU when a
mask keeps at most half its entries.
"""
from __future__ import annotations

import ctypes

import torch

from curvlens.errors import CurvlensError
from curvlens.math.checks import as_bytes

__all__ = ["MaskIndex", "SparseRows"]


class MaskIndex:
    """The kept entries of a 2-D mask as each row's column indices (uint16) and,
    given ``tau``, its values there (fp32), for :class:`SparseRows`: the rank
    sketches' products then visit only the kept entries
    (``curvlens/math/native/sparse.c``), 2-4x faster than a dense GEMM at the
    10-30% an FFG mask keeps, and they read the kept values in order instead of
    gathering them from ``tau`` (which, at those densities, touches nearly every
    cache line of it).

    Use :meth:`build`, which returns None where the dense :class:`~curvlens.math.sketches.RowBlocks` are
    used instead: no C kernels, a tensor off the CPU or not contiguous, more than
    65535 columns, or more than half the entries kept (a dense GEMM is as fast).
    Memory: 2 bytes per kept entry (6 with values) and 8 per row.
    """

    def __init__(self, row_ptr: torch.Tensor, col: torch.Tensor, val: torch.Tensor | None, shape: tuple[int, int],
                 fro2: float | None):
        self.row_ptr, self.col, self.val, self.shape, self.fro2 = row_ptr, col, val, shape, fro2

    @classmethod
    def build(cls, mask2d: torch.Tensor, n_kept: int, tau2d: torch.Tensor | None = None,
              with_fro2: bool = True) -> "MaskIndex | None":
        """The index of ``mask2d`` (which keeps ``n_kept`` entries), or None (see
        the class). With ``tau2d``, also its kept values and (``with_fro2``)
        ``fro2``, ``||mask * tau||_F^2`` (fp32 values, squared and summed in
        float64), from the same sweep."""
        from curvlens.math import native

        m, n = mask2d.shape
        if not (0 < n_kept and 2 * n_kept <= m * n and n <= 0xFFFF and mask2d.device.type == "cpu"
                and mask2d.is_contiguous() and native.lib() is not None
                and (tau2d is None or native.available(tau2d))):
            return None
        row_ptr = torch.empty(m + 1, dtype=torch.int64)
        col = torch.empty(n_kept, dtype=torch.int16)  # uint16 patterns
        val = None if tau2d is None else torch.empty(n_kept, dtype=torch.float32)
        fro2 = ctypes.c_double(0.0)
        got = native.lib().cl_sp_index(as_bytes(mask2d).data_ptr(), m, n, n_kept, row_ptr.data_ptr(),
                                       col.data_ptr(), native.ptr(tau2d),
                                       0 if tau2d is None else native.dtype_code(tau2d), native.ptr(val),
                                       ctypes.byref(fro2) if with_fro2 else None)
        if got != n_kept:  # a caller's count that is not the mask's
            kept = f"more than {n_kept}" if got < 0 else str(got)
            raise CurvlensError(f"mask keeps {kept} entries; expected n_kept={n_kept}")
        return cls(row_ptr, col, val, (m, n), fro2.value if tau2d is not None and with_fro2 else None)


class SparseRows:
    """The 0/1 mask (float64), or ``mask * tau`` (float32) with ``values=True``
    (the index must hold them), through a :class:`MaskIndex`: the products of
    :class:`~curvlens.math.sketches.RowBlocks` over the kept entries only. Row ``i`` of ``A @ x`` adds
    its kept entries into four partial sums in turn (then ``(s0 + s1) + (s2 +
    s3)``); ``A^T @ q`` adds row by row: a fixed order, the same in every build of
    the kernels."""

    def __init__(self, index: MaskIndex, values: bool):
        if values and index.val is None:
            raise CurvlensError("this mask index holds no values (built without tau)")
        self.index, self.values = index, bool(values)
        self.m, self.n = index.shape
        self.dtype = torch.float32 if values else torch.float64
        self.device = torch.device("cpu")
        self._width = 16 if values else 8  # the kernels' column blocks

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[1]
        kp = -(-k // self._width) * self._width
        if kp == k:
            return x.to(self.dtype).contiguous()
        out = torch.zeros(x.shape[0], kp, dtype=self.dtype)
        out[:, :k] = x
        return out

    def _call(self, name: str, x: torch.Tensor, rows: int) -> torch.Tensor:
        from curvlens.math import native

        xp = self._padded(x)
        out = torch.empty(rows, xp.shape[1], dtype=self.dtype)
        idx = self.index
        head = (idx.row_ptr.data_ptr(), idx.col.data_ptr()) + ((idx.val.data_ptr(),) if self.values else ())
        dims = (self.m, self.n) if name == "tmm" else (self.m,)
        kernel = getattr(native.lib(), f"cl_sp_{name}_{'f32' if self.values else 'pat'}")
        kernel(*head, *dims, xp.data_ptr(), xp.shape[1], out.data_ptr())
        return out[:, : x.shape[1]]

    def mm(self, x: torch.Tensor, with_fro2: bool = False) -> tuple[torch.Tensor, float]:
        """``A @ x``, and with ``with_fro2`` ``||A||_F^2``: the index's (float64, from
        its sweep) when it took it, else summed from the kept values here (a 0/1
        mask's is its count)."""
        fro2 = 0.0
        if with_fro2:
            idx = self.index
            if not self.values:
                fro2 = float(idx.col.numel())
            else:
                fro2 = idx.fro2 if idx.fro2 is not None else float(idx.val.double().square().sum())
        return self._call("mm", x, self.m), fro2

    def rmm(self, q: torch.Tensor) -> torch.Tensor:
        """``A^T @ q`` (``n x k``)."""
        return self._call("tmm", q, self.n)
