"""Write a tiny synthetic CC3M-like dataset, optionally with every kind of bad sample.

Layout (``--format wds``, the pixparse/cc3m-wds layout): shards
``cc3m-train-0000.tar`` ... whose samples have a 9-digit key (``000000123``)
and the members ``.jpg``, ``.txt`` (the caption) and ``.json``
(``{"caption", "key", "status", "width", "height"}``).  ``--format folder``
writes the same samples as ``<key>.jpg`` + ``<key>.txt`` (+ ``<key>.json``)
files in one directory (``num_shards * samples_per_shard`` samples).

Images are noisy gradients with coloured shapes, of random sizes between
``--min_size`` and ``--max_size`` per side (so varied aspect ratios), with a
caption describing them.  Everything is a pure function of ``--seed``: two
runs write byte-identical files.

``--bad_samples`` adds, to the first shard, one sample of each bad kind
(named by the skip reason the data pipeline reports for it) and one sample of
each valid-but-unusual kind, and truncates the last shard inside one of its
last samples:

==========================  ===============  ===================================
kind                        reason           members
==========================  ===============  ===================================
undecodable                 decode_error     random bytes as .jpg, .txt, .json
truncated_jpeg              decode_error     first half of a JPEG, .txt, .json
empty_image                 empty_file       0-byte .jpg, .txt, .json
empty_caption               empty_file       .jpg, 0-byte .txt
caption_only                missing_image    .txt, .json
image_only                  missing_caption  .jpg
bomb_error / bomb_warning   too_large        PNG header above PIL's pixel limits
truncated shard (wds only)  truncated_tar    the last shard is cut mid-member
==========================  ===============  ===================================

Valid unusual samples: L, LA, P (transparent) and I;16 PNGs, RGBA PNG and
WebP, RGB WebP, CMYK JPEG, a ``.jpeg`` member, and a caption only in the json.

The last printed line is a JSON summary; :func:`make_tiny_cc3m` returns the
same dict plus ``valid_sizes`` (``{key: [width, height]}`` of every sample the
pipeline should keep).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import struct
import sys
import tarfile
import zlib

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "orange": (240, 140, 30),
    "yellow": (240, 220, 50),
    "green": (50, 170, 70),
    "teal": (30, 160, 160),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "pink": (240, 130, 180),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "ellipse", "rectangle")
BAD_KINDS = {
    "undecodable": "decode_error",
    "truncated_jpeg": "decode_error",
    "empty_image": "empty_file",
    "empty_caption": "empty_file",
    "caption_only": "missing_image",
    "image_only": "missing_caption",
    "bomb_error": "too_large",
    "bomb_warning": "too_large",
}
ODD_KINDS = ("L.png", "LA.png", "P.png", "I;16.png", "RGBA.png", "RGBA.webp", "RGB.webp", "CMYK.jpg", "RGB.jpeg", "json_caption")
_MTIME = 1_700_000_000  # fixed, so that shards are byte-identical for a seed


def synthetic_image(rng: random.Random, width: int, height: int) -> tuple[Image.Image, str]:
    """A noisy gradient background with 1-3 coloured shapes, and a caption describing it."""
    (name_a, color_a), (name_b, color_b) = rng.sample(sorted(COLORS.items()), 2)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = xs / width * np.cos(angle) + ys / height * np.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    pixels = np.asarray(color_a, np.float32) * (1 - ramp[..., None]) + np.asarray(color_b, np.float32) * ramp[..., None]
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    described = []
    for _ in range(rng.randint(1, 3)):
        shape = rng.choice(SHAPES)
        color_name, color = rng.choice(sorted(COLORS.items()))
        size = rng.uniform(0.2, 0.6) * min(width, height)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        stretch = 1.0 if shape in ("circle", "square", "triangle") else rng.uniform(1.3, 2.0)
        box = (cx - size * stretch / 2, cy - size / 2, cx + size * stretch / 2, cy + size / 2)
        if shape in ("circle", "ellipse"):
            draw.ellipse(box, fill=color)
        elif shape == "triangle":
            draw.polygon([(cx, box[1]), (box[2], box[3]), (box[0], box[3])], fill=color)
        else:
            draw.rectangle(box, fill=color)
        described.append(f"a {'small' if size < 0.35 * min(width, height) else 'large'} {color_name} {shape}")
    noise = np.random.default_rng(rng.getrandbits(64)).normal(0.0, 8.0, (height, width, 1))
    textured = np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(textured, "RGB")  # photo-like entropy, so JPEG sizes and decode costs are realistic
    caption = f"{', '.join(described[:-1])}{' and ' if len(described) > 1 else ''}{described[-1]} on a {name_a} to {name_b} gradient"
    return image, caption


def encode(image: Image.Image, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": quality} if fmt in ("JPEG", "WEBP") else {}))
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A PNG header announcing ``width`` x ``height`` pixels (PIL rejects it before decoding)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def odd_image(kind: str, image: Image.Image, quality: int) -> tuple[str, bytes]:
    """``(extension, bytes)`` of ``image`` stored in the unusual mode/format ``kind``."""
    mode, ext = kind.split(".")
    if mode == "I;16":
        grey = np.asarray(image.convert("L"), np.uint16) * 257
        return ext, encode(Image.fromarray(grey), "PNG", quality)
    if mode == "P":
        paletted = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        paletted.info["transparency"] = 0
        return ext, encode(paletted, "PNG", quality)
    converted = image.convert(mode)
    if "A" in mode:
        alpha = Image.linear_gradient("L").resize(image.size)
        converted.putalpha(alpha)
    fmt = {"png": "PNG", "webp": "WEBP", "jpg": "JPEG", "jpeg": "JPEG"}[ext]
    return ext, encode(converted, fmt, quality)


def sample_members(kind: str, key: str, rng: random.Random, min_size: int, max_size: int, quality: int) -> dict:
    """Members (extension -> bytes) of one sample of ``kind`` (``valid``, a bad kind or an odd kind)."""
    width, height = rng.randint(min_size, max_size), rng.randint(min_size, max_size)
    image, caption = synthetic_image(rng, width, height)
    jpeg = encode(image, "JPEG", quality)
    text = caption.encode()
    meta = json.dumps({"caption": caption, "key": key, "status": "success", "width": width, "height": height}).encode()
    if kind == "valid":
        members = {"jpg": jpeg, "txt": text, "json": meta}
    elif kind == "undecodable":
        members = {"jpg": rng.randbytes(len(jpeg)), "txt": text, "json": meta}
    elif kind == "truncated_jpeg":
        members = {"jpg": jpeg[: len(jpeg) // 2], "txt": text, "json": meta}
    elif kind == "empty_image":
        members = {"jpg": b"", "txt": text, "json": meta}
    elif kind == "empty_caption":
        members = {"jpg": jpeg, "txt": b""}
    elif kind == "caption_only":
        members = {"txt": text, "json": meta}
    elif kind == "image_only":
        members = {"jpg": jpeg}
    elif kind == "bomb_error":  # > 2 * Image.MAX_IMAGE_PIXELS: DecompressionBombError
        members = {"png": bomb_png(30000, 30000), "txt": text}
    elif kind == "bomb_warning":  # > Image.MAX_IMAGE_PIXELS: DecompressionBombWarning
        members = {"png": bomb_png(10000, 10000), "txt": text}
    elif kind == "json_caption":
        members = {"jpg": jpeg, "json": meta}
    else:
        ext, data = odd_image(kind, image, quality)
        members = {ext: data, "txt": text, "json": meta}
    return {"members": members, "size": [width, height]}


def write_tar(path: str, samples: list[tuple[str, dict]]) -> None:
    """Write ``(key, members)`` samples to a tar, members in sorted extension order."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as archive:
        for key, members in samples:
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(members[ext]), _MTIME, 0o644
                archive.addfile(info, io.BytesIO(members[ext]))


