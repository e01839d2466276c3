"""Entry points: the DataLoaders the trainer and the tools use."""

from __future__ import annotations

from typing import Callable, Mapping

import paddle

from .dataset import ImageCaptionDataset
from .readers import DEFAULT_MAX_MEMBER_BYTES
from .sources import resolve_data_source
from .transforms import TransformConfig


def build_dataset(
    data_path: str,
    resolution: int,
    batch_size: int,
    *,
    seed: int = 0,
    center_crop: bool = False,
    random_flip: bool = False,
    min_image_size: int = 0,
    infinite: bool = True,
    shuffle_buffer: int = 1000,
    num_workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    resume_state: Mapping | None = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> ImageCaptionDataset:
    """Resolve ``data_path`` and build the streaming dataset (see ``data.dataset``).

    Raises:
        data.sources.DataPathError: ``data_path`` holds nothing usable.
    """
    return ImageCaptionDataset(
        resolve_data_source(data_path),
        TransformConfig(resolution, center_crop, random_flip, min_image_size),
        batch_size,
        seed=seed,
        infinite=infinite,
        shuffle_buffer=shuffle_buffer,
        rank=rank,
        world_size=world_size,
        num_workers=num_workers,
        resume_state=resume_state,
        max_member_bytes=max_member_bytes,
    )


def _dataloader(dataset: ImageCaptionDataset, num_workers: int, worker_init_fn: Callable | None = None) -> paddle.io.DataLoader:
    """The dataset batches itself (see ``ImageCaptionDataset``), hence ``batch_size=None``. (Paddle's own
    ``timeout`` only sets how often a waiting reader checks for dead workers; the trainer bounds the wait
    for a batch itself, see ``run_control.BatchStream``.)"""
    return paddle.io.DataLoader(dataset, batch_size=None, num_workers=num_workers, worker_init_fn=worker_init_fn)


def build_train_dataloader(
    data_path: str,
    resolution: int,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    center_crop: bool = False,
    random_flip: bool = False,
    min_image_size: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    shuffle_buffer: int = 1000,
    resume_state: Mapping | None = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    worker_init_fn: Callable | None = None,
) -> paddle.io.DataLoader:
    """The trainer's infinite, shuffled, rank- and worker-sharded DataLoader.

    Yields dicts ``{"pixel_values": float32 Tensor [B, 3, R, R] in [-1, 1],
    "captions": list[str], "keys": list[str], "sources": list[str],
    "reader": int64 Tensor [1], "worker_state": dict}`` forever (see
    ``data.dataset.ImageCaptionDataset``; feed each batch to a
    ``data.tracker.DataTracker`` for skip counts and the resume state).
    ``rank``/``world_size`` default to ``paddle.distributed``; ``worker_init_fn(worker_id)`` runs first in
    each worker process (the trainer's makes workers ignore stop signals and die with their rank).

    Raises:
        data.sources.DataPathError: ``data_path`` holds nothing usable.
    """
    dataset = build_dataset(
        data_path,
        resolution,
        batch_size,
        seed=seed,
        center_crop=center_crop,
        random_flip=random_flip,
        min_image_size=min_image_size,
        infinite=True,
        shuffle_buffer=shuffle_buffer,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
        resume_state=resume_state,
        max_member_bytes=max_member_bytes,
    )
    return _dataloader(dataset, num_workers, worker_init_fn)


def build_one_pass_dataloader(
    data_path: str,
    resolution: int,
    batch_size: int = 16,
    num_workers: int = 0,
    seed: int = 0,
    center_crop: bool = False,
    random_flip: bool = False,
    min_image_size: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> paddle.io.DataLoader:
    """One pass over this rank's share of every sample, in stored order, with the training transforms.

    Same batch dicts as :func:`build_train_dataloader`; each worker's last
    batch may be short and carries its final skip counts (a worker that kept
    nothing sends one batch with no samples and ``pixel_values`` None).
    """
    dataset = build_dataset(
        data_path,
        resolution,
        batch_size,
        seed=seed,
        center_crop=center_crop,
        random_flip=random_flip,
        min_image_size=min_image_size,
        infinite=False,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
        max_member_bytes=max_member_bytes,
    )
    return _dataloader(dataset, num_workers)
