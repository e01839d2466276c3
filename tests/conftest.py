"""Shared fixtures: tiny models and data are built with the project's own scripts, once per session."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

import paddle_compat  # noqa: E402,F401  (before anything imports ppdiffusers)


def run_python(args, cwd=None, env=None, timeout=600):
    """Run ``python args...`` with the repo on PYTHONPATH; returns the CompletedProcess (text)."""
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = REPO + os.pathsep + full_env.get("PYTHONPATH", "")
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, *args], cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    """The embedded default teacher, written by scripts/make_tiny_sd3.py (2 blocks, width 32)."""
    from make_tiny_sd3 import make_tiny_sd3

    return make_tiny_sd3(str(tmp_path_factory.mktemp("tiny-sd3")), seed=0)


def add_random_lora(transformer, rank: int, seed: int, std: float = 0.05):
    """Give ``transformer`` the project's LoRA at ``rank`` with a non-zero, seeded ``lora_B`` (a stand-in for a
    trained adapter; PEFT initialises lora_B to zero). Returns the transformer."""
    import paddle

    import pcm_lora

    pcm_lora.add_pcm_lora(transformer, rank=rank)
    paddle.seed(seed)
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            param.set_value(paddle.randn(param.shape) * std)
    return transformer


def load_frozen_transformer(path):
    """The tiny teacher's transformer as the trainer prepares a teacher: fp32, every parameter frozen, eval mode."""
    from ppdiffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer")
    for param in transformer.parameters():
        param.stop_gradient = True
    transformer.eval()
    return transformer
