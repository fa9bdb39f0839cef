"""How work is split across processes so that no number depends on how many there are.

Every sharded pass of the package (calibration, evaluation, the alpha search) gives each process **whole
batches of the one-process order**: batch ``b`` (samples ``b*B ... b*B + B - 1`` of the data in its order) goes
to process ``b mod W``. Each batch therefore holds the same samples, in the same order, as in a one-process
run, and each attack on it is seeded the same way (from the seed and the batch's first index), so every
per-sample verdict, random starts included, is the one a single process computes; the per-process results are
then merged by sample index (verdicts) or by the exact Chan rule (moments). Lightning's own prediction sampler
deals out single samples instead (``r, r + W, ...``), which changes every batch's contents, and with them the
random starts, whenever W changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from meansparse_pl.errors import ConfigurationError


def process_group_size_and_rank() -> tuple[int, int]:
    """(world size, rank) of the initialised default process group, or (1, 0) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def merge_across_processes(distributed: bool | None) -> bool:
    """The one rule for ``distributed`` options of the Trainer-less Python API (calibration, evaluation, the
    alpha search): ``True`` / ``False`` as given; ``None`` merges when a process group of more than one process
    is initialised (then every process must make the same call). ``False`` keeps a call on one process free of
    collectives, e.g. on rank 0 after a DDP fit."""
    if distributed is None:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise ConfigurationError(
            "distributed=True needs an initialised torch.distributed process group; pass distributed=False to "
            "run on this process alone."
        )
    return bool(distributed)


def whole_batches(num_samples: int, batch_size: int, world_size: int, rank: int) -> list[int]:
    """The sample positions of process ``rank``: batches ``rank, rank + W, ...`` of the one-process order."""
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid sharding: batch_size {batch_size}, world_size {world_size}, rank {rank}")
    positions: list[int] = []
    for start in range(rank * batch_size, num_samples, world_size * batch_size):
        positions.extend(range(start, min(start + batch_size, num_samples)))
    return positions


class WholeBatchSampler(DistributedSampler):
    """A sampler that yields this process's :func:`whole_batches`; batch it with the same ``batch_size``.

    It is a ``DistributedSampler``, so Lightning keeps it instead of putting its own sampler in (which would
    deal out single samples). ``world_size`` / ``rank`` default to the process group's at iteration time. A
    process may get fewer batches than another, or none (fewer batches than processes): nothing here waits
    for the others, and the merge afterwards counts each sample once.
    """

    def __init__(
        self, num_samples: int, batch_size: int, world_size: int | None = None, rank: int | None = None
    ) -> None:
        # DistributedSampler.__init__ is not called: it needs a process group and a dataset, neither of which
        # this sampler uses (Lightning only checks the type)
        self.num_samples_total = int(num_samples)
        self.batch_size = int(batch_size)
        self._world_size = world_size
        self._rank = rank
        self.epoch = 0

    def _processes(self) -> tuple[int, int]:
        if self._world_size is not None and self._rank is not None:
            return self._world_size, self._rank
        return process_group_size_and_rank()

    def __iter__(self) -> Iterator[int]:
        return iter(whole_batches(self.num_samples_total, self.batch_size, *self._processes()))

    def __len__(self) -> int:
        return len(whole_batches(self.num_samples_total, self.batch_size, *self._processes()))

    def set_epoch(self, epoch: int) -> None:  # the order never changes
        self.epoch = epoch


def whole_batch_loader(
    dataset: Dataset, batch_size: int, world_size: int, rank: int, **options: Any
) -> DataLoader:
    """A DataLoader over this process's whole batches of ``dataset`` (``options``: the DataLoader's others, e.g.
    ``num_workers``)."""
    sampler = WholeBatchSampler(len(dataset), batch_size, world_size, rank)  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **options)


def whole_batches_of(
    loader: DataLoader, world_size: int, rank: int, limit: int | None = None, batch_size: int | None = None
) -> DataLoader:
    """``loader``'s data set (its first ``limit`` samples; None: all), batch size (or ``batch_size``), workers,
    collation and pinning, with this process's whole batches of its order."""
    dataset = loader.dataset
    if limit is not None:
        dataset = Subset(dataset, range(min(limit, len(dataset))))  # type: ignore[arg-type]
    return whole_batch_loader(
        dataset,
        batch_size or loader.batch_size or 1,
        world_size,
        rank,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
    )
