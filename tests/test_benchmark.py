"""scripts/benchmark.py runs the real trainer and prints its JSON line (no timing assertions)."""
import json

import pytest
from conftest import run_python


def test_benchmark_prints_phase_table_and_json(tiny_sd3):
    result = run_python(["scripts/benchmark.py", "--pretrained_teacher_model", tiny_sd3, "--resolution", "64",
                         "--warmup_steps", "2", "--steps", "4", "--lora_rank", "4"])
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert {"step_time_s", "samples_per_s", "peak_memory_mb", "d_step_time_s", "g_step_time_s", "phases_s", "config"} <= set(report)
    assert report["step_time_s"] > 0 and report["peak_memory_mb"] > 0
    assert set(report["phases_s"]) == {"data", "text_encoding", "vae", "student_forward", "teacher_forward",
                                       "target_forward", "discriminator", "backward", "optimizer"}
    assert report["config"]["resolution"] == 64 and report["config"]["steps"] == 4
    assert any(line.startswith("student_forward") for line in lines)


def test_help_lists_the_trainer_flags_it_passes_through(capsys):
    import benchmark  # scripts/ (conftest puts it on the path)

    with pytest.raises(SystemExit):
        benchmark.main(["--help"])
    epilog = " ".join(capsys.readouterr().out.split("passed through")[1].split())
    for flag in ("--gradient_checkpointing", "--share_teacher_weights", "--multiphase", "--num_euler_timesteps"):
        assert f" {flag} " in f" {epilog} "
    assert "--output_dir" not in epilog and " --resolution " not in f" {epilog} "  # set by the benchmark itself
