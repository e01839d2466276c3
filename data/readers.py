"""Reading raw (undecoded) samples from tar shards and from the folder format.

Both readers yield :class:`RawSample` objects: a key and the bytes of each of
its members by extension, exactly as stored (webdataset conventions: in a tar,
the key of ``dir/000000123.jpg`` is ``dir/000000123`` - everything up to the
first dot of the file name - and consecutive members with the same key form
one sample).  Nothing is decoded here; structural damage is counted in the
given :class:`~data.skips.SkipCounter` and never raised.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from typing import Iterator

from .skips import READ_ERROR, TRUNCATED_TAR, SkipCounter
from .sources import IMAGE_EXTENSIONS, DataSource, FolderSample

_TAR_BLOCK = 512


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


def iter_tar_samples(path: str, skips: SkipCounter) -> Iterator[RawSample]:
    """Yield the samples of one tar shard in stored order.

    A shard that cannot be opened counts one ``read_error``.  A truncated or
    corrupt shard (bad header, data cut short, missing end-of-archive block)
    counts one ``truncated_tar``; the samples before the damage are yielded
    and the sample being read at the damage is dropped.
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
        key, members = None, {}
        try:
            for info in archive:
                named = split_member_name(info.name) if info.isfile() else None
                if named is None:
                    continue
                if named[0] != key:
                    if members:
                        yield RawSample(key, path, members)
                    key, members = named[0], {}
                members[named[1]] = archive.extractfile(info).read()
        except (tarfile.TarError, EOFError, OSError):
            skips.add(TRUNCATED_TAR)
            return
        if not _ends_with_end_block(handle, archive.offset):
            skips.add(TRUNCATED_TAR)
            return
        if members:
            yield RawSample(key, path, members)


def _ends_with_end_block(handle, offset: int) -> bool:
    """True if a zero block follows the last member (``tarfile`` silently stops at damage)."""
    handle.seek(offset)
    return handle.read(_TAR_BLOCK) == bytes(_TAR_BLOCK)


def read_folder_sample(sample: FolderSample, root: str, skips: SkipCounter) -> RawSample | None:
    """Read the files of one folder-format sample; None (counted ``read_error``) if one is unreadable."""
    members = {}
    for ext, file_path in sample.files.items():
        try:
            with open(file_path, "rb") as handle:
                members[ext] = handle.read()
        except OSError:
            skips.add(READ_ERROR)
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
