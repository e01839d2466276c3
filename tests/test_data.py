"""Tests of the data pipeline on real shards written by scripts/make_tiny_cc3m.py.

Expected counts always come from the maker's summary (what it wrote and
injected), never from hard-coded numbers.
"""

from __future__ import annotations

import faulthandler
import filecmp
import io
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import paddle
import pytest
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

from data import (  # noqa: E402
    SKIP_REASONS,
    DataPathError,
    DataTracker,
    SkipCounter,
    aggregate_skip_counts,
    build_dataset,
    build_one_pass_dataloader,
    build_train_dataloader,
    expand_braces,
    resolve_data_source,
    validate_data_path,
)
from data.decode import decode_image, to_rgb  # noqa: E402
from data.readers import iter_tar_samples  # noqa: E402
from data.transforms import TransformConfig, resized_size, transform_image  # noqa: E402
from make_tiny_cc3m import make_tiny_cc3m  # noqa: E402

RES = 32
SIZES = dict(min_size=24, max_size=72)


@pytest.fixture(scope="session")
def bad_wds(tmp_path_factory):
    """4 shards, every kind of bad and unusual sample in shard 0, shard 3 truncated."""
    root = str(tmp_path_factory.mktemp("bad_wds"))
    return make_tiny_cc3m(root, num_shards=4, samples_per_shard=8, seed=3, bad_samples=True, **SIZES)


@pytest.fixture(scope="session")
def clean_wds(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("clean_wds"))
    return make_tiny_cc3m(root, num_shards=6, samples_per_shard=6, seed=5, **SIZES)


@pytest.fixture(scope="session")
def bad_folder(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("bad_folder"))
    return make_tiny_cc3m(root, num_shards=2, samples_per_shard=6, seed=7, bad_samples=True, format="folder", **SIZES)


def one_pass(path, **kwargs):
    """Run a one-pass loader to the end; return (batches, tracker)."""
    loader = build_one_pass_dataloader(path, RES, **{"batch_size": 4, **kwargs})
    tracker = DataTracker(loader.dataset)
    batches = []
    for batch in loader:
        tracker.update(batch)
        batches.append(batch)
    return batches, tracker


def keys_of(batches):
    return [key for batch in batches for key in batch["keys"]]


def first_captions(loader, num_batches):
    return [caption for batch in itertools.islice(loader, num_batches) for caption in batch["captions"]]


