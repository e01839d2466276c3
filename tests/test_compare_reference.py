"""The torch-free parts of scripts/compare_reference_trainer.py: the Paddle -> torch weight layout and the
changes it makes to its copy of the reference (the timing itself needs torch and the reference; not tested)."""
import os

import numpy as np
import pytest

from compare_reference_speed import to_torch_layout
from compare_reference_trainer import REFERENCE_FILES, copy_reference


def test_linear_weights_are_transposed_and_everything_else_kept():
    rng = np.random.default_rng(0)
    paddle_state = {
        "proj.weight": rng.standard_normal((3, 5)).astype("float32"),  # Paddle Linear: [in, out]
        "proj.bias": rng.standard_normal(5).astype("float32"),
        "token_embedding.weight": rng.standard_normal((7, 3)).astype("float32"),  # [vocab, width] in both
        "conv.weight": rng.standard_normal((4, 2, 3, 3)).astype("float32"),
    }
    converted = to_torch_layout(paddle_state, list(paddle_state), {"proj.weight"})
    x = rng.standard_normal((2, 3)).astype("float32")
    np.testing.assert_array_equal(converted["proj.weight"].shape, (5, 3))
    np.testing.assert_allclose(x @ converted["proj.weight"].T, x @ paddle_state["proj.weight"], rtol=1e-6)
    assert converted["proj.weight"].flags["C_CONTIGUOUS"]
    for key in ("proj.bias", "token_embedding.weight", "conv.weight"):
        np.testing.assert_array_equal(converted[key], paddle_state[key])


def test_only_a_zero_norm_bias_may_be_left_out():
    state = {"proj.weight": np.ones((2, 2), "float32"), "norm_out.norm.bias": np.zeros(2, "float32")}
    assert set(to_torch_layout(state, ["proj.weight"], {"proj.weight"})) == {"proj.weight"}
    with pytest.raises(ValueError, match="norm_out.norm.bias"):
        to_torch_layout({**state, "norm_out.norm.bias": np.ones(2, "float32")}, ["proj.weight"], {"proj.weight"})
    with pytest.raises(ValueError, match="extra.weight"):
        to_torch_layout({**state, "extra.weight": np.zeros(2, "float32")}, ["proj.weight"], {"proj.weight"})


def _fake_reference(folder, train_text):
    code = os.path.join(folder, "code", "text_to_image_sd3")
    os.makedirs(code)
    texts = {
        "train_pcm_lora_sd3_adv.py": train_text,
        "discriminator_sd3.py": "x = x.view(b, c, 64, 64)\n        adapter_channel_dims=[1536] * 24,\n",
        "pcm_fm_deterministic_scheduler.py": "# unchanged\n",
    }
    for name, text in texts.items():
        with open(os.path.join(code, name), "w", encoding="utf-8") as f:
            f.write(text)
    return folder


TRAIN = ('check_min_version("0.30.0.dev0")\nbetas=(0, 0.999),\n'
         'train_dataset = CustomImageDataset("/mnt/wangfuyun/cc3m", args.resolution)\n')
CONFIG = {"num_attention_heads": 8, "attention_head_dim": 32, "num_layers": 6, "patch_size": 2}


def test_reference_copy_changes_exactly_the_listed_lines(tmp_path):
    reference = _fake_reference(str(tmp_path / "ref"), TRAIN)
    target = tmp_path / "copy"
    target.mkdir()
    diff = copy_reference(reference, str(target), "/data/images", CONFIG, 256)
    train = (target / REFERENCE_FILES[0]).read_text()
    assert "CustomImageDataset('/data/images', args.resolution)" in train and "betas=(0.0, 0.999)" in train
    assert 'pass  # check_min_version("0.30.0.dev0")' in train
    assert (target / REFERENCE_FILES[1]).read_text() == "x = x.view(b, c, 16, 16)\n        adapter_channel_dims=[256] * 6,\n"
    assert (target / REFERENCE_FILES[2]).read_text() == "# unchanged\n"
    assert sum(line.startswith("-") and not line.startswith("---") for line in diff.splitlines()) == 5


def test_reference_copy_stops_when_a_line_to_change_is_missing(tmp_path):
    reference = _fake_reference(str(tmp_path / "ref"), TRAIN.replace("betas=(0, 0.999)", "betas=(0.0, 0.999)"))
    target = tmp_path / "copy"
    target.mkdir()
    with pytest.raises(SystemExit, match="betas"):
        copy_reference(reference, str(target), "/data/images", CONFIG, 256)
