"""One pass over every sample of ``--data_path`` with the training transforms.

Reports progress, then as its last line one JSON object: ``samples`` (kept),
``skipped``, ``skipped_by_reason``, ``shards``, ``images_per_second`` (wall
clock, all workers) and ``images_per_second_per_worker`` (kept samples per
second of each worker's own read + decode + transform time, i.e. per core).

Example::

    python scripts/inspect_data.py --data_path ./cc3m --resolution 1024 --num_workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# data/ imports paddle, whose wheel warns at import on machines without ccache (not actionable; paddle_compat
# silences it too, but this script needs no ppdiffusers and so does not import it).
warnings.filterwarnings("ignore", message="No ccache found")

from data import DEFAULT_MAX_MEMBER_BYTES, DataPathError, DataTracker, build_one_pass_dataloader  # noqa: E402


def inspect(
    data_path: str,
    resolution: int,
    *,
    center_crop: bool = False,
    random_flip: bool = False,
    min_image_size: int = 0,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    num_workers: int = 0,
    batch_size: int = 16,
    seed: int = 0,
    progress_every: float = 5.0,
) -> dict:
    """Run the pass and return the report (see the module docstring)."""
    loader = build_one_pass_dataloader(
        data_path,
        resolution,
        batch_size=batch_size,
        num_workers=num_workers,
        seed=seed,
        center_crop=center_crop,
        random_flip=random_flip,
        min_image_size=min_image_size,
        max_member_bytes=max_member_bytes,
        rank=0,
        world_size=1,
    )
    source = loader.dataset.source
    print(f"inspecting {source.description}", flush=True)
    tracker = DataTracker(loader.dataset)
    start = last_report = time.perf_counter()
    for batch in loader:
        tracker.update(batch)
        now = time.perf_counter()
        if now - last_report >= progress_every:
            last_report = now
            print(
                f"{tracker.kept()} samples, {sum(tracker.skipped().values())} skipped, "
                f"{tracker.kept() / (now - start):.1f} images/s",
                flush=True,
            )
    wall = time.perf_counter() - start
    skipped = tracker.skipped()
    return {
        "data_path": data_path,
        "format": source.kind,
        "shards": source.num_shards,
        "resolution": resolution,
        "num_workers": num_workers,
        "samples": tracker.kept(),
        "skipped": sum(skipped.values()),
        "skipped_by_reason": skipped,
        "wall_seconds": round(wall, 3),
        "images_per_second": round(tracker.kept() / wall, 2) if wall > 0 else 0.0,
        "images_per_second_per_worker": {
            str(worker): round(rate, 2) for worker, rate in tracker.images_per_second().items()
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data_path", required=True, help="tar shards, brace pattern, one tar, or image+txt folder")
    parser.add_argument("--resolution", type=int, default=1024, help="training resolution")
    parser.add_argument("--center_crop", action="store_true", help="centre crop (else random crop)")
    parser.add_argument("--random_flip", action="store_true", help="random horizontal flip")
    parser.add_argument("--min_image_size", type=int, default=0, help="skip images whose shorter side is below this (0: keep all)")
    parser.add_argument("--max_member_bytes", type=int, default=DEFAULT_MAX_MEMBER_BYTES,
                        help="skip samples with a tar member or file larger than this many bytes, unread")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--batch_size", type=int, default=16, help="samples per batch")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed")
    args = parser.parse_args(argv)
    try:
        report = inspect(
            args.data_path,
            args.resolution,
            center_crop=args.center_crop,
            random_flip=args.random_flip,
            min_image_size=args.min_image_size,
            max_member_bytes=args.max_member_bytes,
            num_workers=args.num_workers,
            batch_size=args.batch_size,
            seed=args.seed,
        )
    except DataPathError as error:
        sys.exit(f"error: {error}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