@pytest.fixture
def hang_guard():
    """Abort the whole run with tracebacks instead of hanging forever."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


# --------------------------------------------------------------------------- maker


def test_maker_is_deterministic_and_consistent(bad_wds, tmp_path):
    again = make_tiny_cc3m(str(tmp_path), num_shards=4, samples_per_shard=8, seed=3, bad_samples=True, **SIZES)
    names = sorted(os.listdir(bad_wds["output_dir"]))
    assert names == [f"cc3m-train-{i:04d}.tar" for i in range(4)]
    _, mismatch, errors = filecmp.cmpfiles(bad_wds["output_dir"], str(tmp_path), names, shallow=False)
    assert not mismatch and not errors
    assert {k: v for k, v in again.items() if k != "output_dir"} == {k: v for k, v in bad_wds.items() if k != "output_dir"}
    bad = sum(n for reason, n in bad_wds["injected"].items() if reason != "truncated_tar")
    assert bad_wds["keys_written"] == bad_wds["samples"] + bad + bad_wds["lost_to_truncation"]
    assert set(bad_wds["injected"]) <= set(SKIP_REASONS)
    with tarfile.open(os.path.join(bad_wds["output_dir"], "cc3m-train-0001.tar")) as archive:
        names = archive.getnames()
    assert {n.split(".")[1] for n in names} == {"jpg", "txt", "json"}
    first = names[0].split(".")[0]
    assert len(first) == 9 and first.isdigit()


def test_maker_cli_prints_json_summary(tmp_path):
    out = subprocess.run(
        [sys.executable, "scripts/make_tiny_cc3m.py", "--output_dir", str(tmp_path), "--num_shards", "2",
         "--samples_per_shard", "3", "--image_size", "40", "--format", "folder"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["samples"] == 6 and summary["format"] == "folder"
    assert len([n for n in os.listdir(tmp_path) if n.endswith(".jpg")]) == 6


# --------------------------------------------------------------------------- paths


def test_path_formats_are_detected(bad_wds, bad_folder):
    root = bad_wds["output_dir"]
    assert resolve_data_source(root).kind == "tar"
    pattern = os.path.join(root, "cc3m-train-{0000..0003}.tar")
    assert resolve_data_source(pattern).units == resolve_data_source(root).units
    single = os.path.join(root, "cc3m-train-0001.tar")
    assert resolve_data_source(single).units == (single,)
    assert resolve_data_source(bad_folder["output_dir"]).kind == "folder"
    assert "4 tar shard(s)" in validate_data_path(root)


def test_expand_braces():
    assert expand_braces("a-{0000..0002}.tar") == ["a-0000.tar", "a-0001.tar", "a-0002.tar"]
    assert expand_braces("{a,b}{1..2}") == ["a1", "a2", "b1", "b2"]
    assert expand_braces("x{8..10}") == ["x8", "x9", "x10"]
    assert expand_braces("{a,{b,c}}") == ["a", "b", "c"]
    assert expand_braces("plain.tar") == ["plain.tar"]


def test_bad_paths_give_one_line_errors(tmp_path, bad_wds):
    empty = tmp_path / "empty"
    empty.mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.md").write_text("hi")
    (tmp_path / "captions").mkdir()
    (tmp_path / "captions" / "a.jpg").write_bytes(b"x")
    (tmp_path / "file.txt").write_text("hi")
    missing_shard = os.path.join(bad_wds["output_dir"], "cc3m-train-{0000..0004}.tar")
    for path in [str(tmp_path / "nope"), str(empty), str(tmp_path / "notes"), str(tmp_path / "captions"),
                 str(tmp_path / "file.txt"), str(tmp_path / "x-{0..3}.tar"), missing_shard, ""]:
        with pytest.raises(DataPathError) as error:
            validate_data_path(path)
        message = str(error.value)
        assert message.startswith("--data_path") and "\n" not in message and repr(path) in message
        assert isinstance(error.value, ValueError)
    with pytest.raises(DataPathError, match="1 of the 5 shard"):
        build_train_dataloader(missing_shard, RES, 2)


# --------------------------------------------------------------------------- counts


def test_one_pass_keeps_and_skips_exactly(bad_wds):
    batches, tracker = one_pass(bad_wds["output_dir"], num_workers=0)
    assert tracker.kept() == bad_wds["samples"]
    assert tracker.skipped() == {reason: n for reason, n in bad_wds["injected"].items() if n}
    assert sorted(keys_of(batches)) == sorted(bad_wds["valid_sizes"])


def test_min_image_size_skips_too_small(bad_wds):
    threshold = 48
    too_small = sum(1 for size in bad_wds["valid_sizes"].values() if min(size) < threshold)
    assert 0 < too_small < bad_wds["samples"]
    _, tracker = one_pass(bad_wds["output_dir"], min_image_size=threshold)
    assert tracker.kept() == bad_wds["samples"] - too_small
    assert tracker.skipped()["too_small"] == too_small


def test_folder_format_counts_and_split(bad_folder):
    batches, tracker = one_pass(bad_folder["output_dir"])
    assert tracker.kept() == bad_folder["samples"]
    assert tracker.skipped() == {reason: n for reason, n in bad_folder["injected"].items() if n}
    seen, skipped = [], []
    for rank in range(2):
        rank_batches, rank_tracker = one_pass(bad_folder["output_dir"], rank=rank, world_size=2)
        seen.append(set(keys_of(rank_batches)))
        skipped.append(rank_tracker.skipped())
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(keys_of(batches))
    assert aggregate_skip_counts(skipped) == tracker.skipped()


def test_brace_pattern_and_single_tar(bad_wds):
    root = bad_wds["output_dir"]
    _, tracker = one_pass(os.path.join(root, "cc3m-train-{0000..0003}.tar"))
    assert tracker.kept() == bad_wds["samples"]
    single = os.path.join(root, "cc3m-train-0002.tar")
    batches, _ = one_pass(single)
    with tarfile.open(single) as archive:
        keys = {name.split(".")[0] for name in archive.getnames()}
    assert set(keys_of(batches)) == keys and set(batches[0]["sources"]) == {single}


def test_truncated_and_garbage_tars_are_counted(tmp_path, clean_wds):
    shard = os.path.join(clean_wds["output_dir"], "cc3m-train-0000.tar")
    with tarfile.open(shard) as archive:
        members = archive.getmembers()
    data = open(shard, "rb").read()
    cut_in_header = tmp_path / "cut_header.tar"  # tarfile alone would call this a clean end
    cut_in_header.write_bytes(data[: members[6].offset + 100])
    skips = SkipCounter()
    samples = list(iter_tar_samples(str(cut_in_header), skips))
    assert [s.key for s in samples] == ["000000000"] and skips.as_dict() == {"truncated_tar": 1}
    for name, content in [("empty.tar", b""), ("garbage.tar", bytes(range(256)) * 8)]:
        (tmp_path / name).write_bytes(content)
        skips = SkipCounter()
        assert list(iter_tar_samples(str(tmp_path / name), skips)) == []
        assert skips.as_dict() == {"truncated_tar": 1}


def test_reader_that_keeps_nothing_still_reports(tmp_path, clean_wds, hang_guard):
    shutil.copy(os.path.join(clean_wds["output_dir"], "cc3m-train-0000.tar"), tmp_path / "a.tar")
    (tmp_path / "b.tar").write_bytes(bytes(range(256)) * 8)
    batches, tracker = one_pass(str(tmp_path), num_workers=2)
    assert tracker.kept() == 6 and tracker.skipped() == {"truncated_tar": 1}
    report_only = [batch for batch in batches if batch["pixel_values"] is None]
    assert len(report_only) == 1 and report_only[0]["captions"] == []


# --------------------------------------------------------------------------- distribution


def test_two_ranks_two_workers_split_shards(bad_wds, hang_guard):
    all_shards = set(resolve_data_source(bad_wds["output_dir"]).units)
    shards_by_reader, keys_by_reader, skipped = {}, {}, []
    for rank in range(2):
        batches, tracker = one_pass(bad_wds["output_dir"], num_workers=2, rank=rank, world_size=2)
        for batch in batches:
            reader = batch["worker_state"]["worker"]
            shards_by_reader.setdefault(reader, set()).update(batch["sources"])
            keys_by_reader.setdefault(reader, set()).update(batch["keys"])
        skipped.append(tracker.skipped())
    assert sorted(shards_by_reader) == [0, 1, 2, 3]
    for a, b in itertools.combinations(shards_by_reader, 2):
        assert not shards_by_reader[a] & shards_by_reader[b]
        assert not keys_by_reader[a] & keys_by_reader[b]
    assert set().union(*shards_by_reader.values()) == all_shards
    assert set().union(*keys_by_reader.values()) == set(bad_wds["valid_sizes"])
    assert aggregate_skip_counts(skipped) == {reason: n for reason, n in bad_wds["injected"].items() if n}


def test_fewer_shards_than_readers_split_by_sample(bad_wds, hang_guard):
    single = os.path.join(bad_wds["output_dir"], "cc3m-train-0001.tar")
    keys = []
    for rank in range(2):
        with pytest.warns(UserWarning, match="1 shard"):
            batches, _ = one_pass(single, num_workers=2, rank=rank, world_size=2)
        keys.append(keys_of(batches))
    assert all(keys) and not set(keys[0]) & set(keys[1])
    assert len(keys[0]) + len(keys[1]) == len(set(keys[0]) | set(keys[1])) == 8
    with pytest.warns(UserWarning):
        loader = build_train_dataloader(single, RES, 4, num_workers=2, rank=1, world_size=2, seed=1)
    batches = list(itertools.islice(loader, 6))
    assert all(batch["pixel_values"].shape == [4, 3, RES, RES] for batch in batches)


def test_reader_with_empty_share_falls_back_instead_of_hanging(tmp_path, hang_guard):
    summary = make_tiny_cc3m(str(tmp_path), num_shards=1, samples_per_shard=3, seed=1, **SIZES)
    with pytest.warns(UserWarning):
        dataset = build_dataset(summary["output_dir"], RES, 2, rank=3, world_size=4, shuffle_buffer=4)
    with pytest.warns(UserWarning, match="reads the whole dataset"):
        batches = list(itertools.islice(iter(dataset), 5))
    assert all(batch["worker_state"]["fallback"] and len(batch["keys"]) == 2 for batch in batches)
    assert set(keys_of(batches)) <= set(summary["valid_sizes"])


def test_dataset_without_usable_sample_raises(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"not an image")
    (tmp_path / "a.txt").write_text("a caption")
    with pytest.raises(DataPathError, match="no usable sample"):
        next(iter(build_dataset(str(tmp_path), RES, 1)))


# --------------------------------------------------------------------------- determinism


def test_training_stream_is_deterministic_per_seed(clean_wds, hang_guard):
    root = clean_wds["output_dir"]
    for workers in (0, 2):
        first = first_captions(build_train_dataloader(root, RES, 4, num_workers=workers, seed=11, shuffle_buffer=8), 6)
        again = first_captions(build_train_dataloader(root, RES, 4, num_workers=workers, seed=11, shuffle_buffer=8), 6)
        other = first_captions(build_train_dataloader(root, RES, 4, num_workers=workers, seed=12, shuffle_buffer=8), 6)
        assert first == again and first != other and len(first) == 24


@pytest.mark.parametrize("consumed", [20, 21])  # a multiple of num_workers, and not (reader roles rotate)
def test_training_stream_resumes_exactly(bad_wds, hang_guard, consumed):
    root = bad_wds["output_dir"]
    kwargs = dict(num_workers=2, seed=4, shuffle_buffer=8, random_flip=True)
    reference = list(itertools.islice(build_train_dataloader(root, RES, 4, **kwargs), consumed + 10))
    loader = build_train_dataloader(root, RES, 4, **kwargs)
    tracker = DataTracker(loader.dataset)
    for batch in itertools.islice(loader, consumed):
        tracker.update(batch)
    state = json.loads(json.dumps(tracker.state_dict()))
    assert state["workers"]["0"]["epoch"] >= 1  # crossed an epoch boundary
    assert state["next_worker"] == consumed % 2
    resumed = build_train_dataloader(root, RES, 4, resume_state=state, **kwargs)
    for expected, got in zip(reference[consumed:], itertools.islice(resumed, 10)):
        assert got["captions"] == expected["captions"]
        assert got["worker_state"]["worker"] == expected["worker_state"]["worker"]
        np.testing.assert_array_equal(got["pixel_values"].numpy(), expected["pixel_values"].numpy())
        assert got["worker_state"]["skipped"] == expected["worker_state"]["skipped"]


def test_training_batches_shape_dtype_range(bad_wds, hang_guard):
    loader = build_train_dataloader(bad_wds["output_dir"], RES, 5, num_workers=2, seed=0, random_flip=True)
    tracker = DataTracker(loader.dataset)
    for batch in itertools.islice(loader, 12):
        tracker.update(batch)
        pixels = batch["pixel_values"]
        assert isinstance(pixels, paddle.Tensor) and pixels.dtype == paddle.float32
        assert pixels.shape == [5, 3, RES, RES]
        assert float(pixels.min()) >= -1.0 and float(pixels.max()) <= 1.0
        assert len(batch["captions"]) == 5 and all(isinstance(c, str) and c for c in batch["captions"])
    skipped = tracker.skipped()
    assert set(skipped) <= set(SKIP_REASONS) and skipped.get("decode_error", 0) > 0


# --------------------------------------------------------------------------- transforms


def half_black_half_white(width, height):
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, width // 2 :] = 255
    return Image.fromarray(pixels)


class FixedRng(random.Random):
    """An rng whose ``random()`` is fixed, to force the flip decision."""

    def __init__(self, value):
        super().__init__(0)
        self.value = value

    def random(self):
        return self.value


def test_flip_swaps_halves_and_values_are_normalised():
    image = half_black_half_white(2 * RES, 2 * RES)
    config = TransformConfig(RES, center_crop=True, random_flip=True)
    plain = transform_image(image, config, FixedRng(0.9))
    flipped = transform_image(image, config, FixedRng(0.1))
    assert plain.shape == (3, RES, RES) and plain.dtype == np.float32
    assert np.all(plain[:, :, : RES // 2 - 3] == -1.0) and np.all(plain[:, :, RES // 2 + 3 :] == 1.0)
    np.testing.assert_array_equal(flipped, plain[:, :, ::-1])
    no_flip = transform_image(image, TransformConfig(RES, center_crop=True), FixedRng(0.1))
    np.testing.assert_array_equal(no_flip, plain)
    solid = Image.new("RGB", (RES, RES), (10, 128, 250))
    values = transform_image(solid, TransformConfig(RES), random.Random(0))
    expected = (np.array([10, 128, 250], np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(values[:, 5, 7], expected, atol=1e-6)


def test_center_crop_is_centered_and_random_crop_moves():
    pixels = np.zeros((RES, 3 * RES, 3), np.uint8)
    pixels[:, RES : 2 * RES] = 255  # white middle third of a 3:1 image
    image = Image.fromarray(pixels)
    center = transform_image(image, TransformConfig(RES, center_crop=True), random.Random(0))
    assert np.all(center == 1.0)
    means = {round(float(transform_image(image, TransformConfig(RES), random.Random(s)).mean()), 1) for s in range(20)}
    assert len(means) > 3


def test_crop_matches_resize_then_crop_reference():
    rng = np.random.default_rng(0)
    for width, height in [(50, 90), (120, 70), (RES, RES)]:
        coarse = rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        new_width, new_height = resized_size(width, height, RES)
        resized = image.resize((new_width, new_height), Image.LANCZOS)
        for seed in range(3):
            ours = transform_image(image, TransformConfig(RES), random.Random(seed))
            rng_ref = random.Random(seed)
            top, left = rng_ref.randint(0, new_height - RES), rng_ref.randint(0, new_width - RES)
            reference = np.asarray(resized.crop((left, top, left + RES, top + RES)), np.float32)
            reference = (reference.transpose(2, 0, 1) / 255 - 0.5) / 0.5
            assert np.abs(ours - reference).max() <= 2 * 2 / 255 + 1e-6


def test_large_jpeg_is_drafted_but_never_below_the_resolution():
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), (1, 2, 3)).save(buffer, "JPEG")
    assert decode_image(buffer.getvalue()).size == (300, 200)
    drafted = decode_image(buffer.getvalue(), resolution=64)
    assert drafted.size == (150, 100) and drafted.mode == "RGB"
    assert decode_image(buffer.getvalue(), resolution=120).size == (300, 200)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1", "F"])
def test_any_mode_becomes_rgb(mode):
    base = Image.new("RGB", (8, 8), (200, 100, 50))
    if mode == "I;16":
        image = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    elif mode == "F":
        image = Image.fromarray(np.full((8, 8), 300.0, np.float32))
    else:
        image = base.convert(mode)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (8, 8)
    if mode in ("I;16", "F"):
        assert rgb.getpixel((0, 0)) == (255, 255, 255)
    transparent = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)


# --------------------------------------------------------------------------- counters & tools


def test_skip_counter():
    counter = SkipCounter()
    counter.add("decode_error")
    counter.add("too_small", 2)
    assert counter.as_dict() == {"decode_error": 1, "too_small": 2} and counter.total == 3
    with pytest.raises(ValueError):
        counter.add("bogus")
    assert aggregate_skip_counts([{"a": 1}, {"a": 2, "b": 1}, {}]) == {"a": 3, "b": 1}


def test_inspect_script_reports_json(bad_wds):
    out = subprocess.run(
        [sys.executable, "scripts/inspect_data.py", "--data_path", bad_wds["output_dir"], "--resolution", str(RES),
         "--num_workers", "2", "--random_flip", "--center_crop"],
        cwd=REPO, capture_output=True, text=True, check=True,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["samples"] == bad_wds["samples"] and report["shards"] == 4
    assert report["skipped_by_reason"] == {reason: n for reason, n in bad_wds["injected"].items() if n}
    assert report["skipped"] == sum(bad_wds["injected"].values())
    assert set(report["images_per_second_per_worker"]) == {"0", "1"} and report["images_per_second"] > 0
    failed = subprocess.run(
        [sys.executable, "scripts/inspect_data.py", "--data_path", "/nonexistent/x", "--resolution", "8"],
        cwd=REPO, capture_output=True, text=True,
    )
    assert failed.returncode != 0 and failed.stderr.strip().splitlines()[-1].startswith("error: --data_path")


def test_count_image_samples_matches_what_the_maker_wrote(clean_wds):
    """The epoch size for --num_train_epochs: images by key from tar headers (webdataset's key rule)."""
    from data import count_image_samples, resolve_data_source

    assert count_image_samples(resolve_data_source(clean_wds["output_dir"])) == clean_wds["samples"] == 36


# --------------------------------------------------------------------------- hostile data


def _jpeg(size=40, color="red"):
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "JPEG")
    return buffer.getvalue()


