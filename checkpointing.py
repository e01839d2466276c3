"""Checkpoints that lose nothing and load nothing unsafe: safetensors + JSON only, every file's size and
SHA-256 recorded and verified, atomic writes, every rank's random state, exact resume.

Layout of ``output_dir/checkpoint-N/`` (N = global step)::

    paddle_lora_weights.safetensors   LoRA, the same format as the final output
    discriminator_heads.safetensors   discriminator heads
    optimizer.safetensors             AdamW moments of the LoRA, keyed "<parameter index>/<accumulator>"
    adv_optimizer.safetensors         the same for the heads' AdamW
    schedule.json                     LR scheduler and GradScaler state
    rank-R.json                       rank R's Python/NumPy/Paddle (CPU and device) random states and
                                      data stream position
    training_args.json                the arguments the run was started with
    training_state.json               global step, world size, batch layout, model, and ``files``:
                                      {name: {"bytes", "sha256"}} of every other file; written last

A checkpoint is written into ``checkpoint-N.incomplete`` and renamed into place by rank 0 only after every
rank has written its part (barriers between), so a crash or kill during a save leaves all earlier checkpoints
untouched and never a half checkpoint under a final name. Pruning to ``--checkpoints_total_limit`` happens
only after the new checkpoint is complete. Nothing here is a pickle: a checkpoint someone hands you is
read as tensors and JSON only.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil

import numpy as np
import paddle

STATE_FILE = "training_state.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
# What must match between the run that saved and the run that resumes, else the data order,
# the batch per optimizer step or the weights would silently differ.
RESUME_MUST_MATCH = ("world_size", "train_batch_size", "gradient_accumulation_steps", "lora_rank",
                     "resolution", "transformer_layers", "transformer_width")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used to resume this run (missing, corrupt, or made by another layout)."""


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


def rank_file(rank: int) -> str:
    return f"rank-{rank}.json"


def file_record(path: str) -> dict:
    """``{"bytes", "sha256"}`` of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": os.path.getsize(path), "sha256": digest.hexdigest()}


def read_checkpoint_state(path: str) -> dict:
    """The training state of a complete, intact checkpoint: every file it lists exists with the recorded size
    and SHA-256. Raises CheckpointError naming the first file that is not."""
    state_file = os.path.join(path, STATE_FILE)
    try:
        with open(state_file, encoding="utf-8") as f:
            state = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a complete checkpoint (no {STATE_FILE})") from None
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{state_file} is corrupt ({error})") from None
    files = state.get("files") if isinstance(state, dict) else None
    if not (isinstance(files, dict) and isinstance(state.get("global_step"), int)
            and isinstance(state.get("world_size"), int) and state["world_size"] >= 1):
        raise CheckpointError(f"{state_file} is corrupt (not a checkpoint state with global_step, world_size and "
                              "file checksums; checkpoints of older versions held pickles and are not loaded)")
    needed = [rank_file(r) for r in range(state["world_size"])]
    for name in [*files, *(n for n in needed if n not in files)]:
        record = files.get(name)
        if not (FILE_NAME_RE.match(name) and isinstance(record, dict)):
            raise CheckpointError(f"{state_file} is corrupt (bad entry for {name!r})")
        file_path = os.path.join(path, name)
        if not os.path.isfile(file_path):
            raise CheckpointError(f"{path} is incomplete: missing {name}")
        if file_record(file_path) != {"bytes": record.get("bytes"), "sha256": record.get("sha256")}:
            raise CheckpointError(f"{file_path} is corrupt (size or SHA-256 differs from {STATE_FILE})")
    return state


def find_resume_checkpoint(output_dir: str, request: str, warn=print, below: int | None = None):
    """Resolve ``--resume_from_checkpoint`` to ``(path, state)`` of an intact checkpoint.

    ``latest`` -> the newest intact checkpoint (older than step ``below`` if given), skipping incomplete or
    corrupt ones with a one-line warning each, or None when there is none; a path or folder name -> that
    checkpoint, or CheckpointError (also when it is corrupt)."""
    if request == "latest":
        for step, path in reversed(list_checkpoints(output_dir)):
            if below is not None and step >= below:
                continue
            try:
                return path, read_checkpoint_state(path)
            except CheckpointError as error:
                warn(f"warning: skipping checkpoint: {error}")
        return None
    path = request if os.path.isdir(request) else os.path.join(output_dir, request)
    if not os.path.isdir(path):
        raise CheckpointError(f"--resume_from_checkpoint: {request} does not exist (give a checkpoint-N folder or 'latest')")
    return path, read_checkpoint_state(path)


def check_compatible(saved: dict, current: dict, path: str) -> None:
    """Refuse to resume when the run layout or model differs from the checkpoint's (keys ``current`` has)."""
    for key in RESUME_MUST_MATCH:
        if key in saved and key in current and saved[key] != current[key]:
            raise CheckpointError(
                f"cannot resume from {path}: it was saved with {key}={saved[key]}, this run has {key}={current[key]} "
                f"(resume with the same setting, or start a new --output_dir)"
            )


# ---- state <-> tensors and JSON ---------------------------------------------------------------------------
def capture_rng_state() -> dict:
    """Python, NumPy and Paddle generator states (the device's and the CPU's), as JSON values."""
    def generators(states):
        return [[*s.__getstate__()[:3], bytes(s.__getstate__()[3]).decode("ascii")] for s in states]

    kind, key, pos, has_gauss, cached = np.random.get_state()
    return {"python": list(random.getstate()), "numpy": [kind, key.tolist(), pos, has_gauss, cached],
            "paddle": generators(paddle.get_rng_state()), "paddle_cpu": generators(paddle.get_rng_state("cpu"))}


