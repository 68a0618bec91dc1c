"""Augmentation randomness as a function of (seed, epoch, sample) instead of a worker's RNG history.

Each sample's transforms and each batch's collate ops run under RNG states seeded from these numbers, then the
caller's states are restored. So the same epoch produces the same batches whatever the number of workers,
whether workers persist across epochs, and after a resume from a checkpoint: what exact resume needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import random

import numpy as np
import torch


def mix(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions, unlike ``hash``)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@contextlib.contextmanager
def seeded(seed: int):
    """Run the block with python ``random``, numpy's global RNG and torch's CPU RNG seeded from ``seed``."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
