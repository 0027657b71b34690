"""Rank, world size and barriers for commands started by torchrun (or any launcher that sets RANK/WORLD_SIZE).

The ranks of an encode run exchange no tensors, only "wait until everyone got here", so the process group is
always gloo, also on GPUs: a barrier needs no NCCL communicator, and gloo's works without picking a device.
"""

from __future__ import annotations

import datetime

import torch

from ..settings import Ranks  # noqa: F401 - the encode job's ranks are the settings' (one parser of RANK & co.)

# A rank that finishes its shards early waits at the final barrier for the slowest one, which on a large corpus
# can take days; the default 30-minute collective timeout would kill healthy runs.
BARRIER_TIMEOUT = datetime.timedelta(days=7)


def default_device(ranks: Ranks) -> str:
    """cuda:LOCAL_RANK when CUDA is present (one GPU per process on each node), else the CPU."""
    return f"cuda:{ranks.local_rank}" if torch.cuda.is_available() else "cpu"


class ProcessGroup:
    """A gloo process group when there is more than one rank; every method is a no-op for a single process."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.active = False

    def __enter__(self) -> "ProcessGroup":
        if self.ranks.world_size > 1:
            import torch.distributed as dist

            dist.init_process_group("gloo", rank=self.ranks.rank, world_size=self.ranks.world_size,
                                    timeout=BARRIER_TIMEOUT)
            self.active = True
        return self

    def barrier(self) -> None:
        """Wait until every rank has reached this barrier (a no-op for a single process)."""
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def __exit__(self, *exc) -> None:
        if self.active:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.active = False