def _sparse_member(name, declared_size, stored=10240):
    """Header + data of a GNU (old format) sparse member: ``stored`` bytes on disk, ``declared_size`` expanded."""
    info = tarfile.TarInfo(name)
    info.type, info.size = tarfile.GNUTYPE_SPARSE, stored
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[386:410] = tarfile.itn(0, 12, tarfile.GNU_FORMAT) + tarfile.itn(stored, 12, tarfile.GNU_FORMAT)
    header[483:495] = tarfile.itn(declared_size, 12, tarfile.GNU_FORMAT)
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header[:512])
    return bytes(header) + bytes(stored)


def write_hostile_tar(path, good=2, declared=2**30):
    """Good samples plus one of each kind of hostile member (see the counts test below); returns the kept keys."""
    deep_json = b'{"caption": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    blobs = []

    def add(name, data=b"", **fields):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        for key, value in fields.items():
            setattr(info, key, value)
        blobs.append(info.tobuf(tarfile.GNU_FORMAT) + data + bytes(-len(data) % 512))

    for i in range(good):
        add(f"good{i}.jpg", _jpeg())
        add(f"good{i}.txt", b"a red square")
    add("deep.jpg", _jpeg())
    add("deep.json", deep_json)  # RecursionError in json.loads -> decode_error
    blobs.append(_sparse_member("sparse.jpg", declared))  # 2 GiB declared in a 10 KB member -> member_too_large
    add("sparse.txt", b"never read")
    add("link.jpg", type=tarfile.SYMTYPE, linkname="good0.jpg")  # -> not_regular_file
    add("link.txt", b"a link")
    add("fifo.jpg", _jpeg())
    add("fifo.txt", type=tarfile.FIFOTYPE)  # -> not_regular_file
    add("hidden.jpg", _jpeg())
    add("._hidden.jpg", b"AppleDouble")  # -> hidden_member, the sample is kept
    add("hidden.txt", b"a hidden sibling")
    add("dup.jpg", _jpeg())
    add("dup.jpg", _jpeg(color="blue"))  # -> duplicate_member, the first one is kept
    add("dup.txt", b"a duplicate")
    with open(path, "wb") as f:
        f.write(b"".join(blobs) + bytes(1024))
    return [f"good{i}" for i in range(good)] + ["hidden", "dup"]


