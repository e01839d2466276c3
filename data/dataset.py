"""The streaming dataset: a ``paddle.io.IterableDataset`` of ready-made batches.

Stream definition (what makes a run reproducible and resumable)
---------------------------------------------------------------
For a slot (rank, worker - see :mod:`data.sharding`) the infinite training
stream is the concatenation of epochs 0, 1, 2, ...  Epoch ``e`` is:

1. the units (shards or folder samples) in an order drawn from ``(seed, e)``,
   the same on every slot, of which the slot takes its share;
2. the raw (undecoded) samples of that share, in stored order, passed through
   a shuffle buffer of ``shuffle_buffer`` samples seeded by
   ``(seed, rank, worker, e)``;
3. each raw sample at 1-based *position* ``p`` of that shuffled sequence is
   decoded and transformed with an rng seeded by ``(seed, rank, worker, e, p)``
   (random crop, flip); unusable ones are skipped and counted.

So the stream is a pure function of the data, the seed, the slot and the
epoch.  The kept samples are grouped into batches of ``batch_size`` by the
slot itself (each sample is converted straight into its row of the batch
array, which saves a copy of every image), and every batch carries its slot's
state after its last sample -- ``epoch``, ``position``, ``fallback`` and the
cumulative ``skipped`` counts.  A dataset built with ``resume_state`` (see
``data.tracker.DataTracker``) starts each slot at its recorded epoch, replays
the first ``position`` raw samples without decoding them, and continues
exactly where the recorded run was; DataLoader workers take the slots' roles
rotated so that the reader whose batch was due next delivers first.

The one-pass stream (``infinite=False``) is epoch 0 in stored order without
the shuffle buffer.  Its last batch (possibly short) carries the slot's final
state, skips found after its last sample included; a slot that keeps no
sample at all yields one report-only batch instead (no samples,
``pixel_values`` None: paddle cannot ship zero-size tensors).
"""

from __future__ import annotations

import dataclasses
import random
import time
import warnings
from typing import Iterable, Iterator, Mapping, TypeVar

import numpy as np
import paddle

from .decode import SkipSample, decode_sample
from .readers import DEFAULT_MAX_MEMBER_BYTES, RawSample, iter_tar_samples, read_folder_sample
from .sharding import ALL, BY_SAMPLE, Assignment, Slot, assign, epoch_units, resolve_rank_and_world_size, split_mode
from .skips import SkipCounter
from .sources import DataPathError, DataSource
from .transforms import TransformConfig, transform_image

T = TypeVar("T")


