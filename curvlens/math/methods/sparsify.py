"""What several merge methods share: sparsifying one expert's task vector block by
block (top-k magnitude for TIES, random drop for DARE), TIES's sign election and
disjoint mean, and a divisor guard. Masks are fp32 0/1 tensors made with float
ops: on a CPU, bool tensors cost 3-5x."""
from __future__ import annotations

from typing import Optional

import torch

from curvlens.math.blocks import blocks
from curvlens.math.topk import TopKKeeper, kth_largest_blocked

Tensor = torch.Tensor


def topk_keeper(score, n: int, k: int, size: int) -> TopKKeeper:
    """The top-``k`` of a nonnegative ``score`` over a tensor, as a block-by-block keeper."""
    kth, above, equal = kth_largest_blocked(score, n, k, size, nonnegative=True)
    return TopKKeeper(kth, k - above, equal)


class Sparsifier:
    """One expert's sparsification of one tensor's task vector, block by block.

    The whole-tensor quantities (top-k threshold, L1 norms for ``rescale``, the
    random stream) are settled when the sparsifier is built, in a first pass
    over the same blocks; :meth:`apply` then masks the blocks, which must come in
    index order, each once.
    ``apply`` returns ``delta * keep``, times ``||delta||_1 / ||delta * keep||_1``
    with ``rescale`` (mergekit's rescale, left out when either norm is below 1e-7).
    """

    factor: Optional[Tensor] = None

    def apply(self, delta: Tensor) -> tuple[Tensor, Tensor]:
        """The masked (and rescaled) block, and the fp32 0/1 mask."""
        keep = self.keep(delta)
        masked = delta * keep
        return (masked if self.factor is None else masked * self.factor), keep

    def keep(self, delta: Tensor) -> Tensor:
        raise NotImplementedError

    def _rescale_from_pass(self, delta_at, n: int, size: int, device, keepers) -> None:
        """Set ``factor`` from a first pass over the blocks with this sparsifier's own
        deterministic :meth:`keep`, then rewind ``keepers`` (its top-k keepers, which
        count their tie quota as they go) for :meth:`apply`'s pass."""
        before = after = 0.0
        for sl in blocks(n, size):
            d = delta_at(sl)
            before += float(d.abs().sum())
            after += float((d * self.keep(d)).abs().sum())
        for k in keepers:
            if k is not None:
                k.reset()
        self._set_factor(before, after, device)

    def _set_factor(self, before: float, after: float, device) -> None:
        # Per-block fp32 sums added in double: one block (small tensors) gives
        # exactly torch's whole-tensor fp32 sum, which is mergekit's.
        if before >= 1e-7 and after >= 1e-7:
            self.factor = (torch.tensor(before, dtype=torch.float32, device=device)
                           / torch.tensor(after, dtype=torch.float32, device=device))


class Magnitude(Sparsifier):
    """Keep the ``k = max(1, int(density * n))`` largest ``|delta|`` (TIES)."""

    def __init__(self, delta_at, n: int, density: float, rescale: bool, size: int, device):
        k = max(1, int(density * n))
        self.keeper = topk_keeper(lambda ix: delta_at(ix).abs(), n, k, size)
        if rescale:
            self._rescale_from_pass(delta_at, n, size, device, [self.keeper])

    def keep(self, delta: Tensor) -> Tensor:
        return self.keeper(delta.abs())


#: Bytes of DARE keep-masks held per tensor between the two passes; above it the
#: second pass redraws them from the saved generator state instead.
DARE_MASK_BUDGET = 1 << 28


class RandomDrop(Sparsifier):
    """Keep each entry with probability ``density`` (DARE).

    One Bernoulli draw per entry from ``gen`` in index order, so the stream is the
    same as one whole-tensor ``torch.bernoulli`` (mergekit's) whatever the block
    size. The first pass draws (advancing ``gen`` past this expert, as mergekit
    does) and sums the L1 norms; the masks are kept for the second pass within
    ``budget`` bytes, else redrawn from the generator state saved before the first.
    """

    def __init__(self, delta_at, n: int, density: float, rescale: bool, size: int,
                 gen: torch.Generator, budget: int, device):
        self.density, self.size = density, size
        self.start = gen.get_state()
        self.masks: Optional[list] = [] if n <= budget else None
        before = after = 0.0
        for sl in blocks(n, size):
            keep = self._draw(sl.stop - sl.start, gen, device)
            if self.masks is not None:  # uint8: bool -> float casts are ~10x slower
                self.masks.append(keep.to(torch.uint8))
            if rescale:
                d = delta_at(sl)
                before += float(d.abs().sum())
                after += float((d * keep).abs().sum())
        if rescale:
            self._set_factor(before, after, device)
        self.device = device
        self.replay: Optional[torch.Generator] = None
        self.index = 0

    def _draw(self, length: int, gen: torch.Generator, device) -> Tensor:
        return torch.bernoulli(torch.full((length,), self.density, device=device), generator=gen)

    def keep(self, delta: Tensor) -> Tensor:
        if self.masks is not None:
            self.index += 1
            return self.masks[self.index - 1].float()
        if self.replay is None:
            self.replay = torch.Generator(device=self.device)
            self.replay.set_state(self.start)
        return self._draw(delta.numel(), self.replay, self.device)


def disjoint_mean_parts(weighted: Tensor, weights: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """TIES combine of the (N, L) weighted deltas: the sum of the entries that
    agree with the elected sign, and the sum of their weights (1 where none agree).

    The elected sign ``e`` of an entry is the sign of its column sum, a zero sum
    electing +; an entry agrees when its sign is ``e`` (zeros never agree). The
    result equals ``(weighted * agree).sum(0)`` and ``(weights * agree).sum(0)``
    in fewer operations, all on floats (on a CPU, ops on bool tensors cost 3-5x):
    ``relu(weighted * e)`` is ``|delta|`` where an entry agrees and 0 elsewhere,
    so its column sum times ``e`` is the agreeing sum (negation is exact in IEEE
    arithmetic, so the bits match). ``weights`` None means all weights are 1.
    """
    s = torch.sign(weighted.sum(dim=0))
    elected = s + (1.0 - s.abs())  # sign, with 0 (and -0.0) electing +
    agreeing = torch.relu(weighted * elected)
    mixed = agreeing.sum(dim=0) * elected
    agree = torch.sign(agreeing)
    divisor = agree.sum(dim=0) if weights is None else (weights * agree).sum(dim=0)
    return mixed, one_where_zero(divisor)


def one_where_zero(x: Tensor) -> Tensor:
    """``x`` with exact zeros replaced by 1 (a divisor guard without a bool mask)."""
    return x + (1.0 - torch.sign(x).abs())
