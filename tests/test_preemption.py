"""Preemption on a real 2-rank ``paddle.distributed.launch`` job: SIGTERM/SIGINT to the launcher, to every process,
or to one rank -> every rank finishes its step, one checkpoint, a clean exit, exact resume; ``kill -9`` of the
launcher -> the ranks and their DataLoader workers end by themselves; a live ``--output_dir`` is refused; a stuck
DataLoader worker becomes an error."""
import signal
import subprocess
import sys
import time

import psutil
import pytest
from conftest import REPO
from test_checkpointing import (STEPS, assert_same_weights, env, final_weights, launch_cmd,  # noqa: F401
                                reference_weights, resume_data, resume_to_the_end)

import checkpointing
import train_pcm_lora_sd3_adv as trainer


def start_job(tiny_sd3, data, out, log_dir, workers):
    """The 2-rank job of test_checkpointing, started and run for 2 of its STEPS steps."""
    proc = subprocess.Popen(launch_cmd(tiny_sd3, data, out, log_dir, STEPS, workers), cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics, deadline = out / "logs" / "metrics.jsonl", time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"job ended or hung before step 2:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.05)
    tree = psutil.Process(proc.pid).children(recursive=True)
    ranks = [p for p in tree if p.ppid() == proc.pid]
    assert len(ranks) == 2 and len(tree) == 2 + 2 * workers, [p.cmdline()[:3] for p in tree]
    return proc, ranks, tree


def assert_all_gone(processes, within: float):
    _, alive = psutil.wait_procs(processes, timeout=within)
    assert not alive, f"still running after {within} s: {[(p.pid, p.cmdline()[:3]) for p in alive]}"


def stopped_at(out) -> int:
    """The step of the stop checkpoint: the newest, complete and intact, not the end of the run; before it only
    the periodic ones (every 3 steps)."""
    steps = [s for s, _ in checkpointing.list_checkpoints(str(out))]
    assert not (out / "paddle_lora_weights.safetensors").exists(), "the run finished before the signal"
    assert 2 <= steps[-1] < STEPS and all(s % 3 == 0 for s in steps[:-1]), steps
    checkpointing.read_checkpoint_state(str(out / f"checkpoint-{steps[-1]}"))
    return steps[-1]


@pytest.mark.parametrize("target,workers", [("launcher", 2), ("every process", 0)])
def test_sigterm_stops_cleanly_and_resume_is_exact(tiny_sd3, resume_data, reference_weights, tmp_path, capsys,
                                                   target, workers):
    """(Exact resume with 0 workers from a checkpoint at any step is test_sigkill_then_resume...[0]; the resume
    runs here only for 2 workers, to keep the suite's time.)"""
    out = tmp_path / "run"
    proc, ranks, tree = start_job(tiny_sd3, resume_data, out, tmp_path / "l1", workers)
    if target == "launcher":  # a second job on the same --output_dir is refused, before loading anything
        assert trainer.main(launch_cmd(tiny_sd3, resume_data, out, tmp_path / "x", STEPS, 0)[8:-2]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is in use by a running job" in err and f"pid {ranks[0].pid}," in err

    for process in [psutil.Process(proc.pid)] + (tree if target == "every process" else []):
        process.send_signal(signal.SIGTERM)
    console, _ = proc.communicate(timeout=120)
    # Paddle's launcher exits with the signal's number once its ranks are done (documented in the README)
    assert proc.returncode == 15, console[-3000:]
    assert_all_gone(tree, within=10)
    step = stopped_at(out)
    assert f"stop requested (SIGTERM): saved {out}/checkpoint-{step}" in console  # on the console, not only in the log
    if workers == 0:
        return
    logs = resume_to_the_end(tiny_sd3, resume_data, out, tmp_path / "l2", workers)
    assert f"resumed from {out}/checkpoint-{step} at step {step}" in logs
    assert_same_weights(reference_weights(workers), final_weights(out))


def test_sigint_to_one_rank_stops_every_rank_and_exits_0(tiny_sd3, resume_data, tmp_path):
    out = tmp_path / "run"
    proc, ranks, tree = start_job(tiny_sd3, resume_data, out, tmp_path / "logs", workers=0)
    ranks[1].send_signal(signal.SIGINT)
    console, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, console[-3000:]
    assert f"stop requested (signal on another rank): saved {out}/checkpoint-{stopped_at(out)}" in console
    assert_all_gone(tree, within=10)


def test_ranks_and_workers_end_when_the_launcher_is_killed(tiny_sd3, resume_data, tmp_path):
    out = tmp_path / "run"
    proc, ranks, tree = start_job(tiny_sd3, resume_data, out, tmp_path / "logs", workers=2)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert_all_gone(tree, within=30)  # the ranks get SIGTERM from the kernel: they finish the step, save, exit
    stopped_at(out)
    assert "stop requested (SIGTERM)" in (tmp_path / "logs" / "workerlog.0").read_text()


def test_stuck_dataloader_worker_is_an_error_not_a_hang(tiny_sd3, resume_data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "train_pcm_lora_sd3_adv.py", *launch_cmd(tiny_sd3, resume_data, out, "", 10000, 1)[8:-2],
           "--dataloader_timeout", "5"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, deadline = out / "logs" / "metrics.jsonl", time.time() + 300
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.05)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert len(workers) == 1
    workers[0].send_signal(signal.SIGSTOP)  # alive but never hands another batch over
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 4, err[-3000:]
    assert "error: no batch from the DataLoader for 5 s" in err and "--dataloader_timeout" in err
    assert_all_gone(workers, within=10)  # the stopped worker dies with its process
