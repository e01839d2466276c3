"""The README's first command, as written: scripts/quickstart.sh end to end (2 CPU ranks on the toy teacher, then the
teacher's and the distilled 4-step samples side by side)."""
import json
import os
import subprocess
import sys

from conftest import REPO
from PIL import Image


def test_quickstart_script(tmp_path):
    env = {**os.environ, "VENV": sys.prefix}  # the venv running the tests (CI: the repo's .venv)
    result = subprocess.run(["bash", "scripts/quickstart.sh", str(tmp_path / "qs")], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    out = tmp_path / "qs"
    run = out / "lora_toy_PCM_sd3"
    assert (run / "paddle_lora_weights.safetensors").is_file()
    assert (run / "checkpoint-30").is_dir() and (run / "checkpoint-60").is_dir()
    assert (run / "validation" / "step-60.png").is_file()
    with Image.open(out / "pcm_4step.png") as image:
        assert image.size == (32, 32)
    with Image.open(out / "teacher_vs_pcm_4step.png") as grid:  # 3 columns (teacher 50 | teacher 4 | PCM 4), 6 rows
        assert grid.size == (200 + 3 * 128, 16 + 6 * 128)
    evaluation = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert set(evaluation["teacher"]) == set(evaluation["student"]) == {"4"}
    assert f"image: {out}/teacher_vs_pcm_4step.png" in result.stdout
