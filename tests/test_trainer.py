"""The trainer end to end on the tiny teacher and tiny shards (CPU)."""
import json
import os
import re

import numpy as np
import paddle
import pytest
from conftest import REPO, run_python
from safetensors.numpy import load_file

import checkpointing
import pcm_lora
import train_pcm_lora_sd3_adv as trainer

# The seed command of the Paddle port's README, flag for flag (including the `--tracker_project_nam`
# prefix), with tiny sizes for CPU: precision no, resolution 64, 8 steps, validation every 4, 2 CPU ranks,
# wandb offline.
SEED_FLAGS = {
    "--tracker_project_nam": "lora_64_formal_fuyun_PCM_sd3_202503191011",
    "--mixed_precision": "no", "--resolution": "64", "--lora_rank": "32", "--learning_rate": "5e-6",
    "--loss_type": "huber", "--adam_weight_decay": "1e-3", "--max_train_steps": "8",
    "--dataloader_num_workers": "1", "--w_min": "4", "--w_max": "5", "--validation_steps": "4",
    "--checkpointing_steps": "4", "--checkpoints_total_limit": "10", "--train_batch_size": "2",
    "--gradient_accumulation_steps": "1", "--resume_from_checkpoint": "latest", "--seed": "453645634",
    "--num_euler_timesteps": "100", "--multiphase": "4", "--adv_weight": "0.1", "--adv_lr": "1e-5",
    "--report_to": "wandb",
}


@pytest.fixture(scope="session")
def tiny_cc3m(tmp_path_factory):
    from make_tiny_cc3m import make_tiny_cc3m

    out = str(tmp_path_factory.mktemp("cc3m"))
    make_tiny_cc3m(out, num_shards=4, samples_per_shard=6, seed=0)
    return out


@pytest.fixture(scope="session")
def fixed_data(tmp_path_factory):
    """One shard of 4 square images: the 'fixed small dataset' of the learning-signal test."""
    from make_tiny_cc3m import make_tiny_cc3m

    out = str(tmp_path_factory.mktemp("fixed"))
    make_tiny_cc3m(out, num_shards=1, samples_per_shard=4, min_size=64, max_size=64, seed=1)
    return out


def flags(mapping):
    return [item for pair in mapping.items() for item in pair]


def test_seed_command_shape_under_distributed_launch(tiny_sd3, tiny_cc3m, tmp_path):
    out = tmp_path / "run"
    argv = ["-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(tmp_path / "logs"),
            "train_pcm_lora_sd3_adv.py", "--data_path", tiny_cc3m, "--pretrained_teacher_model", tiny_sd3,
            "--output_dir", str(out), *flags(SEED_FLAGS)]
    result = run_python(argv, env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb")})
    worker_logs = "".join((tmp_path / "logs" / f"workerlog.{r}").read_text(errors="replace") for r in range(2))
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:] + worker_logs[-3000:]
    assert (out / "paddle_lora_weights.safetensors").is_file() and (out / "paddle_lora_weights.pdparams").is_file()
    saved_args = json.loads((out / "training_args.json").read_text())
    assert saved_args["tracker_project_name"] == SEED_FLAGS["--tracker_project_nam"]
    assert saved_args["w_min"] == 4.0 and saved_args["multiphase"] == 4
    assert [s for s, _ in checkpointing.list_checkpoints(str(out))] == [4, 8]  # every 4 steps; 8 is also the final state
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(("d_loss" in r) == (r["step"] % 2 == 1) for r in rows)  # steps 0, 2, ... (logged as 1, 3, ...) are D steps
    assert all(np.isfinite(r.get("d_loss", r.get("loss_cm"))) for r in rows)
    assert "no checkpoint in" in worker_logs  # --resume_from_checkpoint latest on an empty output_dir starts fresh
    # validation: every 4 steps and at the end (step 8 once), a grid of 4 images of the seed's prompt
    from PIL import Image

    assert sorted(os.listdir(out / "validation")) == ["step-4.png", "step-8.png"]
    with Image.open(out / "validation" / "step-8.png") as grid:
        assert grid.size == (4 * 64, 64)
    runs = [d for d in os.listdir(tmp_path / "wandb" / "wandb") if d.startswith("offline-run-")]
    assert len(runs) == 1  # one wandb run, from rank 0 only
    assert all(set(r) >= {"lr", "skipped_samples", "time_per_step"} for r in rows)


