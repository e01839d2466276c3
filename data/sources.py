"""Detection of the ``--data_path`` format and listing of its units of work.

Four layouts are accepted, detected in this order:

1. a brace pattern such as ``./cc3m/cc3m-train-{0000..0575}.tar`` (every
   expanded path must be an existing ``.tar`` file);
2. a single ``.tar`` file;
3. a directory holding ``.tar`` files (top level only, sorted by name);
4. a directory (searched recursively) of images with same-stem ``.txt`` (or
   ``.json``) captions: ``a/b.jpg`` + ``a/b.txt``.

A "unit" is what gets distributed over ranks and workers: a shard path for
the tar formats, one :class:`FolderSample` for the folder format.  Anything
unusable raises :class:`DataPathError`, whose message is one line starting
with ``--data_path``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Union

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""Image member extensions, in order of preference when a sample has several."""
CAPTION_EXTENSIONS = ("txt", "json")
"""Caption member extensions, in order of preference."""

_EXPECTED = (
    "expected a directory of .tar shards, a brace pattern like "
    "'./cc3m/cc3m-train-{0000..0575}.tar', a single .tar file, or a directory of "
    "images (jpg/jpeg/png/webp) with same-stem .txt captions"
)


class DataPathError(ValueError):
    """``--data_path`` names nothing usable; the message is a single line."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"--data_path {path!r}: {problem}; {_EXPECTED}")
        self.path = path


@dataclass(frozen=True)
class FolderSample:
    """One sample of the folder format: its key, its files by extension and how many more files had a
    key and extension already taken (``a.JPG`` beside ``a.jpg``: the first by name is used)."""

    key: str
    files: dict[str, str]
    duplicates: int = 0


Unit = Union[str, FolderSample]


@dataclass(frozen=True)
class DataSource:
    """A resolved ``--data_path``.

    Attributes:
        path: the path as given.
        kind: ``"tar"`` or ``"folder"``.
        units: shard paths (tar) or :class:`FolderSample` objects (folder),
            in a deterministic (sorted) order.
        description: one human-readable line, e.g. for the training log.
    """

    path: str
    kind: str
    units: tuple[Unit, ...]
    description: str

    @property
    def num_shards(self) -> int:
        """Number of tar shards (0 for the folder format)."""
        return len(self.units) if self.kind == "tar" else 0


def expand_braces(pattern: str) -> list[str]:
    """Expand shell-style braces: ``{0000..0575}`` (zero-padded ranges) and ``{a,b}``.

    Several and nested groups are allowed; the result keeps the written order.
    A pattern without braces expands to itself.
    """
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth = 0
    for end in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[end], 0)
        if depth == 0:
            break
    else:
        raise ValueError(f"unbalanced '{{' in {pattern!r}")
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    tails = expand_braces(tail)
    return [head + choice + rest for choice in _brace_choices(body) for rest in tails]


def _brace_choices(body: str) -> list[str]:
    """The alternatives of one brace group's inner text."""
    numeric = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if numeric:
        first, last = numeric.groups()
        lo, hi = int(first), int(last)
        padded = first.lstrip("-").startswith("0") or last.lstrip("-").startswith("0")
        width = max(len(first), len(last)) if padded else 0
        step = 1 if hi >= lo else -1
        return [str(i).zfill(width) for i in range(lo, hi + step, step)]
    parts, depth, current = [], 0, ""
    for char in body:
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        depth += {"{": 1, "}": -1}.get(char, 0)
        current += char
    parts.append(current)
    return [expanded for part in parts for expanded in expand_braces(part)]


def resolve_data_source(path: str) -> DataSource:
    """Detect the format of ``path`` and list its units (see the module docstring).

    Raises:
        DataPathError: ``path`` holds nothing usable.
    """
    if not path:
        raise DataPathError(path, "empty path")
    if "{" in path:
        return _brace_source(path)
    if os.path.isfile(path):
        if not path.endswith(".tar"):
            raise DataPathError(path, "is a file but not a .tar shard")
        return DataSource(path, "tar", (path,), f"single tar shard {path}")
    if not os.path.isdir(path):
        raise DataPathError(path, "does not exist")
    shards = sorted(entry.path for entry in os.scandir(path) if entry.name.endswith(".tar") and _is_file(entry))
    if shards:
        return DataSource(path, "tar", tuple(shards), f"{len(shards)} tar shard(s) in directory {path}")
    return _folder_source(path)


def _is_file(entry: os.DirEntry) -> bool:
    """``entry.is_file()``, False for a symlink loop (ELOOP) or another entry that cannot be inspected."""
    try:
        return entry.is_file()
    except OSError:
        return False


def validate_data_path(path: str) -> str:
    """Cheaply check ``path`` before any model is loaded; return its one-line description.

    Raises:
        DataPathError: ``path`` holds nothing usable.
    """
    return resolve_data_source(path).description


def _brace_source(path: str) -> DataSource:
    try:
        shards = expand_braces(path)
    except ValueError as error:
        raise DataPathError(path, str(error)) from None
    not_tar = [shard for shard in shards if not shard.endswith(".tar")]
    if not_tar:
        raise DataPathError(path, f"the brace pattern expands to non-.tar paths such as {not_tar[0]!r}")
    missing = [shard for shard in shards if not os.path.isfile(shard)]
    if len(missing) == len(shards):
        raise DataPathError(path, f"none of the {len(shards)} shard(s) of the brace pattern exists")
    if missing:
        raise DataPathError(
            path, f"{len(missing)} of the {len(shards)} shard(s) of the brace pattern do not exist (first: {missing[0]!r})"
        )
    return DataSource(path, "tar", tuple(shards), f"{len(shards)} tar shard(s) from brace pattern {path}")


def _folder_source(root: str) -> DataSource:
    wanted = set(IMAGE_EXTENSIONS) | set(CAPTION_EXTENSIONS)
    groups: dict[str, dict[str, str]] = {}
    duplicates: dict[str, int] = {}
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = [name for name in subdirs if not name.startswith(".")]
        for name in sorted(files):
            stem, ext = os.path.splitext(name)
            ext = ext[1:].lower()
            if name.startswith(".") or ext not in wanted:
                continue
            full = os.path.join(directory, name)
            key = os.path.relpath(os.path.join(directory, stem), root)
            if ext in groups.setdefault(key, {}):
                duplicates[key] = duplicates.get(key, 0) + 1
                continue
            groups[key][ext] = full
    images = sum(1 for files in groups.values() if any(ext in files for ext in IMAGE_EXTENSIONS))
    pairs = sum(
        1
        for files in groups.values()
        if any(ext in files for ext in IMAGE_EXTENSIONS) and any(ext in files for ext in CAPTION_EXTENSIONS)
    )
    if not groups:
        raise DataPathError(root, "directory contains no .tar shards and no image or caption files")
    if pairs == 0:
        raise DataPathError(
            root, f"directory has {images} image(s) but none with a same-stem .txt/.json caption"
        )
    units = tuple(FolderSample(key, groups[key], duplicates.get(key, 0)) for key in sorted(groups))
    description = (
        f"image folder {root}: {len(units)} sample key(s), {images} image(s), "
        f"{pairs} with a caption"
    )
    return DataSource(root, "folder", units, description)