def truncate_tar_inside(path: str, key: str) -> None:
    """Cut the tar in the middle of the first member of ``key`` (its header stays whole)."""
    with tarfile.open(path) as archive:
        member = next(info for info in archive if info.name.startswith(f"{key}."))
    with open(path, "r+b") as handle:
        handle.truncate(member.offset_data + member.size // 2)


def make_tiny_cc3m(
    output_dir: str,
    num_shards: int = 4,
    samples_per_shard: int = 16,
    min_size: int = 64,
    max_size: int = 160,
    seed: int = 0,
    bad_samples: bool = False,
    format: str = "wds",
    jpeg_quality: int = 90,
) -> dict:
    """Write the dataset (see the module docstring) and return its summary.

    Summary keys: ``format``, ``output_dir``, ``shards`` (tar files written, 0
    for folder), ``samples`` (samples the pipeline should keep without a
    minimum size), ``keys_written``, ``injected`` (bad samples by the skip
    reason they should be counted under), ``odd_samples`` (valid unusual
    kinds), ``lost_to_truncation`` (valid samples behind the cut of the
    truncated shard, counted nowhere), ``valid_sizes`` (``{key: [w, h]}``).
    """
    if format not in ("wds", "folder"):
        raise ValueError(f"format must be 'wds' or 'folder', not {format!r}")
    if num_shards < 1 or samples_per_shard < 1 or not 1 <= min_size <= max_size:
        raise ValueError("need num_shards >= 1, samples_per_shard >= 1 and 1 <= min_size <= max_size")
    os.makedirs(output_dir, exist_ok=True)
    layout_rng = random.Random(f"layout:{seed}")
    shards = [["valid"] * samples_per_shard for _ in range(num_shards)]
    extra = list(BAD_KINDS) + list(ODD_KINDS) if bad_samples else []
    for kind in extra:  # spread over the first shard, ahead of the last quarter
        shards[0].insert(layout_rng.randint(0, len(shards[0]) - max(1, samples_per_shard // 4)), kind)
    truncate = bad_samples and format == "wds"
    cut_index = len(shards[-1]) - max(1, samples_per_shard // 4)

    summary = {"format": format, "output_dir": output_dir, "shards": num_shards if format == "wds" else 0}
    injected = {reason: 0 for reason in sorted(set(BAD_KINDS.values()))} if bad_samples else {}
    valid_sizes, lost, index = {}, 0, 0
    for shard_index, kinds in enumerate(shards):
        samples = []
        for position, kind in enumerate(kinds):
            key = f"{index:09d}"
            index += 1
            sample = sample_members(kind, key, random.Random(f"sample:{seed}:{key}"), min_size, max_size, jpeg_quality)
            samples.append((key, sample["members"]))
            behind_cut = truncate and shard_index == num_shards - 1 and position >= cut_index
            if behind_cut:
                lost += 1
            elif kind in BAD_KINDS:
                injected[BAD_KINDS[kind]] += 1
            else:
                valid_sizes[key] = sample["size"]
        if format == "wds":
            path = os.path.join(output_dir, f"cc3m-train-{shard_index:04d}.tar")
            write_tar(path, samples)
            if truncate and shard_index == num_shards - 1:
                truncate_tar_inside(path, samples[cut_index][0])
                injected["truncated_tar"] = 1
            print(f"wrote {path} ({len(samples)} samples)", flush=True)
        else:
            for key, members in samples:
                for ext, data in members.items():
                    with open(os.path.join(output_dir, f"{key}.{ext}"), "wb") as handle:
                        handle.write(data)
    summary.update(
        samples=len(valid_sizes),
        keys_written=index,
        injected=dict(sorted(injected.items())),
        odd_samples=list(ODD_KINDS) if bad_samples else [],
        lost_to_truncation=lost,
        valid_sizes=valid_sizes,
    )
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_shards", type=int, default=4)
    parser.add_argument("--samples_per_shard", type=int, default=16)
    parser.add_argument("--min_size", type=int, default=64, help="smallest image side in pixels")
    parser.add_argument("--max_size", type=int, default=160, help="largest image side in pixels")
    parser.add_argument("--image_size", type=int, help="square images of this size (overrides --min_size/--max_size)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bad_samples", action="store_true", help="inject every kind of bad and unusual sample")
    parser.add_argument("--format", choices=("wds", "folder"), default="wds")
    parser.add_argument("--jpeg_quality", type=int, default=90)
    args = parser.parse_args(argv)
    min_size, max_size = (args.image_size, args.image_size) if args.image_size else (args.min_size, args.max_size)
    summary = make_tiny_cc3m(
        args.output_dir,
        num_shards=args.num_shards,
        samples_per_shard=args.samples_per_shard,
        min_size=min_size,
        max_size=max_size,
        seed=args.seed,
        bad_samples=args.bad_samples,
        format=args.format,
        jpeg_quality=args.jpeg_quality,
    )
    del summary["valid_sizes"]
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
