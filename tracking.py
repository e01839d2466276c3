"""Logging and experiment tracking for the trainer and the scripts.

``--report_to``: ``wandb``, ``visualdl``, ``tensorboard`` (Paddle's equivalent, VisualDL, whose
logs TensorBoard-style dashboards read: it maps to ``visualdl``), ``all`` (wandb and VisualDL) or
``none``. Whatever the choice, every logged scalar also goes to ``output_dir/<logging_dir>/metrics.jsonl``,
one JSON object per step. wandb honours ``WANDB_MODE=offline`` and ``WANDB_DIR`` (default: the logging
dir); credentials come from wandb's own login and are never printed or stored by us.

Secrets: whatever records the run's arguments (``training_args.json``, checkpoints, tracker configs) takes
them from :func:`recordable_args`, which redacts every flag named like a token, key, secret or password and
cuts the value of every such environment variable out of the other values.
"""
from __future__ import annotations

import json
import logging
import os
import re

import numpy as np

TRACKERS = ("wandb", "visualdl", "tensorboard", "all", "none")


def quiet_library_logging() -> None:
    """Keep ppdiffusers' and PaddleNLP's per-file INFO lines (model loading, saving) out of the
    console; warnings and errors still show."""
    from paddlenlp.utils.log import logger as paddlenlp_logger
    from ppdiffusers.utils import logging as ppdiffusers_logging

    ppdiffusers_logging.set_verbosity_warning()
    paddlenlp_logger.set_level("WARNING")
    logging.getLogger("PaddleNLP").setLevel(logging.WARNING)


SECRET_NAME = re.compile(r"(^|_)(token|secret|password|passwd|pass|api_?key|key|credentials?|auth)(_|$)", re.IGNORECASE)
"""Flag and environment variable names that hold credentials (hub_token, WANDB_API_KEY, HF_TOKEN, ...)."""
REDACTED = "<redacted>"


def recordable_args(args, environ=None) -> dict:
    """``vars(args)`` as it may be written to disk, a tracker or a log: flags whose name matches
    :data:`SECRET_NAME` hold ``"<redacted>"`` (None and False stay as they are), and the value (8+ characters)
    of every environment variable whose name matches is replaced by ``"<redacted>"`` inside other strings."""
    environ = os.environ if environ is None else environ
    secrets = sorted((v for k, v in environ.items() if SECRET_NAME.search(k) and len(v) >= 8), key=len, reverse=True)

    def scrub(value):
        if isinstance(value, str):
            for secret in secrets:
                value = value.replace(secret, REDACTED)
            return value
        if isinstance(value, (list, tuple)):
            return [scrub(item) for item in value]
        return value

    return {key: REDACTED if SECRET_NAME.search(key) and value not in (None, False) else scrub(value)
            for key, value in vars(args).items()}


def resolve_trackers(report_to: str) -> list:
    """``--report_to`` as a list of backends; raises ValueError for an unknown name."""
    names = [name.strip() for name in report_to.split(",") if name.strip()]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown or not names:
        raise ValueError(f"--report_to: unknown tracker {', '.join(unknown) or repr(report_to)}; choose from {', '.join(TRACKERS)}")
    chosen = set()
    for name in names:
        chosen |= {"all": {"wandb", "visualdl"}, "tensorboard": {"visualdl"}, "none": set()}.get(name, {name})
    return sorted(chosen)


class Trackers:
    """The trackers of rank 0 plus the always-on ``metrics.jsonl``; ``config`` is :func:`recordable_args`."""

    def __init__(self, report_to: str, log_dir: str, project: str, config: dict):
        self.backends = resolve_trackers(report_to)
        os.makedirs(log_dir, exist_ok=True)
        self.metrics_path = os.path.join(log_dir, "metrics.jsonl")
        self._wandb = self._visualdl = None
        if "wandb" in self.backends:
            import wandb

            self._wandb = wandb.init(project=project, config=config, dir=os.environ.get("WANDB_DIR", log_dir))
        if "visualdl" in self.backends:
            from visualdl import LogWriter

            self._visualdl = LogWriter(logdir=os.path.join(log_dir, "visualdl"))

    def log(self, metrics: dict, step: int) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)
        if self._visualdl is not None:
            for key, value in scalars.items():
                self._visualdl.add_scalar(tag=f"train/{key}", value=value, step=step)

    def log_images(self, name: str, images: list, captions: list, step: int) -> None:
        if self._wandb is not None:
            import wandb

            self._wandb.log({name: [wandb.Image(img, caption=c) for img, c in zip(images, captions)]}, step=step)
        if self._visualdl is not None:
            for i, image in enumerate(images):
                self._visualdl.add_image(tag=f"{name}/{i}", img=np.asarray(image), step=step, dataformats="HWC")

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
        if self._visualdl is not None:
            self._visualdl.close()


class PhaseTimer:
    """``timer(phase)`` context managers that add up wall time per phase (synchronising the device
    before and after, so GPU work is charged to the phase that queued it)."""

    def __init__(self):
        import paddle

        self.totals: dict = {}
        on_gpu = paddle.get_device().startswith("gpu")
        self._sync = paddle.device.synchronize if on_gpu else (lambda: None)

    def reset(self) -> None:
        self.totals = {}

    def __call__(self, phase: str):
        import contextlib
        import time

        @contextlib.contextmanager
        def timed():
            self._sync()
            start = time.perf_counter()
            try:
                yield
            finally:
                self._sync()
                self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - start

        return timed()
