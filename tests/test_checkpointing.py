"""Checkpoints: exact resume after SIGKILL on 2 ranks, pruning, corrupt/incomplete/tampered skipping and strict
loading, explicit paths, layout checks before any model is loaded, atomic final writes, SIGTERM."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, run_python
from safetensors.numpy import load_file

import checkpointing
import train_pcm_lora_sd3_adv as trainer


@pytest.fixture(scope="session")
def resume_data(tmp_path_factory):
    from make_tiny_cc3m import make_tiny_cc3m

    out = str(tmp_path_factory.mktemp("resume-data"))
    make_tiny_cc3m(out, num_shards=4, samples_per_shard=8, seed=3)
    return out


def launch_cmd(tiny_sd3, data, out, log_dir, steps, workers, extra=()):
    return [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(log_dir),
            "train_pcm_lora_sd3_adv.py", "--pretrained_teacher_model", tiny_sd3, "--data_path", data,
            "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", str(steps),
            "--checkpointing_steps", "3", "--seed", "7", "--random_flip", "--dataloader_num_workers", str(workers),
            "--num_validation_images", "0", "--report_to", "none", "--resume_from_checkpoint", "latest", *extra]


def kill_tree(pid):
    """SIGKILL a process and all its descendants at once."""
    import psutil

    root = psutil.Process(pid)
    for process in [*root.children(recursive=True), root]:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass


def env():
    return {**os.environ, "PYTHONPATH": REPO}


def final_weights(out):
    """The LoRA written at the end and the heads of the final checkpoint."""
    steps = [s for s, _ in checkpointing.list_checkpoints(str(out))]
    heads = load_file(os.path.join(out, f"checkpoint-{steps[-1]}", "discriminator_heads.safetensors"))
    return load_file(os.path.join(out, "paddle_lora_weights.safetensors")), heads


STEPS = 12
_REFERENCES = {}  # module level: test_preemption imports the fixture, and both modules share these runs


@pytest.fixture(scope="session")
def reference_weights(tiny_sd3, resume_data, tmp_path_factory):
    """``reference_weights(workers)``: final weights of an uninterrupted 2-rank run of STEPS steps (run once;
    the data is a pure function of its seed, so every copy of ``resume_data`` gives the same run)."""
    cache = _REFERENCES

    def get(workers):
        if workers not in cache:
            root = tmp_path_factory.mktemp(f"reference-{workers}-workers")
            done = subprocess.run(launch_cmd(tiny_sd3, resume_data, root / "run", root / "logs", STEPS, workers),
                                  cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr[-3000:]
            cache[workers] = final_weights(root / "run")
        return cache[workers]

    return get


def assert_same_weights(a, b):
    (lora_a, heads_a), (lora_b, heads_b) = a, b
    assert set(lora_a) == set(lora_b) and set(heads_a) == set(heads_b)
    for key in lora_a:  # Paddle's CPU kernels are deterministic here: bitwise equal
        np.testing.assert_array_equal(lora_a[key], lora_b[key], err_msg=key)
    for key in heads_a:
        np.testing.assert_array_equal(heads_a[key], heads_b[key], err_msg=key)


def resume_to_the_end(tiny_sd3, data, out, log_dir, workers):
    """Run the 2-rank job on ``out`` again with ``latest``; returns rank 0's log."""
    resumed = subprocess.run(launch_cmd(tiny_sd3, data, out, log_dir, STEPS, workers),
                             cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    logs = (log_dir / "workerlog.0").read_text(errors="replace")
    assert resumed.returncode == 0, resumed.stderr[-3000:] + logs[-3000:]
    return logs


@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_then_resume_equals_uninterrupted_run(tiny_sd3, resume_data, reference_weights, tmp_path, workers):
    interrupted = tmp_path / "interrupted"
    proc = subprocess.Popen(launch_cmd(tiny_sd3, resume_data, interrupted, tmp_path / "l1", STEPS, workers),
                            cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (interrupted / "checkpoint-3" / checkpointing.STATE_FILE).exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its second checkpoint"
        time.sleep(0.02)
    kill_tree(proc.pid)  # launcher and both ranks (the launcher starts them in their own sessions), mid-run
    proc.wait()
    assert not (interrupted / "paddle_lora_weights.safetensors").exists(), "the run finished before the kill"
    killed_at = checkpointing.list_checkpoints(str(interrupted))[-1][0]
    assert 3 <= killed_at < STEPS  # 3, 6 or 9 micro-batches: odd counts rotate the workers' roles

    logs = resume_to_the_end(tiny_sd3, resume_data, interrupted, tmp_path / "l2", workers)
    assert "taking over the run lock of a job that is no longer running (host" in logs  # the stale lock of the kill
    assert f"resumed from {interrupted}/checkpoint-{killed_at} at step {killed_at}" in logs
    assert_same_weights(reference_weights(workers), final_weights(interrupted))


def test_pruning_keeps_the_newest_complete_checkpoints(tiny_sd3, resume_data, tmp_path):
    out = tmp_path / "run"
    args = ["train_pcm_lora_sd3_adv.py", "--pretrained_teacher_model", tiny_sd3, "--data_path", resume_data,
            "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "7",
            "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", "--num_validation_images", "0",
            "--report_to", "none"]
    result = run_python(args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [s for s, _ in checkpointing.list_checkpoints(str(out))] == [6, 7]  # 2, 4 pruned; 7 = the final state
    state = json.loads((out / "checkpoint-7" / checkpointing.STATE_FILE).read_text())
    assert state["global_step"] == 7 and state["world_size"] == 1
    assert "rank-0.json" in state["files"]
    for name, record in state["files"].items():  # size and SHA-256 of every file, and only safetensors/JSON
        assert checkpointing.file_record(str(out / "checkpoint-7" / name)) == record
    assert {p.suffix for p in (out / "checkpoint-7").iterdir()} == {".safetensors", ".json"}


def _fake_checkpoint(root, step, world_size=1, complete=True):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    names = ["a.json", *(f"rank-{r}.json" for r in range(world_size))]
    for name in names:
        (folder / name).write_text("{}")
    if complete:
        files = {name: checkpointing.file_record(str(folder / name)) for name in names}
        (folder / checkpointing.STATE_FILE).write_text(json.dumps({"global_step": step, "world_size": world_size, "files": files}))
    return folder


def test_latest_skips_incomplete_and_corrupt_checkpoints(tmp_path):
    _fake_checkpoint(tmp_path, 2)
    _fake_checkpoint(tmp_path, 4, world_size=2)
    _fake_checkpoint(tmp_path, 6, complete=False)  # killed mid-save: no state file
    (_fake_checkpoint(tmp_path, 8) / checkpointing.STATE_FILE).write_text("{not json")
    os.remove(_fake_checkpoint(tmp_path, 10, world_size=2) / "rank-1.json")  # a rank's part missing
    (_fake_checkpoint(tmp_path, 12) / "a.json").write_text("{ }")  # same size, other content
    with open(_fake_checkpoint(tmp_path, 14) / "rank-0.json", "a") as f:
        f.write("\n")  # appended to
    (_fake_checkpoint(tmp_path, 16) / checkpointing.STATE_FILE).write_text("[1, 2]")  # JSON of the wrong type
    (tmp_path / "checkpoint-18.incomplete").mkdir()  # a save in progress is never a checkpoint
    warnings = []
    path, state = checkpointing.find_resume_checkpoint(str(tmp_path), "latest", warn=warnings.append)
    assert path == str(tmp_path / "checkpoint-4") and state["global_step"] == 4
    assert len(warnings) == 6 and all(w.startswith("warning: skipping checkpoint") and "\n" not in w for w in warnings)
    for step, file in [(8, checkpointing.STATE_FILE), (10, "rank-1.json"), (12, "a.json"), (14, "rank-0.json"),
                       (16, checkpointing.STATE_FILE)]:
        assert any(f"checkpoint-{step}" in w and file in w for w in warnings), (step, warnings)
    assert checkpointing.find_resume_checkpoint(str(tmp_path / "empty"), "latest") is None


def test_explicit_checkpoint_paths(tmp_path):
    good = _fake_checkpoint(tmp_path, 2)
    assert checkpointing.find_resume_checkpoint(str(tmp_path), "checkpoint-2")[0] == str(good)
    assert checkpointing.find_resume_checkpoint("/elsewhere", str(good))[0] == str(good)
    with pytest.raises(checkpointing.CheckpointError, match="does not exist"):
        checkpointing.find_resume_checkpoint(str(tmp_path), "checkpoint-99")
    (tmp_path / "not-a-checkpoint").mkdir()
    with pytest.raises(checkpointing.CheckpointError, match="not a complete checkpoint"):
        checkpointing.find_resume_checkpoint(str(tmp_path), "not-a-checkpoint")
    (good / "a.json").write_text("[]")  # an explicitly named corrupt checkpoint is an error, not a fallback
    with pytest.raises(checkpointing.CheckpointError, match="a.json is corrupt"):
        checkpointing.find_resume_checkpoint(str(tmp_path), "checkpoint-2")


def configs_only(model, dest):
    """A copy of a model folder without its weight files: loading any model from it fails."""
    shutil.copytree(model, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.pdparams", "*.bin"))
    return str(dest)


def test_resume_errors_are_one_line_and_come_before_any_model_is_loaded(tiny_sd3, resume_data, tmp_path, capsys):
    teacher = configs_only(tiny_sd3, tmp_path / "no-weights")
    out = tmp_path / "out"
    base = ["--pretrained_teacher_model", teacher, "--data_path", resume_data, "--output_dir", str(out),
            "--resolution", "64", "--max_train_steps", "2", "--report_to", "none", "--num_validation_images", "0"]
    assert trainer.main(base + ["--resume_from_checkpoint", "checkpoint-99"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume_from_checkpoint" in err and "does not exist" in err
    # a checkpoint made with 2 ranks cannot continue with 1: the data order and batch would change
    _fake_checkpoint(out, 2, world_size=2)
    state = out / "checkpoint-2" / checkpointing.STATE_FILE
    state.write_text(json.dumps({**json.loads(state.read_text()), "train_batch_size": 4}))
    assert trainer.main(base + ["--resume_from_checkpoint", "latest", "--train_batch_size", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "world_size=2" in err and "world_size=1" in err
    state.write_text(json.dumps({**json.loads(state.read_text()), "world_size": 1, "lora_rank": 8}))
    assert trainer.main(base + ["--resume_from_checkpoint", "latest", "--train_batch_size", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "lora_rank=8" in err and "lora_rank=4" in err


def test_sigterm_saves_at_the_next_step_and_exits_cleanly(tiny_sd3, resume_data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "train_pcm_lora_sd3_adv.py", "--pretrained_teacher_model", tiny_sd3, "--data_path", resume_data,
           "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "10000",
           "--checkpointing_steps", "1000", "--num_validation_images", "0", "--report_to", "none"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "logs" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"run ended or hung before 3 steps:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-2000:]
    saved = checkpointing.list_checkpoints(str(out))
    assert len(saved) == 1 and saved[0][0] >= 3
    assert "stop requested" in output and "--resume_from_checkpoint latest" in output
    checkpointing.read_checkpoint_state(saved[0][1])  # complete


SHARED_DIR_PROBE = """
import os, sys
import paddle.distributed as dist
import train_pcm_lora_sd3_adv as trainer
import checkpointing
dist.init_parallel_env()
root = sys.argv[1]
for mode in ("shared", "local"):
    folder = os.path.join(root, mode, f"rank{dist.get_rank()}" if mode == "local" else "")
    os.makedirs(folder, exist_ok=True)
    try:
        trainer.check_shared_output_dir(folder)
        print(f"{mode}: rank {dist.get_rank()}: shared")
    except checkpointing.CheckpointError as error:
        print(f"{mode}: rank {dist.get_rank()}: {error}")
"""


def test_output_dir_must_be_shared_by_all_ranks(tmp_path):
    """Two ranks with one folder pass; two ranks each with its own folder (as two nodes with local disks)
    are refused on every rank instead of writing checkpoints that cannot be resumed."""
    script = tmp_path / "probe.py"
    script.write_text(SHARED_DIR_PROBE)
    result = run_python(["-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(tmp_path / "logs"),
                         str(script), str(tmp_path / "out")])
    assert result.returncode == 0, result.stderr[-2000:]
    logs = [(tmp_path / "logs" / f"workerlog.{r}").read_text() for r in range(2)]
    for rank, text in enumerate(logs):
        assert f"shared: rank {rank}: shared" in text
        assert not (tmp_path / "out" / "shared" / ".shared-output-dir-check").exists()
        assert f"local: rank {rank}: --output_dir" in text and "not shared by all ranks" in text


def test_tampered_checkpoint_fails_the_strict_load_and_latest_falls_back(tiny_sd3, resume_data, tmp_path, capsys):
    """A heads file with no keys but a matching checksum (the issue's silent corruption), a truncated optimizer
    file, and an explicitly named corrupt checkpoint: never a traceback, never a silently wrong resume."""
    from safetensors.numpy import save_file

    out = tmp_path / "run"
    base = ["--pretrained_teacher_model", tiny_sd3, "--data_path", resume_data, "--output_dir", str(out),
            "--resolution", "64", "--train_batch_size", "2", "--checkpointing_steps", "2", "--seed", "5",
            "--num_validation_images", "0", "--report_to", "none", "--resume_from_checkpoint", "latest"]
    assert trainer.main(base + ["--max_train_steps", "4"]) == 0
    uninterrupted = load_file(str(out / "paddle_lora_weights.safetensors"))

    heads = out / "checkpoint-4" / "discriminator_heads.safetensors"
    save_file({}, str(heads))
    state_file = out / "checkpoint-4" / checkpointing.STATE_FILE
    state = json.loads(state_file.read_text())
    state["files"][heads.name] = checkpointing.file_record(str(heads))
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    assert trainer.main(base + ["--max_train_steps", "4"]) == 0
    log = capsys.readouterr().out
    assert f"warning: skipping checkpoint: {heads} is corrupt (20 missing keys" in log
    assert f"resumed from {out}/checkpoint-2 at step 2" in log
    resumed = load_file(str(out / "paddle_lora_weights.safetensors"))  # steps 3-4 again, from checkpoint-2
    assert set(resumed) == set(uninterrupted)
    for key in uninterrupted:
        np.testing.assert_array_equal(resumed[key], uninterrupted[key], err_msg=key)

    optimizer = out / "checkpoint-4" / "optimizer.safetensors"  # the re-saved checkpoint-4, now truncated
    optimizer.write_bytes(optimizer.read_bytes()[:-100])
    warnings = []
    assert checkpointing.find_resume_checkpoint(str(out), "latest", warn=warnings.append)[0] == str(out / "checkpoint-2")
    assert warnings == [f"warning: skipping checkpoint: {optimizer} is corrupt (size or SHA-256 differs from "
                        f"{checkpointing.STATE_FILE})"]
    assert trainer.main(base[:-1] + ["checkpoint-4", "--max_train_steps", "6"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{optimizer} is corrupt" in err
