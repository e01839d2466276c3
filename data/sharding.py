"""Who reads what: ranks, DataLoader workers and the per-epoch unit order.

Every (rank, worker) pair is one *slot* with a global id
``rank * num_workers + worker``; there are ``world_size * num_workers`` slots.
Units (tar shards, or samples of the folder format) are assigned to slots in
one of three modes:

``by_unit``
    at least as many units as slots: slot ``g`` reads units ``g, g + T, ...``
    of the epoch's unit order (disjoint, covering everything).
``by_sample``
    fewer tar shards than slots: every slot reads every shard and keeps the
    samples whose index in the epoch stream is ``g`` modulo ``T`` (disjoint
    and covering, at the cost of reading each shard ``T`` times).
``all``
    fallback for a slot whose share produced no usable sample in a whole
    epoch of the infinite stream: it reads the whole dataset, in its own order,
    so that it keeps the trainer fed instead of spinning forever.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence, TypeVar

import paddle
import paddle.distributed

T = TypeVar("T")

BY_UNIT = "by_unit"
BY_SAMPLE = "by_sample"
ALL = "all"


def resolve_rank_and_world_size(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """Explicit values win; otherwise ``paddle.distributed`` (which reads
    ``PADDLE_TRAINER_ID``/``PADDLE_TRAINERS_NUM`` set by ``paddle.distributed.launch``)."""
    if world_size is None:
        world_size = paddle.distributed.get_world_size()
    if rank is None:
        rank = paddle.distributed.get_rank()
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")
    return rank, world_size


@dataclass(frozen=True)
class Slot:
    """One reader: a DataLoader worker (or the main process) of one rank."""

    rank: int
    world_size: int
    worker: int
    num_workers: int

    @classmethod
    def current(cls, rank: int, world_size: int) -> "Slot":
        """The slot of the calling process, from ``paddle.io.get_worker_info()``."""
        info = paddle.io.get_worker_info()
        if info is None:
            return cls(rank, world_size, 0, 1)
        return cls(rank, world_size, info.id, info.num_workers)

    @property
    def global_id(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def total(self) -> int:
        return self.world_size * self.num_workers


def split_mode(num_units: int, num_slots: int, kind: str) -> str:
    """``by_unit`` when every slot can get a unit (always for the folder format), else ``by_sample``."""
    return BY_UNIT if num_units >= num_slots or kind == "folder" else BY_SAMPLE


def epoch_units(units: Sequence[T], seed: int, epoch: int, shuffle: bool, salt: str = "") -> list[T]:
    """The order of ``units`` in ``epoch``: shared by all slots (same ``seed``/``epoch``) unless salted."""
    order = list(units)
    if shuffle:
        random.Random(f"units:{seed}:{epoch}:{salt}").shuffle(order)
    return order


@dataclass(frozen=True)
class Assignment:
    """What one slot reads in one epoch: ``units``, keeping stream index ``i`` iff ``i % stride == offset``."""

    units: list
    stride: int = 1
    offset: int = 0

    def owns_unit(self, index: int) -> bool:
        """Whether this slot is the one that reports structural damage of ``units[index]``.

        In ``by_sample`` mode every slot reads every shard; only one of them
        counts a truncated or unreadable shard, so the totals stay exact.
        """
        return index % self.stride == self.offset


def assign(units: Sequence[T], slot: Slot, mode: str) -> Assignment:
    """The share of ``slot`` of the already ordered ``units`` under ``mode``."""
    if mode == BY_UNIT:
        return Assignment(list(units[slot.global_id :: slot.total]))
    if mode == BY_SAMPLE:
        return Assignment(list(units), stride=slot.total, offset=slot.global_id)
    return Assignment(list(units))