def shuffle_buffer(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """Approximately shuffle a stream with a buffer of ``size`` items (deterministic for ``rng``)."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


class _BatchBuilder:
    """Accumulates the kept samples of one slot into a batch dict."""

    def __init__(self, batch_size: int, resolution: int, reader: int):
        self.pixel_values = np.empty((batch_size, 3, resolution, resolution), dtype=np.float32)
        self.captions: list[str] = []
        self.keys: list[str] = []
        self.sources: list[str] = []
        self.reader = reader

    @property
    def size(self) -> int:
        return len(self.captions)

    @property
    def full(self) -> bool:
        return self.size == len(self.pixel_values)

    def next_row(self) -> np.ndarray:
        """The batch row the next sample's pixels go to."""
        return self.pixel_values[self.size]

    def add(self, caption: str, key: str, source: str) -> None:
        self.captions.append(caption)
        self.keys.append(key)
        self.sources.append(source)

    def build(self, state: dict) -> dict:
        """The batch dict (see ``ImageCaptionDataset``), ``state`` being the slot's state after it."""
        return {
            "pixel_values": self.pixel_values[: self.size] if self.size else None,
            "captions": self.captions,
            "keys": self.keys,
            "sources": self.sources,
            "reader": np.array([self.reader], dtype=np.int64),
            "worker_state": state,
        }


class ImageCaptionDataset(paddle.io.IterableDataset):
    """Streams batch dicts; use it with ``paddle.io.DataLoader(dataset, batch_size=None)``.

    Each batch is ``{"pixel_values": float32 [B, 3, R, R] in [-1, 1],
    "captions": [str] * B, "keys": [str] * B, "sources": [str] * B (shard path,
    or the folder), "reader": int64 [1], "worker_state": dict}``, all samples
    from one slot.  ``worker_state`` is that slot's state after the batch:
    ``worker`` (the slot id, also in ``reader`` because paddle's DataLoader
    drops batches without any array), ``epoch``, ``position``, ``fallback``,
    cumulative ``skipped`` by reason, ``kept`` and ``busy_seconds`` (time
    spent reading, decoding and transforming).

    Args:
        source: the resolved ``--data_path`` (``data.sources.resolve_data_source``).
        transform: resolution, crop, flip and minimum size options.
        batch_size: samples per batch (B).
        seed: base seed of the stream (see the module docstring).
        infinite: the training stream (True) or one pass in stored order (False).
        shuffle_buffer: raw samples held by the shuffle buffer (infinite stream only).
        rank, world_size: override ``paddle.distributed``'s values (tests, tools).
        num_workers: the DataLoader's ``num_workers``, used to warn early when
            there are fewer shards than readers; the actual split always
            follows ``paddle.io.get_worker_info()``.
        resume_state: ``DataTracker.state_dict()`` of the run to resume.
        max_member_bytes: members/files above this size drop their sample unread (``--max_member_bytes``).
    """

    def __init__(
        self,
        source: DataSource,
        transform: TransformConfig,
        batch_size: int,
        *,
        seed: int = 0,
        infinite: bool = True,
        shuffle_buffer: int = 1000,
        rank: int | None = None,
        world_size: int | None = None,
        num_workers: int = 0,
        resume_state: Mapping | None = None,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.source = source
        self.transform = transform
        self.batch_size = batch_size
        self.seed = seed
        self.infinite = infinite
        self.shuffle_buffer = shuffle_buffer
        self.rank, self.world_size = resolve_rank_and_world_size(rank, world_size)
        self.num_workers = num_workers
        self.resume_state = dict(resume_state) if resume_state else None
        self.max_member_bytes = max_member_bytes
        readers = self.world_size * max(1, num_workers)
        if split_mode(len(source.units), readers, source.kind) == BY_SAMPLE:
            warnings.warn(
                f"--data_path {source.path!r} has {len(source.units)} shard(s) for {readers} readers "
                f"(ranks x workers): every reader reads every shard and keeps 1/{readers} of the samples",
                stacklevel=2,
            )

    def stream_config(self, num_workers: int | None = None) -> dict:
        """What a resume state must match to be replayed exactly."""
        workers = max(1, self.num_workers if num_workers is None else num_workers)
        return {
            "seed": self.seed,
            "world_size": self.world_size,
            "num_workers": workers,
            "batch_size": self.batch_size,
            "units": len(self.source.units),
        }

    def __iter__(self) -> Iterator[dict]:
        slot = Slot.current(self.rank, self.world_size)
        rotation = self._worker_rotation(slot.num_workers)
        if rotation:  # DataLoader worker i plays reader (i + rotation) % W: the round robin resumes mid-cycle
            slot = dataclasses.replace(slot, worker=(slot.worker + rotation) % slot.num_workers)
        return self._stream(slot)

    def _worker_rotation(self, num_workers: int) -> int:
        """The reader whose batch was due next when the resume state was recorded.

        Paddle's DataLoader takes batches from its workers round-robin starting at worker 0, so a run
        resumed after a number of batches that is not a multiple of the worker count rotates the
        readers' roles to keep the interleaving exact."""
        state = self.resume_state
        if not state or state.get("config") != self.stream_config(num_workers):
            return 0
        return int(state.get("next_worker", 0)) % max(1, num_workers)

    def _stream(self, slot: Slot) -> Iterator[dict]:
        epoch, skip_to, fallback, restored = self._start(slot)
        skips = SkipCounter()
        mode = split_mode(len(self.source.units), slot.total, self.source.kind)
        kept, busy = 0, 0.0

        def state(position: int) -> dict:
            return {
                "worker": slot.global_id,
                "epoch": epoch,
                "position": position,
                "fallback": fallback,
                "skipped": skips.as_dict(),
                "kept": kept,
                "busy_seconds": busy,
            }

        def new_batch() -> _BatchBuilder:
            return _BatchBuilder(self.batch_size, self.transform.resolution, slot.global_id)

        batch, pending = new_batch(), None  # one-pass: a full batch waits to know if it is the last
        while True:
            position, epoch_kept = 0, 0
            tick = time.perf_counter()
            for raw in self._epoch_raw_samples(slot, epoch, ALL if fallback else mode, skips):
                position += 1
                if position <= skip_to:
                    if position == skip_to:
                        skips.restore(restored)
                    continue
                try:
                    image, caption = decode_sample(
                        raw, min_image_size=self.transform.min_image_size, resolution=self.transform.resolution
                    )
                except SkipSample as skip:
                    skips.add(skip.reason)
                    continue
                if pending is not None:
                    busy += time.perf_counter() - tick
                    yield pending
                    pending, tick = None, time.perf_counter()
                rng = random.Random(f"sample:{self.seed}:{slot.rank}:{slot.worker}:{epoch}:{position}")
                transform_image(image, self.transform, rng, out=batch.next_row())
                batch.add(caption, raw.key, raw.source)
                kept += 1
                epoch_kept += 1
                if batch.full:
                    busy += time.perf_counter() - tick
                    if self.infinite:
                        yield batch.build(state(position))
                    else:
                        pending = batch.build(state(position))
                    batch = new_batch()
                    tick = time.perf_counter()
            busy += time.perf_counter() - tick
            if position < skip_to:  # the data changed since the state was recorded
                skips.restore(restored)
            if not self.infinite:
                if pending is not None:
                    pending["worker_state"] = state(position)
                    yield pending
                if batch.size or pending is None:
                    yield batch.build(state(position))
                return
            if epoch_kept == 0 and skip_to == 0:
                if fallback or slot.total == 1:
                    raise DataPathError(
                        self.source.path, f"no usable sample in a whole pass (skipped: {skips.as_dict()})"
                    )
                warnings.warn(
                    f"data reader {slot.global_id} got no usable sample from its share of "
                    f"{self.source.path!r} in epoch {epoch}; it now reads the whole dataset"
                )
                fallback = True
            epoch, skip_to = epoch + 1, 0

    def _start(self, slot: Slot) -> tuple[int, int, bool, dict]:
        """``(epoch, position, fallback, skipped)`` where this slot's stream starts."""
        state = self.resume_state
        if not state:
            return 0, 0, False, {}
        workers = state.get("workers", {})
        if state.get("config") != self.stream_config(slot.num_workers):
            epoch = 1 + max((int(w["epoch"]) for w in workers.values()), default=-1)
            warnings.warn(
                f"data resume state was recorded with {state.get('config')}, now {self.stream_config(slot.num_workers)}: "
                f"starting a fresh stream at epoch {epoch} instead of replaying it"
            )
            return epoch, 0, False, {}
        worker = workers.get(str(slot.global_id))
        if worker is None:
            return 0, 0, False, {}
        return int(worker["epoch"]), int(worker["position"]), bool(worker["fallback"]), dict(worker["skipped"])

    def _epoch_raw_samples(self, slot: Slot, epoch: int, mode: str, skips: SkipCounter) -> Iterator[RawSample]:
        salt = str(slot.global_id) if mode == ALL else ""
        units = epoch_units(self.source.units, self.seed, epoch, shuffle=self.infinite, salt=salt)
        raw = self._read(assign(units, slot, mode), skips)
        if self.infinite and self.shuffle_buffer > 1:
            rng = random.Random(f"buffer:{self.seed}:{slot.rank}:{slot.worker}:{epoch}")
            raw = shuffle_buffer(raw, self.shuffle_buffer, rng)
        return raw

    def _read(self, share: Assignment, skips: SkipCounter) -> Iterator[RawSample]:
        """Raw samples of ``share``; damage to shards this slot does not own goes uncounted."""
        if self.source.kind == "folder":
            for unit in share.units:
                raw = read_folder_sample(unit, self.source.path, skips, self.max_member_bytes)
                if raw is not None:
                    yield raw
            return
        index, not_counted = 0, SkipCounter()
        for unit_index, shard in enumerate(share.units):
            counter = skips if share.owns_unit(unit_index) else not_counted
            for raw in iter_tar_samples(shard, counter, self.max_member_bytes):
                if index % share.stride == share.offset:
                    yield raw
                index += 1
