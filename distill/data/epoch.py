"""An epoch number that every DataLoader worker sees, persistent workers included.

Workers are separate processes holding copies of the dataset and collate function made when they start;
with ``persistent_workers=True`` they are never re-created, so a plain ``self.epoch = e`` in the main process
never reaches them. The epoch therefore lives in a one-element int64 tensor in shared memory: the main process
writes it, and the copies in the workers read the same memory. Set it before ``iter(loader)``: workers start
prefetching the new epoch's batches as soon as the iterator is created.
"""

from __future__ import annotations

import torch


class SharedEpoch:
    """A process-shared integer; ``value`` reads it, ``set(e)`` writes it."""

    def __init__(self, epoch: int = 0) -> None:
        self._t = torch.zeros((), dtype=torch.int64).share_memory_()
        self._t.fill_(int(epoch))

    @property
    def value(self) -> int:
        return int(self._t.item())

    def set(self, epoch: int) -> None:
        self._t.fill_(int(epoch))

    def __repr__(self) -> str:
        return f"SharedEpoch({self.value})"
