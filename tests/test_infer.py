"""scripts/infer.py end to end on the tiny teacher (once as a script, the other runs in-process to keep the suite short)."""
import json

import pytest
from conftest import add_random_lora, run_python
from PIL import Image

import infer


def test_infer_with_and_without_lora(tiny_sd3, tmp_path, capsys):
    import pcm_lora
    from ppdiffusers import SD3Transformer2DModel

    transformer = add_random_lora(SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer"), 16, seed=2)
    pcm_lora.save_lora(transformer, str(tmp_path))  # copied out of its run folder: no training_args.json beside it
    common = ["scripts/infer.py", "--pretrained_teacher_model", tiny_sd3, "--height", "64", "--width", "64",
              "--prompt", "a red dog", "--prompt", "a blue car"]
    runs = {}
    result = run_python([*common, "--lora", str(tmp_path / "paddle_lora_weights.safetensors"), "--output",
                         str(tmp_path / "lora.png")])
    assert result.returncode == 0, result.stderr[-2000:]
    runs["lora"] = json.loads(result.stdout.strip().splitlines()[-1])
    for name, extra in {"teacher": [], "stochastic": ["--lora", str(tmp_path), "--scheduler", "stochastic"]}.items():
        capsys.readouterr()
        infer.main([*common[1:], *extra, "--output", str(tmp_path / f"{name}.png")])
        runs[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert runs["lora"]["lora_scale"] == runs["stochastic"]["lora_scale"] == 0.5  # alpha 8 / rank 16 of the weights
    assert runs["teacher"]["lora_scale"] is None and runs["lora"]["shift"] == 3.0
    images = {n: [Image.open(p) for p in r["images"]] for n, r in runs.items()}
    assert all(len(v) == 2 and v[0].size == (64, 64) for v in images.values())
    assert images["lora"][0].tobytes() != images["teacher"][0].tobytes()


def test_missing_lora_is_one_line_before_loading_the_model(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        infer.main(["--pretrained_teacher_model", str(tmp_path / "no-model"), "--lora", str(tmp_path / "lora.safetensors")])
    message = str(exit_info.value.code)
    assert "--lora" in message and "does not exist" in message and "\n" not in message