HOSTILE_TAR_SKIPS = {"decode_error": 1, "duplicate_member": 1, "hidden_member": 1, "member_too_large": 1,
                     "not_regular_file": 2}


def test_hostile_tar_members_are_skipped_and_counted(tmp_path, hang_guard):
    shard = str(tmp_path / "hostile.tar")
    kept = write_hostile_tar(shard)
    with tarfile.open(shard) as archive:  # the shard is what it claims: tarfile sees a 1 GiB sparse member
        assert archive.getmember("sparse.jpg").size == 2**30 and archive.getmember("sparse.jpg").isfile()
    batches, tracker = one_pass(shard)
    assert sorted(keys_of(batches)) == sorted(kept)
    assert tracker.skipped() == HOSTILE_TAR_SKIPS
    dup = [b["pixel_values"][b["keys"].index("dup")] for b in batches if "dup" in b["keys"]][0]
    assert float(dup[0].mean()) > 0.9 > float(dup[2].mean())  # the first (red) dup.jpg, not the blue one
    _, capped = one_pass(shard, max_member_bytes=100)  # every image and the json (> 100 bytes) are now too large
    assert capped.kept() == 0
    assert capped.skipped() == {"hidden_member": 1, "member_too_large": 7, "not_regular_file": 1}


def test_hostile_folder_entries_are_skipped_and_counted(tmp_path, hang_guard):
    root = tmp_path / "folder"
    root.mkdir()
    for key in ("good", "fifo", "loop", "big", "dup"):
        (root / f"{key}.txt").write_text(f"caption of {key}")
        (root / f"{key}.jpg").write_bytes(_jpeg())
    (root / "dup.JPG").write_bytes(_jpeg(color="blue"))  # same key and extension -> duplicate_member
    (root / "fifo.txt").unlink()
    os.mkfifo(root / "fifo.txt")  # opening it for reading would block forever
    (root / "loop.jpg").unlink()
    os.symlink("loop.jpg", root / "loop.jpg")  # ELOOP
    with open(root / "big.jpg", "r+b") as f:
        f.truncate(2**30)  # sparse 1 GiB file -> member_too_large, never read
    assert "image folder" in validate_data_path(str(root))  # no ELOOP traceback
    batches, tracker = one_pass(str(root))
    assert sorted(keys_of(batches)) == ["dup", "good"]
    assert tracker.skipped() == {"duplicate_member": 1, "member_too_large": 1, "not_regular_file": 2}
    loops = tmp_path / "loops"
    loops.mkdir()
    os.symlink("x.tar", loops / "x.tar")
    with pytest.raises(DataPathError, match="no .tar shards and no image or caption files") as error:
        validate_data_path(str(loops))
    assert "\n" not in str(error.value)


