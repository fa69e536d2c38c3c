"""What every loader shares: one seeded permutation per epoch, sharded over ranks, and a
resume state that is just the epoch counter.

The permutation of epoch ``e`` depends only on ``(seed, e)``; with several ranks it is padded
by repeating its head up to a multiple of ``world_size`` (as ``DistributedSampler`` does) and
rank ``r`` takes ``perm[r::world_size]``. Test splits are not shuffled or padded: rank ``r``
takes ``r, r + world_size, ...``, so summing per-rank counts is exact.
"""
from __future__ import annotations

import hashlib
from typing import Union

import torch

from errors import UserError


def derive_seed(*parts: Union[int, str]) -> int:
    """A 63-bit seed that depends on every part (no collisions like seed + epoch)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def shard_size(n: int, rank: int, world_size: int, train: bool) -> int:
    """Samples rank ``rank`` yields per epoch out of ``n`` (training shards are padded)."""
    return -(-n // world_size) if train else len(range(rank, n, world_size))


def epoch_order(n: int, seed: int, epoch: int, rank: int, world_size: int, train: bool,
                generator: torch.Generator) -> torch.Tensor:
    """``[shard_size]`` int64 sample indices of this rank for ``epoch`` (0-based), on the
    generator's device; ``generator`` is reseeded from ``(seed, epoch)``."""
    device = generator.device
    if not train:
        return torch.arange(rank, n, world_size, device=device)
    generator.manual_seed(derive_seed(seed, "perm", epoch))
    perm = torch.randperm(n, generator=generator, device=device)
    total = shard_size(n, rank, world_size, True) * world_size
    if total > n:
        perm = torch.cat([perm, perm[: total - n]])
    return perm[rank::world_size]


class EpochState:
    """The resume state of a loader whose randomness is a function of ``(seed, epoch)``:
    the number of epochs started, and the seed it must be resumed with."""

    seed: int
    epoch: int

    def state_dict(self) -> dict[str, int]:
        """Plain ints (safe for ``torch.load(weights_only=True)``), at epoch granularity."""
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restores :meth:`state_dict`; the next epoch then matches the uninterrupted run."""
        if int(state["seed"]) != self.seed:
            raise UserError(f"the run being resumed used --seed {state['seed']}, this one "
                            f"uses --seed {self.seed}; resume with the same seed.")
        self.epoch = int(state["epoch"])
