"""Sharded tracing on ``torch.distributed``: ``torchrun --nproc_per_node N -m harness run ...``.

Any launcher works that sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``,
with ``MASTER_ADDR`` and ``MASTER_PORT`` (torchrun sets all five; under
SLURM, export them from ``SLURM_PROCID``, ``SLURM_NTASKS`` and
``SLURM_LOCALID``). Every rank traces a contiguous shard of each trace the
run reads (:func:`harness.trace.trace_shard`: gloo on CPU, nccl on GPU, one
GPU per local rank), rank 0 merges the shards into the cache, and then runs
fits, evaluation and results alone from the cache, exactly as one process
would; the other ranks exit. For a batch-invariant quantizer the results
are bit-identical to a single-process run; for a batch-dependent one too
when no image is skipped (shards are cut at batch boundaries, and a skipped
image is refilled from its own shard).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from typing import Iterator

from harness.config import HarnessConfig
from harness.errors import ConfigError

@dataclasses.dataclass(frozen=True)
class Ranks:
    """This process's place among the launched ones."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def sharded(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls) -> "Ranks":
        """From ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``; one process when they are not set.

        Raises:
            ConfigError: values that are not integers, or a rank outside the world.
        """
        try:
            ranks = cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                        int(os.environ.get("LOCAL_RANK", 0)))
        except ValueError:
            raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers, as torchrun sets them") from None
        if not 0 <= ranks.rank < ranks.world:
            raise ConfigError(f"RANK={ranks.rank} is outside WORLD_SIZE={ranks.world}")
        return ranks


@contextlib.contextmanager
def process_group(ranks: Ranks, device: str) -> Iterator[str]:
    """The process group of ``ranks`` (nccl for CUDA, else gloo) while the block runs; yields this rank's device."""
    import torch
    import torch.distributed as dist

    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE={ranks.world} but {' and '.join(missing)} not set: launch with torchrun, "
                          "or export MASTER_ADDR and MASTER_PORT as well")
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(ranks.local_rank)
        device = f"cuda:{ranks.local_rank}"
    dist.init_process_group("nccl" if cuda else "gloo", rank=ranks.rank, world_size=ranks.world,
                            timeout=datetime.timedelta(hours=2), **({"device_id": torch.device(device)} if cuda else {}))
    try:
        yield device
    finally:
        dist.destroy_process_group()


def restore_threads(threads: int | None) -> None:
    """Give rank 0, which goes on alone after the sharded traces, ``threads`` torch threads (default: every CPU
    it may run on), not the one thread per process that torchrun's ``OMP_NUM_THREADS=1`` leaves it."""
    import torch

    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))


def trace_for_run(config: HarnessConfig, methods: list[str], seeds: list[int], ranks: Ranks) -> None:
    """Every trace a ``run`` of ``methods`` with ``config`` and ``seeds`` reads, sharded across ``ranks`` (all
    ranks call it)."""
    from harness.session import Session, run_traces
    from harness.trace import trace_shard

    session = Session(config, progress=ranks.rank == 0)
    done: set[tuple[str, bytes, tuple[str, ...]]] = set()
    for seed in seeds:
        seeded = session.seeded(seed)
        for rows, quants in seeded.trace_groups(run_traces(methods)):
            traced = (rows.part, rows.indices.tobytes(), tuple(quants))
            if traced in done:
                continue
            done.add(traced)
            quantized = [seeded.quantized(quant) for quant in quants]
            trace_shard(quantized, seeded.image_batches(rows, backbone=quantized[0][0]), seeded.classifier,
                        seeded.cache_dir, ranks.rank, ranks.world, progress=ranks.rank == 0)
