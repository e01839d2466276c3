"""Counting of skipped samples, by reason.

The pipeline never raises on bad data: every sample it cannot use, and every
member it drops from a sample it keeps (hidden or duplicate names), is counted
here under one of the reasons below.  Each DataLoader worker owns
one :class:`SkipCounter`; its cumulative counts travel to the main process
attached to every batch (see ``data.dataset.ImageCaptionDataset``) and are summed
there with :func:`aggregate_skip_counts` (or ``data.tracker.DataTracker``).
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable, Mapping

DECODE_ERROR = "decode_error"
"""Image bytes PIL cannot decode (garbage, truncated, unsupported), or a caption json that is not valid json."""
EMPTY_FILE = "empty_file"
"""An image or caption member/file of zero bytes (or a whitespace-only caption)."""
MISSING_IMAGE = "missing_image"
"""A caption (txt/json) without an image (jpg/jpeg/png/webp) of the same key."""
MISSING_CAPTION = "missing_caption"
"""An image without a txt caption or a json with a ``caption`` string."""
TRUNCATED_TAR = "truncated_tar"
"""A tar shard that is truncated or corrupt (counted once per shard; the samples after the damage are lost)."""
TOO_SMALL = "too_small"
"""An image whose shorter side is below ``--min_image_size``."""
TOO_LARGE = "too_large"
"""An image above PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``)."""
READ_ERROR = "read_error"
"""A shard or file that cannot be opened or read from disk (permissions, vanished file)."""
MEMBER_TOO_LARGE = "member_too_large"
"""A sample with a member or file above ``--max_member_bytes`` (declared size; never read)."""
NOT_REGULAR_FILE = "not_regular_file"
"""A sample with a member or file that is not a regular file: a link, FIFO or device in a tar; a FIFO,
socket, device, symlink loop or dangling symlink in a folder (never opened for reading)."""
HIDDEN_MEMBER = "hidden_member"
"""A tar member whose file name starts with "." (dropped; the rest of its sample is kept)."""
DUPLICATE_MEMBER = "duplicate_member"
"""A second member with the same key and extension within one sample (dropped; the first one is kept)."""

SKIP_REASONS = (
    DECODE_ERROR,
    EMPTY_FILE,
    MISSING_IMAGE,
    MISSING_CAPTION,
    TRUNCATED_TAR,
    TOO_SMALL,
    TOO_LARGE,
    READ_ERROR,
    MEMBER_TOO_LARGE,
    NOT_REGULAR_FILE,
    HIDDEN_MEMBER,
    DUPLICATE_MEMBER,
)


class SkipCounter:
    """Cumulative number of skipped samples per reason (one per worker)."""

    def __init__(self):
        self._counts: Counter[str] = Counter()

    def add(self, reason: str, n: int = 1) -> None:
        """Count ``n`` skipped samples for ``reason`` (one of ``SKIP_REASONS``)."""
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        self._counts[reason] += n

    def restore(self, counts: Mapping[str, int]) -> None:
        """Replace all counts by ``counts`` (a resumed stream restoring its recorded state)."""
        self._counts = Counter(counts)

    @property
    def total(self) -> int:
        """Number of skipped samples over all reasons."""
        return sum(self._counts.values())

    def as_dict(self) -> dict[str, int]:
        """Counts of the reasons seen so far, sorted by reason name."""
        return {reason: self._counts[reason] for reason in sorted(self._counts) if self._counts[reason]}


def aggregate_skip_counts(per_worker: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """Sum several workers' cumulative ``SkipCounter.as_dict()`` snapshots.

    Pass the *latest* snapshot of each worker (they are cumulative), e.g. the
    ``skipped`` field of the last batch received from each worker.
    """
    total: Counter[str] = Counter()
    for counts in per_worker:
        total.update(counts)
    return {reason: total[reason] for reason in sorted(total) if total[reason]}