def test_inspect_script_survives_hostile_data(tmp_path, hang_guard, capfd):
    import inspect_data

    for key in ("good", "fifo", "big"):
        (tmp_path / f"{key}.txt").write_text(f"caption of {key}")
        (tmp_path / f"{key}.jpg").write_bytes(_jpeg())
    (tmp_path / "fifo.txt").unlink()
    os.mkfifo(tmp_path / "fifo.txt")  # inspect_data.py used to block forever in open() here
    with open(tmp_path / "big.jpg", "r+b") as f:
        f.truncate(2**20 + 1)
    inspect_data.main(["--data_path", str(tmp_path), "--resolution", str(RES), "--max_member_bytes", str(2**20)])
    report = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert report["samples"] == 1 and report["skipped_by_reason"] == {"member_too_large": 1, "not_regular_file": 1}


# --------------------------------------------------------------------------- a 2-rank run on hostile shards


FLAG_SECRET, ENV_SECRET = "hf_flag_secret_7f3a9c", "env_secret_51d0be"


def _append(shard, members):
    with tarfile.open(shard, "a") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def hostile_two_rank_run(tiny_sd3, tmp_path_factory):
    """2 ranks (one shard each, both with hidden/duplicate members), 1 step, a token given as flag and in the env."""
    from conftest import run_python

    tmp = tmp_path_factory.mktemp("hostile_run")
    data = make_tiny_cc3m(str(tmp / "data"), num_shards=2, samples_per_shard=4, min_size=64, max_size=64, seed=2)
    shard0, shard1 = sorted(resolve_data_source(data["output_dir"]).units)
    _append(shard0, [("._000000000.jpg", b"x")])
    _append(shard1, [("._000000004.jpg", b"x"), ("zz.jpg", _jpeg(64)), ("zz.jpg", _jpeg(64)), ("zz.txt", b"a red square")])
    out, logs = tmp / "out", tmp / "logs"
    result = run_python(
        ["-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(logs), "train_pcm_lora_sd3_adv.py",
         "--pretrained_teacher_model", tiny_sd3, "--data_path", data["output_dir"], "--output_dir", str(out),
         "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "1", "--checkpointing_steps", "1",
         "--num_validation_images", "0", "--report_to", "tensorboard", "--seed", "1", "--lora_rank", "4",
         "--hub_token", FLAG_SECRET, "--tracker_project_name", f"run-{ENV_SECRET}"],
        env={"HF_TOKEN": ENV_SECRET})
    worker_logs = {name: (logs / name).read_text(errors="replace") for name in os.listdir(logs)}
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:] + "".join(worker_logs.values())[-3000:]
    return out, logs, worker_logs


