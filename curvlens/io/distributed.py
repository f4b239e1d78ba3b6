"""Which sharded training layout a path holds: DeepSpeed ZeRO or ``torch.distributed.checkpoint``.

The one hook :meth:`curvlens.Moments.open` calls when a dir holds neither the
paper's export nor an ``optimizer.pt``.
"""
from __future__ import annotations

from pathlib import Path

from curvlens.io.dcp import find_dcp_dir, open_dcp_moments
from curvlens.io.deepspeed import find_step_dir, open_deepspeed
from curvlens.io.sharded_source import ShardedSource

#: How the layouts read here are named in "nothing found" messages.
LAYOUTS = ("a DeepSpeed ZeRO checkpoint (latest + global_stepN/zero_pp_rank_R_mp_rank_00_optim_states.pt)",
           "a torch.distributed.checkpoint dir (.metadata + *.distcp) holding an optimizer state")


def find_sharded(path: Path) -> ShardedSource | None:
    """The sharded moments at ``path`` (a run / ``checkpoint-N`` dir, a
    ``global_stepN`` dir, DeepSpeed's ``latest`` file, a DCP dir or a dir holding
    one ``optimizer_*`` DCP dir), or None when it holds none of these."""
    step_dir = find_step_dir(path)
    if step_dir is not None:
        return open_deepspeed(step_dir)
    dcp_dir = find_dcp_dir(path)
    if dcp_dir is not None:
        return open_dcp_moments(dcp_dir)
    return None
