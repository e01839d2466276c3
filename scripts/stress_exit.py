#!/usr/bin/env python
"""Run many short 2-rank trainings back to back and count their exit codes (not part of the test suite).

It shows that a finished training exits 0 every time (issue 11: rank 0 used to abort with SIGABRT in
about 1 of 15-30 runs while shutting down, and the launcher then returned 250). Tiny teacher and data
are made with the project's own scripts.

    python scripts/stress_exit.py --runs 40 [--workers 2] [--work_dir /tmp/stress]

Prints one line per run and, last, a JSON summary ``{"runs", "exit_codes": {code: count}, "seconds"}``;
exits 1 if any run did not exit 0 (the tails of its worker logs are printed).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--work_dir", default=None, help="default: a fresh temporary folder")
    args = parser.parse_args(argv)

    from make_tiny_cc3m import make_tiny_cc3m
    from make_tiny_sd3 import make_tiny_sd3

    work = args.work_dir or tempfile.mkdtemp(prefix="stress-exit-")
    teacher = make_tiny_sd3(os.path.join(work, "tiny-sd3"), seed=0)
    data = os.path.join(work, "data")
    make_tiny_cc3m(data, num_shards=4, samples_per_shard=8, seed=3)
    env = {**os.environ, "PYTHONPATH": REPO}
    codes, started = collections.Counter(), time.time()
    for run in range(args.runs):
        out, logs = os.path.join(work, f"run-{run}"), os.path.join(work, f"logs-{run}")
        cmd = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", logs,
               os.path.join(REPO, "train_pcm_lora_sd3_adv.py"), "--pretrained_teacher_model", teacher,
               "--data_path", data, "--output_dir", out, "--resolution", "64", "--train_batch_size", "2",
               "--max_train_steps", str(args.steps), "--checkpointing_steps", "2", "--seed", str(run),
               "--dataloader_num_workers", str(args.workers), "--num_validation_images", "0", "--report_to", "none"]
        tick = time.time()
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        codes[done.returncode] += 1
        print(f"run {run}: exit {done.returncode} ({time.time() - tick:.1f} s)", flush=True)
        if done.returncode != 0:
            for name in sorted(os.listdir(logs)):
                if name.startswith("workerlog"):
                    with open(os.path.join(logs, name), errors="replace") as f:
                        print(f"--- {name} (tail)\n{f.read()[-2000:]}", flush=True)
    print(json.dumps({"runs": args.runs, "exit_codes": {str(k): v for k, v in sorted(codes.items())},
                      "seconds": round(time.time() - started, 1)}))
    return 0 if set(codes) == {0} else 1


if __name__ == "__main__":
    sys.exit(main())