@pytest.fixture(scope="module")
def learned(tiny_sd3, fixed_data, tmp_path_factory):
    """A 60-step single-process run on the fixed data, watching which weights change at each step."""
    out = str(tmp_path_factory.mktemp("learn"))
    args = trainer.parse_args(["--pretrained_teacher_model", tiny_sd3, "--data_path", fixed_data, "--output_dir", out,
                               "--resolution", "64", "--train_batch_size", "4", "--max_train_steps", "60",
                               "--seed", "1", "--learning_rate", "3e-3", "--lora_rank", "8",
                               "--checkpointing_steps", "1000", "--report_to", "none"])
    geometry = trainer.validate_args(args)
    changes = []
    state = {}

    def snapshot(student, discriminator):
        lora = np.concatenate([p.numpy().ravel() for p in student.parameters() if not p.stop_gradient])
        heads = np.concatenate([p.numpy().ravel() for p in discriminator.parameters()])
        return lora, heads

    def on_step(step, is_d_step, student, discriminator):
        lora, heads = snapshot(student, discriminator)
        if "lora" in state:
            changes.append((is_d_step, not np.array_equal(lora, state["lora"]), not np.array_equal(heads, state["heads"])))
        state["lora"], state["heads"] = lora, heads

    result = trainer.train(args, geometry, on_step=on_step)
    return dict(args=args, result=result, changes=changes, out=out)


def _fixed_consistency_loss(args, student):
    """Mean consistency loss of ``student`` over 8 fixed draws (seeded) on one fixed batch."""
    from data import build_one_pass_dataloader
    from discriminator import Discriminator
    from pcm_solver import EulerSolver
    from sd3_text_encoding import SD3PromptEncoder

    tokenizers, encoders, vae, scheduler, teacher, _ = trainer.load_models(args, "float32", lambda *a: None)
    encode = SD3PromptEncoder(tokenizers, encoders)
    solver = EulerSolver(scheduler.sigmas.numpy()[::-1][:1000].copy(), args.num_euler_timesteps, args.multiphase)
    step = trainer.PCMStep(args, solver, encode, encode([""]), vae, teacher, student, Discriminator(teacher), "float32", False)
    batch = next(iter(build_one_pass_dataloader(args.data_path, args.resolution, batch_size=4)))
    losses = []
    for draw in range(8):
        paddle.seed(100 + draw)
        with paddle.no_grad():
            losses.append(float(step(batch, is_d_step=False)["loss_cm"]))
    return float(np.mean(losses))


def test_consistency_loss_falls(learned):
    student = learned["result"].student
    after = _fixed_consistency_loss(learned["args"], student)
    lora_b = {name: param for name, param in student.named_parameters() if "lora_B" in name}
    trained = {name: param.numpy() for name, param in lora_b.items()}
    try:
        for param in lora_b.values():  # lora_B = 0 is the untrained student (it equals the teacher)
            param.set_value(paddle.zeros_like(param))
        before = _fixed_consistency_loss(learned["args"], student)
    finally:
        for name, param in lora_b.items():
            param.set_value(paddle.to_tensor(trained[name]))
    assert after < 0.75 * before, (before, after)


def test_lora_changes_only_on_g_steps_and_heads_only_on_d_steps(learned):
    changes = learned["changes"]
    assert len(changes) == 59
    for is_d_step, lora_changed, heads_changed in changes:
        assert lora_changed == (not is_d_step)
        assert heads_changed == is_d_step


def test_saved_lora_reproduces_the_trained_student(learned, tiny_sd3):
    from ppdiffusers import StableDiffusion3Pipeline

    student = learned["result"].student
    rng = np.random.default_rng(3)
    config = student.config
    inputs = dict(
        hidden_states=paddle.to_tensor(rng.standard_normal([2, 16, 8, 8]).astype("float32")),
        timestep=paddle.to_tensor([800.0, 120.0]),
        encoder_hidden_states=paddle.to_tensor(rng.standard_normal([2, 154, config.joint_attention_dim]).astype("float32")),
        pooled_projections=paddle.to_tensor(rng.standard_normal([2, config.pooled_projection_dim]).astype("float32")),
    )
    with paddle.no_grad():
        trained = student(**inputs).sample.numpy()
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    with paddle.no_grad():
        base = pipe.transformer(**inputs).sample.numpy()
    pipe.load_lora_weights(os.path.join(learned["out"], "paddle_lora_weights.safetensors"))
    scale = pcm_lora.inference_lora_scale(learned["args"].lora_rank)
    with paddle.no_grad():
        reloaded = pipe.transformer(**inputs, joint_attention_kwargs={"scale": scale}).sample.numpy()
    assert np.abs(reloaded - trained).max() <= 1e-5
    assert np.abs(trained - base).max() > 1e-4  # the LoRA did change the model


