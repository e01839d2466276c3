"""Checkpoints that lose nothing: atomic writes, every rank's random state, exact resume.

Layout of ``output_dir/checkpoint-N/`` (N = global step)::

    paddle_lora_weights.safetensors   LoRA, the same format as the final output
    discriminator_heads.pdparams      discriminator heads
    optimizer.pdopt, adv_optimizer.pdopt, lr_scheduler.pdparams, grad_scaler.pdparams
    rank-R.pkl                        rank R's Python/NumPy/Paddle random states and data stream position
    training_args.json                the arguments the run was started with
    training_state.json               global step, world size, batch layout, model; written last

A checkpoint is written into ``checkpoint-N.incomplete`` and renamed into place by
rank 0 only after every rank has written its part (barriers between), so a crash or
kill during a save leaves all earlier checkpoints untouched and never a half
checkpoint under a final name. Pruning to ``--checkpoints_total_limit`` happens only
after the new checkpoint is complete.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil

import numpy as np
import paddle

STATE_FILE = "training_state.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# What must match between the run that saved and the run that resumes, else the data order,
# the batch per optimizer step or the weights would silently differ.
RESUME_MUST_MATCH = ("world_size", "train_batch_size", "gradient_accumulation_steps", "lora_rank",
                     "resolution", "transformer_layers", "transformer_width")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used to resume this run."""


def list_checkpoints(output_dir: str) -> list:
    """``(step, path)`` of every folder named ``checkpoint-N``, oldest first (complete or not)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_RE.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def read_checkpoint_state(path: str) -> dict:
    """The training state of a complete checkpoint; raises CheckpointError if it is not one."""
    state_file = os.path.join(path, STATE_FILE)
    try:
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a complete checkpoint (no {STATE_FILE})") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: unreadable {STATE_FILE} ({error})") from None
    missing = [f for f in state.get("files", []) if not os.path.isfile(os.path.join(path, f))]
    missing += [f"rank-{r}.pkl" for r in range(int(state.get("world_size", 1)))
                if not os.path.isfile(os.path.join(path, f"rank-{r}.pkl"))]
    if missing:
        raise CheckpointError(f"{path} is incomplete: missing {', '.join(missing)}")
    return state


def find_resume_checkpoint(output_dir: str, request: str, warn=print):
    """Resolve ``--resume_from_checkpoint``: ``latest`` -> the newest complete checkpoint (skipping
    incomplete or corrupt ones with a warning) or None; a path or folder name -> that checkpoint,
    or CheckpointError."""
    if request == "latest":
        for _, path in reversed(list_checkpoints(output_dir)):
            try:
                read_checkpoint_state(path)
                return path
            except CheckpointError as error:
                warn(f"warning: skipping checkpoint: {error}")
        return None
    path = request if os.path.isdir(request) else os.path.join(output_dir, request)
    if not os.path.isdir(path):
        raise CheckpointError(f"--resume_from_checkpoint: {request} does not exist (give a checkpoint-N folder or 'latest')")
    read_checkpoint_state(path)
    return path


def check_compatible(saved: dict, current: dict, path: str) -> None:
    """Refuse to resume when the run layout or model differs from the checkpoint's."""
    for key in RESUME_MUST_MATCH:
        if key in saved and saved[key] != current.get(key):
            raise CheckpointError(
                f"cannot resume from {path}: it was saved with {key}={saved[key]}, this run has {key}={current.get(key)} "
                f"(resume with the same setting, or start a new --output_dir)"
            )


def capture_rng_state() -> dict:
    """Python, NumPy and Paddle generator states (the device's and the CPU's)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "paddle": paddle.get_rng_state(), "paddle_cpu": paddle.get_rng_state("cpu")}


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    paddle.set_rng_state(state["paddle_cpu"], "cpu")
    paddle.set_rng_state(state["paddle"])


def save_checkpoint(output_dir, step, rank, world_size, barrier, shared_writer, rank_state, training_state,
                    total_limit=None, log=print):
    """Collective: every rank calls it. ``shared_writer(folder) -> [file names]`` runs on rank 0;
    ``rank_state`` (picklable) goes to ``rank-R.pkl``. Returns the final path."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".incomplete"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    with open(os.path.join(tmp, f"rank-{rank}.pkl"), "wb") as f:
        pickle.dump(rank_state, f)
    if rank == 0:
        files = shared_writer(tmp)
        with open(os.path.join(tmp, STATE_FILE + ".partial"), "w", encoding="utf-8") as f:
            json.dump({**training_state, "global_step": step, "world_size": world_size, "files": files}, f, indent=2)
    barrier()
    if rank == 0:
        os.replace(os.path.join(tmp, STATE_FILE + ".partial"), os.path.join(tmp, STATE_FILE))
        if os.path.isdir(final):  # a re-save of the same step (e.g. at exit) replaces the old one
            shutil.rmtree(final)
        os.replace(tmp, final)
        log(f"saved checkpoint {final}")
        if total_limit is not None:
            for _, old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
                log(f"removed old checkpoint {old}")
    barrier()
    return final


def load_rank_state(path: str, rank: int) -> dict:
    with open(os.path.join(path, f"rank-{rank}.pkl"), "rb") as f:
        return pickle.load(f)
