"""Main-process bookkeeping of what the DataLoader workers report with each batch.

Each batch carries ``batch["worker_state"]``: the producing reader's cumulative
skip counts, kept count, busy time and stream position (see
``data.dataset.ImageCaptionDataset``).  A :class:`DataTracker` keeps the latest
state of every reader, so the trainer can log the skip counters, measure
per-worker throughput and save a resume state with its checkpoints::

    tracker = DataTracker(loader.dataset)
    for batch in loader:
        tracker.update(batch)
        ...
        skipped = tracker.skipped_all_ranks()    # every rank, once per logged step
        if step % log_every == 0:
            logger.info("skipped samples: %s", skipped)
        if checkpointing:
            save_json(tracker.state_dict())      # -> resume_state=... on restart

Resuming replays every reader's stream exactly.  The batches of several
workers reach the main process round-robin starting from worker 0; the resume
state records which reader was due next, and the resumed dataset rotates the
readers' roles so that the interleaving continues exactly too.
"""

from __future__ import annotations

from typing import Mapping

import paddle

from .dataset import ImageCaptionDataset
from .skips import SKIP_REASONS, aggregate_skip_counts


class DataTracker:
    """Latest ``worker_state`` of every reader seen in the consumed batches."""

    def __init__(self, dataset: ImageCaptionDataset | None = None):
        self._dataset = dataset
        self._states: dict[int, dict] = {}
        self._last_reader: int | None = None

    def update(self, batch: Mapping) -> None:
        """Record the state attached to a batch the trainer has consumed."""
        state = batch["worker_state"]
        self._states[int(state["worker"])] = dict(state)
        self._last_reader = int(state["worker"])

    def skipped(self) -> dict[str, int]:
        """Skipped samples by reason, summed over the readers (this rank only)."""
        return aggregate_skip_counts(state["skipped"] for state in self._states.values())

    def skipped_all_ranks(self) -> dict[str, int]:
        """Skipped samples by reason, summed over the readers of every rank: one all-reduce of one
        vector (a collective: every rank must call it at the same point)."""
        local = self.skipped()
        if paddle.distributed.get_world_size() < 2:
            return local
        reasons = sorted(SKIP_REASONS)
        counts = paddle.to_tensor([local.get(reason, 0) for reason in reasons], dtype="int64")
        paddle.distributed.all_reduce(counts)
        return {reason: int(n) for reason, n in zip(reasons, counts.numpy()) if n}

    def kept(self) -> int:
        """Samples decoded and yielded so far, summed over the readers (this rank only)."""
        return sum(int(state["kept"]) for state in self._states.values())

    def images_per_second(self) -> dict[int, float]:
        """Kept samples per second of busy (read + decode + transform) time, by reader id."""
        return {
            worker: state["kept"] / state["busy_seconds"] if state["busy_seconds"] > 0 else 0.0
            for worker, state in sorted(self._states.items())
        }

    def state_dict(self) -> dict:
        """JSON-serialisable resume state for ``build_train_dataloader(resume_state=...)``.

        It covers this rank's readers only: save one per rank (or gather them).
        """
        if self._dataset is None:
            raise ValueError("DataTracker needs the dataset (loader.dataset) to produce a resume state")
        config = self._dataset.stream_config()
        workers = config["num_workers"]
        next_worker = 0 if self._last_reader is None else (self._last_reader % workers + 1) % workers
        return {
            "config": config,
            "next_worker": next_worker,
            "workers": {
                str(worker): {key: state[key] for key in ("epoch", "position", "fallback", "skipped")}
                for worker, state in sorted(self._states.items())
            },
        }