@pytest.mark.parametrize(
    "override,flag",
    [
        ({"--pretrained_teacher_model": "/nonexistent/sd3"}, "--pretrained_teacher_model"),
        ({"--pretrained_teacher_model": REPO}, "--pretrained_teacher_model"),  # exists, not an SD3 folder
        ({"--data_path": "/nonexistent/cc3m"}, "--data_path"),
        ({"--resolution": "72"}, "--resolution"),
        ({"--multiphase": "0"}, "--multiphase"),
        ({"--multiphase": "200"}, "--multiphase"),
        ({"--num_euler_timesteps": "30"}, "--num_euler_timesteps"),
        ({"--w_min": "5", "--w_max": "4"}, "--w_min"),
        ({"--learning_rate": "0"}, "--learning_rate"),
        ({"--adv_lr": "0"}, "--adv_lr"),
        ({"--train_batch_size": "0"}, "--train_batch_size"),
        ({"--checkpoints_total_limit": "0"}, "--checkpoints_total_limit"),
        ({"--mixed_precision": "fp16"}, "--mixed_precision fp16"),
        ({"--mixed_precision": "bf16"}, "--mixed_precision bf16"),
    ],
)
def test_bad_flags_fail_fast_with_one_line(override, flag, tiny_sd3, tiny_cc3m, tmp_path, capsys):
    if flag.startswith("--mixed_precision") and paddle.get_device().startswith("gpu"):
        pytest.skip("this machine has a GPU: fp16/bf16 are valid here")
    base = {"--pretrained_teacher_model": tiny_sd3, "--data_path": tiny_cc3m, "--output_dir": str(tmp_path / "o"),
            "--resolution": "64", "--max_train_steps": "1"}
    code = trainer.main(flags({**base, **override}))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and flag in err, err
    assert not (tmp_path / "o").exists()  # failed before anything was loaded or written


