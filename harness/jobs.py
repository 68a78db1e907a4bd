"""Independent jobs (configs of a sweep, experiments) split across processes or machines.

As CLIP_benchmark does it: every job writes its own results folder, ``--shard
I/N`` runs every N-th job from the I-th (0-based; without ``--shard``, a
launcher's ``RANK`` / ``WORLD_SIZE`` say it), ``--skip-existing`` skips jobs
whose folder is complete, and the leaderboard and tables are built from all
folders afterwards (``python -m harness leaderboard DIR``). Jobs need no
process group: each runs alone, start to end.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence, TypeVar

from harness.distributed import Ranks
from harness.errors import ConfigError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Shard:
    """Job shard ``index`` (0-based) of ``count``."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str | None) -> "Shard":
        """``"I/N"``; ``None``: from ``RANK`` / ``WORLD_SIZE`` when a launcher set them
        (:meth:`harness.distributed.Ranks.from_env`), else the one shard.

        Raises:
            ConfigError: not ``I/N`` with ``0 <= I < N`` (or launcher values that are not).
        """
        if text is None:
            ranks = Ranks.from_env()
            return cls(ranks.rank, ranks.world)
        index, _, count = text.partition("/")
        if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
            raise ConfigError(f"--shard {text}: expected I/N with 0 <= I < N, e.g. 0/4 ... 3/4")
        return cls(int(index), int(count))

    def mine(self, jobs: Sequence[T]) -> list[T]:
        """This shard's jobs: every ``count``-th from ``index`` (long and short jobs spread over the shards)."""
        return list(jobs[self.index::self.count])

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def complete(folder: Path, marker: str) -> bool:
    """A job's folder holds its results (folders are written atomically: whole, or absent)."""
    return (folder / marker).is_file()
