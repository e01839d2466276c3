"""The README's first command, as written: scripts/quickstart.sh end to end (2 CPU ranks, then an image)."""
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
    assert (out / "lora_tiny_PCM_sd3" / "paddle_lora_weights.safetensors").is_file()
    assert (out / "lora_tiny_PCM_sd3" / "checkpoint-20").is_dir()
    assert (out / "lora_tiny_PCM_sd3" / "validation" / "step-20.png").is_file()
    with Image.open(out / "pcm_4step.png") as image:
        assert image.size == (256, 256)
    assert f"image: {out}/pcm_4step.png" in result.stdout