def test_data_path_with_nothing_usable(tiny_sd3, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code = trainer.main(["--pretrained_teacher_model", tiny_sd3, "--data_path", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert code == 2 and "--data_path" in err and len(err.strip().splitlines()) == 1


def test_reference_only_flags_are_accepted_with_a_warning(tiny_sd3, tiny_cc3m, tmp_path, capsys):
    args = trainer.parse_args(["--pretrained_teacher_model", tiny_sd3, "--data_path", tiny_cc3m, "--use_8bit_adam",
                               "--allow_tf32", "--push_to_hub", "--optimizer", "prodigy",
                               "--enable_xformers_memory_efficient_attention", "--local_rank", "0"])
    lines = []
    trainer.warn_ignored_flags(args, lines.append)
    joined = "\n".join(lines)
    for name in ("--use_8bit_adam", "--allow_tf32", "--push_to_hub", "--optimizer prodigy"):
        assert name in joined
    assert all(len(line.splitlines()) == 1 for line in lines)


def test_defaults_match_the_reference():
    args = trainer.parse_args(["--pretrained_teacher_model", "x/y", "--data_path", "d"])
    expected = dict(num_euler_timesteps=50, multiphase=8, adv_weight=0.1, adv_lr=1e-5, loss_type="l2", huber_c=0.001,
                    learning_rate=1e-4, lr_scheduler="constant", lr_warmup_steps=500, adam_beta1=0.9, adam_beta2=0.999,
                    adam_weight_decay=1e-4, adam_epsilon=1e-8, max_grad_norm=1.0, lora_rank=4, resolution=1024,
                    train_batch_size=4, num_train_epochs=1, checkpointing_steps=500, validation_steps=50,
                    num_validation_images=4, report_to="tensorboard", tracker_project_name="text2image-fine-tune",
                    output_dir="sd3-dreambooth", dataloader_num_workers=0, gradient_accumulation_steps=1,
                    w_min=3.0, w_max=3.0)
    assert {k: getattr(args, k) for k in expected} == expected


def test_help_shows_defaults_and_lists_the_ignored_reference_flags():
    text = trainer.build_parser().format_help()
    options, ignored = text.split("accepted for compatibility with the reference, ignored:")
    entries = {m.group(1): " ".join(m.group(2).split()) for m in re.finditer(r"^  (--\w+)(.*?)(?=^  -|\Z)", options + "\n  -",
                                                                           re.M | re.S)}
    for flag, default in [("--resolution", "1024"), ("--output_dir", "sd3-dreambooth"), ("--report_to", "tensorboard"),
                          ("--lora_rank", "4"), ("--multiphase", "8"), ("--num_euler_timesteps", "50")]:
        assert f"(default: {default})" in entries[flag], entries[flag]
    ignored_flags = set(re.findall(r"^  (--\w+)", ignored, re.M))
    assert {f"--{name}" for name in trainer.IGNORED_REFERENCE_FLAGS} <= ignored_flags and not ignored_flags & set(entries)
    every_flag = {s for action in trainer.build_parser()._actions for s in action.option_strings if s.startswith("--")}
    assert every_flag == set(entries) | ignored_flags | {"--help"}  # nothing hidden


def test_hub_id_without_network_or_cache_is_one_line_saying_where_it_looked(tmp_path):
    """No network: ppdiffusers' BOS endpoint is pointed at a closed local port (fails at once, cannot hang)."""
    hub_id = "stabilityai/stable-diffusion-3-medium-diffusers"
    env = {"PPNLP_HOME": str(tmp_path / "home"), "PPNLP_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}
    command = ["train_pcm_lora_sd3_adv.py", "--pretrained_teacher_model", hub_id, "--data_path", str(tmp_path / "none")]
    result = run_python(command, env=env, timeout=120)
    cache = tmp_path / "home" / "ppdiffusers" / hub_id
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-2000:]
    for part in (f"--pretrained_teacher_model {hub_id}", str(cache), "http://127.0.0.1:9/", "pass its folder"):
        assert part in result.stderr
    cache.mkdir(parents=True)
    (cache / "model_index.json").write_text("{}")  # in ppdiffusers' cache: the run goes on to the next check
    result = run_python(command, env=env, timeout=120)
    assert result.returncode == 2 and "--data_path" in result.stderr and hub_id not in result.stderr, result.stderr[-2000:]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_share_teacher_weights_equals_a_separate_fp32_teacher_in_fp32(tiny_sd3, tiny_cc3m, tmp_path, checkpointing):
    """In fp32 the student's frozen base (LoRA off) is the teacher, weight for weight: same run, bit for bit,
    including the discriminator path recomputed under gradient checkpointing with the adapters off."""
    results = []
    for share in (False, True):
        out = tmp_path / f"share-{share}"
        argv = ["--pretrained_teacher_model", tiny_sd3, "--data_path", tiny_cc3m, "--output_dir", str(out),
                "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "4", "--seed", "5",
                "--report_to", "none", "--num_validation_images", "0", "--learning_rate", "1e-3"]
        argv += ["--share_teacher_weights"] * share + ["--gradient_checkpointing"] * checkpointing
        assert trainer.main(argv) == 0
        results.append(load_file(str(out / "paddle_lora_weights.safetensors")))
    assert set(results[0]) == set(results[1])
    for key in results[0]:
        np.testing.assert_array_equal(results[0][key], results[1][key], err_msg=key)
    assert any(np.abs(v).max() > 0 for k, v in results[0].items() if "lora_B" in k)  # it did train


def test_a_dead_rank_ends_the_whole_job(tiny_sd3, tiny_cc3m, tmp_path):
    """SIGKILL one of 2 ranks mid-run: the other does not wait forever, the launcher exits non-zero."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    argv = [sys.executable, "-m", "paddle.distributed.launch", "--nproc_per_node", "2", "--log_dir", str(tmp_path / "logs"),
            "train_pcm_lora_sd3_adv.py", "--pretrained_teacher_model", tiny_sd3, "--data_path", tiny_cc3m,
            "--output_dir", str(tmp_path / "out"), "--resolution", "64", "--train_batch_size", "2",
            "--max_train_steps", "100000", "--checkpointing_steps", "100000", "--report_to", "none",
            "--num_validation_images", "0"]
    launcher = subprocess.Popen(argv, cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "out" / "logs" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert launcher.poll() is None and time.time() < deadline
        time.sleep(0.1)
    workers = [p for p in psutil.Process(launcher.pid).children(recursive=True)
               if "train_pcm_lora_sd3_adv.py" in " ".join(p.cmdline())]
    rank1 = [p for p in workers if p.environ().get("PADDLE_TRAINER_ID") == "1"]
    assert len(rank1) == 1
    rank1[0].send_signal(signal.SIGKILL)
    try:
        code = launcher.wait(timeout=180)
    finally:
        for p in psutil.Process(os.getpid()).children(recursive=True):
            if "train_pcm_lora_sd3_adv.py" in " ".join(p.cmdline()):
                p.kill()
    assert code != 0
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "constant_with_warmup", "polynomial", "cosine_with_restarts"])
def test_lr_schedule_is_attached_and_steps_on_g_steps(scheduler, tiny_sd3, tiny_cc3m, tmp_path):
    out = tmp_path / "run"
    argv = ["--pretrained_teacher_model", tiny_sd3, "--data_path", tiny_cc3m, "--output_dir", str(out),
            "--resolution", "64", "--train_batch_size", "1", "--gradient_accumulation_steps", "2",
            "--max_train_steps", "8", "--lr_scheduler", scheduler, "--lr_warmup_steps", "2",
            "--learning_rate", "1e-3", "--report_to", "none", "--num_validation_images", "0"]
    assert trainer.main(argv) == 0
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows]
    # The schedule advances once per G step (steps 2, 4, ...), so each D step shows the lr of the G step before.
    assert all(lrs[i] == lrs[i + 1] for i in range(1, len(lrs) - 1, 2)), lrs
    assert lrs[0] < 1e-3 and max(lrs) <= 1e-3 + 1e-12  # warm-up starts below the peak
    assert len(set(lrs)) > 2  # it really moves


def _poison(monkeypatch, bad_steps):
    """Make the real step's loss NaN on the given 0-based micro-step calls (the rest untouched)."""
    real_call = trainer.PCMStep.__call__
    calls = {"n": 0}

    def call(self, batch, is_d_step):
        out = real_call(self, batch, is_d_step)
        if calls["n"] in bad_steps:
            out = {**out, "loss": out["loss"] * float("nan")}
        calls["n"] += 1
        return out

    monkeypatch.setattr(trainer.PCMStep, "__call__", call)


def test_a_non_finite_loss_skips_that_update_only(tiny_sd3, tiny_cc3m, tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, bad_steps={1})  # the first G step
    out = tmp_path / "run"
    base = ["--pretrained_teacher_model", tiny_sd3, "--data_path", tiny_cc3m, "--resolution", "64", "--train_batch_size", "2",
            "--max_train_steps", "4", "--report_to", "none", "--num_validation_images", "0", "--seed", "3"]
    assert trainer.main(base + ["--output_dir", str(out)]) == 0
    assert "non-finite loss at step 1" in capsys.readouterr().out
    state = json.loads((out / "checkpoint-4" / checkpointing.STATE_FILE).read_text())
    assert state["nonfinite_steps"] == 1
    lora = {k: v for k, v in load_file(str(out / "paddle_lora_weights.safetensors")).items() if "lora_B" in k}
    assert all(np.isfinite(v).all() for v in lora.values()) and any(np.abs(v).max() > 0 for v in lora.values())


def test_many_non_finite_losses_in_a_row_save_and_stop(tiny_sd3, tiny_cc3m, tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, bad_steps=set(range(1000)))
    out = tmp_path / "run"
    code = trainer.main(["--pretrained_teacher_model", tiny_sd3, "--data_path", tiny_cc3m, "--output_dir", str(out),
                         "--resolution", "64", "--train_batch_size", "1", "--max_train_steps", "100",
                         "--report_to", "none", "--num_validation_images", "0"])
    err = capsys.readouterr().err
    assert code == 3 and f"{trainer.MAX_CONSECUTIVE_NONFINITE} non-finite losses in a row" in err
    saved = checkpointing.list_checkpoints(str(out))
    assert [s for s, _ in saved] == [trainer.MAX_CONSECUTIVE_NONFINITE]
    assert json.loads((out / f"checkpoint-{saved[0][0]}" / checkpointing.STATE_FILE).read_text())["nonfinite_steps"] == 20


def test_without_max_train_steps_one_epoch_is_run(tiny_sd3, tiny_cc3m, tmp_path, capsys):
    """As the reference: --num_train_epochs x ceil(samples / (batch x ranks x accumulation)) steps."""
    out = tmp_path / "run"
    assert trainer.main(["--pretrained_teacher_model", tiny_sd3, "--data_path", tiny_cc3m, "--output_dir", str(out),
                         "--resolution", "64", "--train_batch_size", "5", "--report_to", "none",
                         "--num_validation_images", "0"]) == 0
    assert "1 epoch(s) of 24 samples -> 5 steps" in capsys.readouterr().out  # 4 shards x 6 samples, ceil(24 / 5)
    assert len((out / "logs" / "metrics.jsonl").read_text().splitlines()) == 5
