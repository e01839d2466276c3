"""Reading raw (undecoded) samples from tar shards and from the folder format.

Both readers yield :class:`RawSample` objects: a key and the bytes of each of
its members by extension, exactly as stored (webdataset conventions: in a tar,
the key of ``dir/000000123.jpg`` is ``dir/000000123`` - everything up to the
first dot of the file name - and consecutive members with the same key form
one sample).  Nothing is decoded here; structural damage is counted in the
given :class:`~data.skips.SkipCounter` and never raised.

Hostile input is stopped before it is read: a member or file above
``max_member_bytes`` (its declared size, e.g. a GNU sparse member declaring
2 GiB) and anything that is not a regular file (links and FIFOs in a tar; a
FIFO, device or symlink loop in a folder, opened without blocking) drop their
sample, counted; hidden (".") and duplicate members are dropped and counted.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from dataclasses import dataclass
from typing import Iterator

from .skips import (
    DUPLICATE_MEMBER,
    HIDDEN_MEMBER,
    MEMBER_TOO_LARGE,
    NOT_REGULAR_FILE,
    READ_ERROR,
    TRUNCATED_TAR,
    SkipCounter,
)
from .sources import IMAGE_EXTENSIONS, DataSource, FolderSample

_TAR_BLOCK = 512
DEFAULT_MAX_MEMBER_BYTES = 64 * 2**20
"""Default of ``--max_member_bytes``: larger members/files are skipped unread (64 MiB)."""


@dataclass
class RawSample:
    """A sample before decoding: ``members`` maps a lower-case extension to its bytes."""

    key: str
    source: str
    members: dict[str, bytes]


def split_member_name(name: str) -> tuple[str, str] | None:
    """``"d/000000123.jpg"`` -> ``("d/000000123", "jpg")``; None for hidden or extension-less names."""
    directory, base = os.path.split(name)
    if base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return os.path.join(directory, stem), ext.lower()


def iter_tar_samples(
    path: str, skips: SkipCounter, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
) -> Iterator[RawSample]:
    """Yield the samples of one tar shard in stored order.

    A shard that cannot be opened counts one ``read_error``.  A truncated or
    corrupt shard (bad header, data cut short, missing end-of-archive block)
    counts one ``truncated_tar``; the samples before the damage are yielded
    and the sample being read at the damage is dropped.  A sample with a
    member above ``max_member_bytes`` or a member that is not a regular file
    counts one ``member_too_large`` / ``not_regular_file`` (nothing of it is
    read); hidden and duplicate members count one each and are left out.
    """
    try:
        handle = open(path, "rb")
    except OSError:
        skips.add(READ_ERROR)
        return
    with handle:
        try:
            archive = tarfile.open(fileobj=handle, mode="r:")
        except tarfile.TarError:
            skips.add(TRUNCATED_TAR)
            return
        key, members, dropped = None, {}, None  # dropped: the reason the current sample is unusable
        try:
            for info in archive:
                if info.isdir():
                    continue
                if os.path.basename(info.name).startswith("."):
                    skips.add(HIDDEN_MEMBER)
                    continue
                named = split_member_name(info.name)
                if named is None:
                    continue
                if named[0] != key:
                    if dropped:
                        skips.add(dropped)
                    elif members:
                        yield RawSample(key, path, members)
                    key, members, dropped = named[0], {}, None
                if dropped:
                    continue
                if not info.isfile():
                    dropped = NOT_REGULAR_FILE
                elif info.size > max_member_bytes:
                    dropped = MEMBER_TOO_LARGE
                elif named[1] in members:
                    skips.add(DUPLICATE_MEMBER)
                else:
                    members[named[1]] = archive.extractfile(info).read()
        except (tarfile.TarError, EOFError, OSError):
            skips.add(TRUNCATED_TAR)
            return
        if not _ends_with_end_block(handle, archive.offset):
            skips.add(TRUNCATED_TAR)
            return
        if dropped:
            skips.add(dropped)
        elif members:
            yield RawSample(key, path, members)


def _ends_with_end_block(handle, offset: int) -> bool:
    """True if a zero block follows the last member (``tarfile`` silently stops at damage)."""
    handle.seek(offset)
    return handle.read(_TAR_BLOCK) == bytes(_TAR_BLOCK)


def read_folder_sample(
    sample: FolderSample, root: str, skips: SkipCounter, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES
) -> RawSample | None:
    """Read the files of one folder-format sample; None (counted) if one is unreadable (``read_error``),
    not a regular file or a symlink loop (``not_regular_file``) or above ``max_member_bytes``
    (``member_too_large``). Duplicate files of the sample (``a.jpg`` and ``a.JPG``) are counted."""
    if sample.duplicates:
        skips.add(DUPLICATE_MEMBER, sample.duplicates)
    members = {}
    for ext, file_path in sample.files.items():
        reason = None
        try:
            descriptor = os.open(file_path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the reader
        except OSError as error:
            reason = NOT_REGULAR_FILE if error.errno == errno.ELOOP else READ_ERROR
        else:
            try:
                with os.fdopen(descriptor, "rb") as handle:
                    info = os.fstat(handle.fileno())
                    if not stat.S_ISREG(info.st_mode):
                        reason = NOT_REGULAR_FILE
                    elif info.st_size > max_member_bytes:
                        reason = MEMBER_TOO_LARGE
                    else:
                        members[ext] = handle.read(max_member_bytes + 1)
                        reason = MEMBER_TOO_LARGE if len(members[ext]) > max_member_bytes else None
            except OSError:
                reason = READ_ERROR
        if reason:
            skips.add(reason)
            return None
    return RawSample(sample.key, root, members)


def count_image_samples(source: DataSource) -> int:
    """Samples with an image in ``source``, from tar headers or file names: nothing is decoded, so
    bad images still count (an epoch's size for ``--num_train_epochs``). Unreadable shards count 0."""
    if source.kind == "folder":
        return len(source.units)
    total = 0
    for shard in source.units:
        try:
            with tarfile.open(shard, mode="r:") as archive:
                named = (split_member_name(info.name) for info in archive if info.isfile())
                total += len({n[0] for n in named if n is not None and n[1] in IMAGE_EXTENSIONS})
        except (OSError, tarfile.TarError, EOFError):
            continue
    return total
