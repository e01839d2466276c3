"""Data pipeline of the PCM trainer: image-caption pairs from tar shards or a folder.

Public API (see each module for details):

* :func:`validate_data_path` - cheap ``--data_path`` check, returns a description.
* :func:`build_train_dataloader` - the trainer's infinite sharded DataLoader.
* :func:`build_one_pass_dataloader` - one pass over every sample (inspection).
* :func:`count_image_samples` - samples with an image, from tar headers (epoch size).
* :class:`DataTracker` - skip counters, throughput and resume state from batches.
* :class:`SkipCounter`, :func:`aggregate_skip_counts`, :data:`SKIP_REASONS`.
* :data:`DEFAULT_MAX_MEMBER_BYTES` - default of ``--max_member_bytes`` (larger members are skipped unread).
* :class:`DataPathError` - ``--data_path`` holds nothing usable.
"""

from .dataset import ImageCaptionDataset
from .loader import build_dataset, build_one_pass_dataloader, build_train_dataloader
from .readers import DEFAULT_MAX_MEMBER_BYTES, count_image_samples
from .skips import SKIP_REASONS, SkipCounter, aggregate_skip_counts
from .sources import DataPathError, DataSource, expand_braces, resolve_data_source, validate_data_path
from .tracker import DataTracker
from .transforms import TransformConfig

__all__ = [
    "DEFAULT_MAX_MEMBER_BYTES",
    "SKIP_REASONS",
    "DataPathError",
    "DataSource",
    "DataTracker",
    "ImageCaptionDataset",
    "SkipCounter",
    "TransformConfig",
    "aggregate_skip_counts",
    "build_dataset",
    "build_one_pass_dataloader",
    "build_train_dataloader",
    "count_image_samples",
    "expand_braces",
    "resolve_data_source",
    "validate_data_path",
]