def test_skip_counts_are_summed_over_ranks(hostile_two_rank_run):
    out, _, worker_logs = hostile_two_rank_run
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [row["skipped_samples"] for row in rows] == [3]  # rank 0 alone would report 1 or 2
    assert "skipped samples (all ranks): {'duplicate_member': 1, 'hidden_member': 2}" in worker_logs["workerlog.0"]


def test_no_secret_reaches_a_file_the_run_wrote(hostile_two_rank_run):
    out, logs, worker_logs = hostile_two_rank_run
    written = [os.path.join(folder, name) for folder, _, names in os.walk(out) for name in names]
    args_copies = [path for path in written if path.endswith("training_args.json")]
    assert len(args_copies) == 2  # the final one and checkpoint-1's
    assert any("visualdl" in path for path in written)
    for path in written:
        content = open(path, "rb").read()
        assert FLAG_SECRET.encode() not in content and ENV_SECRET.encode() not in content, path
    recorded = json.load(open(args_copies[0]))
    assert recorded["hub_token"] == "<redacted>" and recorded["tracker_project_name"] == "run-<redacted>"
    for name, text in worker_logs.items():
        if name.startswith("workerlog"):  # our ranks' console output
            assert FLAG_SECRET not in text and ENV_SECRET not in text
    assert ENV_SECRET in (logs / "envlog.0").read_text()  # the launcher's own copy of the environment (README)
