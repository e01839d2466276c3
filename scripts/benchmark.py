#!/usr/bin/env python
"""Time K warm-up and N measured training steps (D and G alternate) and report where the time goes.

    python scripts/benchmark.py                      # tiny teacher and tiny shards, built on the fly
    python scripts/benchmark.py --pretrained_teacher_model SD3_DIR --data_path SHARDS --resolution 1024 \\
        --train_batch_size 2 --mixed_precision fp16 --lora_rank 32 [--gradient_checkpointing]

Runs the real trainer (``train_pcm_lora_sd3_adv.train``) in this process. Prints a per-phase table and, as
its last line, one JSON object with ``step_time_s``, ``d_step_time_s``, ``g_step_time_s``, ``samples_per_s``,
``peak_memory_mb`` (GPU max allocated, or the process's peak RSS on CPU), ``phases_s`` and the configuration.
Any other trainer flag can be appended and is passed through.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

import paddle_compat  # noqa: E402,F401  (before ppdiffusers)
import paddle  # noqa: E402

import train_pcm_lora_sd3_adv as trainer  # noqa: E402
from tracking import PhaseTimer  # noqa: E402

PHASES = ["data", "text_encoding", "vae", "student_forward", "teacher_forward", "target_forward", "discriminator",
          "backward", "optimizer"]


def peak_memory_mb() -> float:
    if paddle.get_device().startswith("gpu"):
        return paddle.device.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# Set by the benchmark itself (a later copy among the passed-through flags would override it).
FIXED_TRAINER_FLAGS = ["--output_dir", "--max_train_steps", "--checkpointing_steps", "--num_validation_images", "--report_to"]


def passed_through_flags(own: set) -> list:
    """The trainer's flags that are not the benchmark's own or set by it, in the trainer's --help order."""
    skip = own | set(FIXED_TRAINER_FLAGS) | {"--help"}
    flags = [s for action in trainer.build_parser()._actions for s in action.option_strings if s.startswith("--")]
    return [flag for flag in flags if flag not in skip]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=trainer.HelpWithDefaults)
    p.add_argument("--pretrained_teacher_model", default=None, help="default: a tiny teacher built by make_tiny_sd3")
    p.add_argument("--data_path", default=None, help="default: tiny shards built by make_tiny_cc3m")
    p.add_argument("--resolution", type=int, default=128, help="training resolution")
    p.add_argument("--train_batch_size", type=int, default=2, help="batch size per device")
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"], help="fp16/bf16 need a GPU")
    p.add_argument("--lora_rank", type=int, default=32, help="LoRA rank")
    p.add_argument("--warmup_steps", type=int, default=2, help="K: steps not measured (an even number keeps D/G balanced)")
    p.add_argument("--steps", type=int, default=10, help="N: measured steps")
    p.add_argument("--seed", type=int, default=0, help="trainer seed")
    own = {flag for action in p._actions for flag in action.option_strings}
    p.epilog = ("Every other trainer flag is passed through to train_pcm_lora_sd3_adv.py (see its --help): "
                + " ".join(passed_through_flags(own)))
    args, passthrough = p.parse_known_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        teacher = args.pretrained_teacher_model
        if teacher is None:
            from make_tiny_sd3 import make_tiny_sd3

            teacher = make_tiny_sd3(os.path.join(tmp, "tiny-sd3"))
        data = args.data_path
        if data is None:
            from make_tiny_cc3m import make_tiny_cc3m

            data = os.path.join(tmp, "cc3m")
            make_tiny_cc3m(data, num_shards=2, samples_per_shard=16, min_size=args.resolution, max_size=args.resolution * 2)
        train_args = trainer.parse_args([
            "--pretrained_teacher_model", teacher, "--data_path", data, "--output_dir", os.path.join(tmp, "out"),
            "--resolution", str(args.resolution), "--train_batch_size", str(args.train_batch_size),
            "--mixed_precision", args.mixed_precision, "--lora_rank", str(args.lora_rank), "--seed", str(args.seed),
            "--max_train_steps", str(args.warmup_steps + args.steps), "--checkpointing_steps", "1000000",
            "--num_validation_images", "0", "--report_to", "none", *passthrough])
        geometry = trainer.validate_args(train_args)
        timer = PhaseTimer()
        step_times = {"d": [], "g": []}
        clock = {"last": None}

        def on_step(step, is_d_step, student, discriminator):
            now = time.perf_counter()
            if step == args.warmup_steps:
                timer.reset()
            elif step > args.warmup_steps:
                step_times["d" if is_d_step else "g"].append(now - clock["last"])
            clock["last"] = now

        trainer.train(train_args, geometry, on_step=on_step, timer=timer)

    measured = step_times["d"] + step_times["g"]
    step_time = sum(measured) / len(measured)
    world = paddle.distributed.get_world_size()
    phases = {phase: timer.totals.get(phase, 0.0) / len(measured) for phase in PHASES}
    print(f"{'phase':<18}{'s/step':>10}{'share':>8}")
    for phase, seconds in phases.items():
        print(f"{phase:<18}{seconds:>10.4f}{seconds / step_time:>8.1%}")
    print(f"{'other':<18}{step_time - sum(phases.values()):>10.4f}")
    result = {
        "step_time_s": step_time,
        "d_step_time_s": sum(step_times["d"]) / max(1, len(step_times["d"])),
        "g_step_time_s": sum(step_times["g"]) / max(1, len(step_times["g"])),
        "samples_per_s": args.train_batch_size * world * train_args.gradient_accumulation_steps / step_time,
        "peak_memory_mb": peak_memory_mb(),
        "phases_s": phases,
        "config": {"teacher": args.pretrained_teacher_model or "tiny (make_tiny_sd3 defaults)", "resolution": args.resolution,
                   "train_batch_size": args.train_batch_size, "mixed_precision": args.mixed_precision,
                   "lora_rank": args.lora_rank, "device": paddle.get_device(), "world_size": world,
                   "warmup_steps": args.warmup_steps, "steps": args.steps, "extra_flags": passthrough},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