def parse_rng_state(state) -> tuple:
    """``capture_rng_state()``'s JSON back as the objects the setters take; raises ValueError/TypeError/KeyError
    if it is malformed (nothing is set)."""
    from paddle.base import core

    def generators(values):
        out = []
        for device, seed, offset, engine in values:
            generator = core.GeneratorState.__new__(core.GeneratorState)
            generator.__setstate__((int(device), int(seed), int(offset), list(engine.encode("ascii"))))
            out.append(generator)
        return out

    version, internal, gauss = state["python"]
    python = (int(version), tuple(int(v) for v in internal), gauss)
    kind, key, pos, has_gauss, cached = state["numpy"]
    numpy_state = (str(kind), np.asarray(key, dtype=np.uint32), int(pos), int(has_gauss), float(cached))
    checker = random.Random()
    checker.setstate(python)  # validate before anything global is changed
    np.random.RandomState().set_state(numpy_state)
    return python, numpy_state, generators(state["paddle"]), generators(state["paddle_cpu"])


def restore_rng_state(parsed: tuple) -> None:
    python, numpy_state, device, cpu = parsed
    random.setstate(python)
    np.random.set_state(numpy_state)
    paddle.set_rng_state(cpu, "cpu")
    paddle.set_rng_state(device)


def optimizer_tensors(optimizer, params) -> dict:
    """An optimizer's accumulators as numpy arrays keyed ``"<index in params>/<accumulator>"`` (stable across
    runs, unlike Paddle's generated parameter names). Its LR scheduler is saved on its own."""
    index = {p.name: i for i, p in enumerate(params)}
    out = {}
    for key, value in optimizer.state_dict().items():
        if key == "LR_Scheduler":
            continue
        if key == "master_weights":
            out.update({f"{index[name]}/master_weight": v.numpy() for name, v in value.items()})
            continue
        name = max((n for n in index if key.startswith(n + "_")), key=len)
        out[f"{index[name]}/{key[len(name) + 1:]}"] = value.numpy()
    return out


def optimizer_state(tensors: dict, params, path: str) -> dict:
    """``optimizer_tensors`` output back as a state dict for ``params``; CheckpointError unless it is exactly
    an AdamW state of these parameters (every parameter the same accumulators, moments of its shape)."""
    per_param = {}
    for key, value in tensors.items():
        i, _, kind = key.partition("/")
        if not (i.isdigit() and int(i) < len(params) and kind):
            raise CheckpointError(f"{path} is corrupt (unexpected optimizer entry {key!r})")
        per_param.setdefault(int(i), {})[kind] = value
    kinds = {frozenset(v) for v in per_param.values()}
    if per_param and (len(per_param) != len(params) or len(kinds) != 1):
        raise CheckpointError(f"{path} is corrupt (optimizer state covers {len(per_param)} of {len(params)} parameters)")
    state, masters = {}, {}
    for i, entries in per_param.items():
        param = params[i]
        for kind, value in entries.items():
            expected = [1] if "pow_acc" in kind else list(param.shape)
            if list(value.shape) != expected:
                raise CheckpointError(f"{path} is corrupt (optimizer {kind} of parameter {i} has shape "
                                      f"{list(value.shape)}, expected {expected})")
            if kind == "master_weight":
                masters[param.name] = paddle.to_tensor(value)
            else:
                state[f"{param.name}_{kind}"] = paddle.to_tensor(value)
    if masters:
        state["master_weights"] = masters
    return state


def check_tensors(tensors: dict, expected: dict, path: str) -> None:
    """Strict load: the same names and shapes as ``expected`` ({name: shape}), else CheckpointError."""
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{path} is corrupt ({len(missing)} missing keys, e.g. {missing[:1]}; "
                              f"{len(unexpected)} unexpected, e.g. {unexpected[:1]})")
    for name, shape in expected.items():
        if list(tensors[name].shape) != list(shape):
            raise CheckpointError(f"{path} is corrupt ({name} has shape {list(tensors[name].shape)}, expected {list(shape)})")


def read_tensors(path: str) -> dict:
    """A safetensors file as numpy arrays; CheckpointError if it is not one."""
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own error types for every kind of bad file
        raise CheckpointError(f"{path} is corrupt ({type(error).__name__}: {error})") from None


def read_json(path: str, kind=dict):
    """A JSON file that must hold a ``kind``; CheckpointError otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is corrupt ({error})") from None
    if not isinstance(value, kind):
        raise CheckpointError(f"{path} is corrupt (expected a JSON {kind.__name__}, got {type(value).__name__})")
    return value


def write_json(path: str, value) -> None:
    """Write JSON atomically (temporary file, then rename): a kill leaves the old file or none."""
    with open(path + ".partial", "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2)
    os.replace(path + ".partial", path)


def save_checkpoint(output_dir, step, rank, world_size, barrier, shared_writer, rank_state, training_state,
                    total_limit=None, log=print):
    """Collective: every rank calls it. ``shared_writer(folder) -> [file names]`` runs on rank 0;
    ``rank_state`` (JSON values) goes to ``rank-R.json``. Returns the final path."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = final + ".incomplete"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    write_json(os.path.join(tmp, rank_file(rank)), rank_state)
    if rank == 0:
        shared = shared_writer(tmp)
    barrier()
    if rank == 0:
        names = [*shared, *(rank_file(r) for r in range(world_size))]
        files = {name: file_record(os.path.join(tmp, name)) for name in names}
        write_json(os.path.join(tmp, STATE_FILE),
                   {**training_state, "global_step": step, "world_size": world_size, "files": files})
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
