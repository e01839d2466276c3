"""Untrusted weight files: a .pdparams is read by the allow-list loader (safe_pdparams) everywhere we read one."""
import os
import pickle

import numpy as np
import paddle
import pytest
from conftest import add_random_lora, run_python
from safetensors.numpy import load_file

import pcm_lora
from safe_pdparams import UnsafeFileError, load_pdparams


class _Exploit:
    """Pickles to ``os.system("touch <marker>")``: what a crafted .pdparams runs when it is unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant_malicious_pdparams(path, marker):
    """A file that looks like a LoRA state dict but runs a command when unpickled."""
    lora = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": np.zeros([32, 4], np.float32),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": _Exploit(marker)}
    with open(path, "wb") as f:
        pickle.dump(lora, f, protocol=4)
    return str(path)


@pytest.fixture(scope="module")
def saved_lora(tiny_sd3, tmp_path_factory):
    """A rank-8 LoRA saved as the trainer saves it: safetensors plus the paddle.save .pdparams copy."""
    from ppdiffusers import SD3Transformer2DModel

    transformer = add_random_lora(SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer"), 8, seed=4)
    folder = str(tmp_path_factory.mktemp("lora"))
    safetensors_path = pcm_lora.save_lora(transformer, folder)
    return safetensors_path, safetensors_path.replace(".safetensors", ".pdparams")


def test_the_planted_file_is_live(tmp_path):
    """The planted pickle really runs its command under a plain unpickler (so the tests below can fail)."""
    marker = tmp_path / "pwned"
    evil = plant_malicious_pdparams(tmp_path / "evil.pdparams", marker)
    with open(evil, "rb") as f:
        pickle.load(f)
    assert marker.exists()


def test_paddle_save_layouts_load_exactly(saved_lora, tmp_path):
    safetensors_path, pdparams_path = saved_lora
    want = load_file(safetensors_path)
    got = load_pdparams(pdparams_path)  # what pcm_lora.save_lora / paddle.save(state_dict) writes (protocol 4)
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    tensors = {k: paddle.to_tensor(v) for k, v in want.items()}
    paddle.save(tensors, str(tmp_path / "p2.pdparams"), protocol=2)  # protocol 2: bytes via _codecs.encode
    paddle.save({"nested": {"n": 1}, **tensors}, str(tmp_path / "tuples.pdparams"))  # (name, ndarray) tuples
    assert all(np.array_equal(load_pdparams(str(tmp_path / "p2.pdparams"))[k], want[k]) for k in want)
    with pytest.raises(UnsafeFileError, match="entry 'nested' is a dict, not a tensor"):
        load_pdparams(str(tmp_path / "tuples.pdparams"))


def test_pdparams_lora_reproduces_the_safetensors_one(tiny_sd3, saved_lora):
    """The seed snippet's pipe.load_lora_weights(.pdparams) goes through the safe loader and gives the same model."""
    from ppdiffusers import StableDiffusion3Pipeline

    rng = np.random.default_rng(1)
    inputs = dict(hidden_states=paddle.to_tensor(rng.standard_normal([1, 16, 8, 8]).astype("float32")),
                  timestep=paddle.to_tensor([500.0]),
                  encoder_hidden_states=paddle.to_tensor(rng.standard_normal([1, 12, 64]).astype("float32")),
                  pooled_projections=paddle.to_tensor(rng.standard_normal([1, 64]).astype("float32")))
    outputs = []
    for path in saved_lora:
        pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
        pipe.load_lora_weights(path)
        with paddle.no_grad():
            outputs.append(pipe.transformer(**inputs, joint_attention_kwargs={"scale": 1.0}).sample.numpy())
    assert np.array_equal(outputs[0], outputs[1])


def test_load_lora_weights_refuses_a_malicious_pdparams(tiny_sd3, tmp_path):
    from ppdiffusers import StableDiffusion3Pipeline

    marker = tmp_path / "pwned"
    evil = plant_malicious_pdparams(tmp_path / "paddle_lora_weights.pdparams", marker)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    for path in (evil, str(tmp_path)):  # the file, and a folder holding it
        with pytest.raises(UnsafeFileError, match=r"references posix\.system") as error:
            pipe.load_lora_weights(path)
        assert "\n" not in str(error.value) and evil in str(error.value)
    assert not marker.exists()


def test_infer_refuses_a_malicious_pdparams_before_loading_the_pipeline(tiny_sd3, tmp_path):
    import infer

    marker = tmp_path / "pwned"
    evil = plant_malicious_pdparams(tmp_path / "lora.pdparams", marker)
    with pytest.raises(UnsafeFileError, match=r"references posix\.system") as error:  # main exits with "error: " + it
        infer.main(["--pretrained_teacher_model", str(tmp_path / "no-model-here"), "--lora", evil,
                    "--output", str(tmp_path / "x.png")])
    assert "\n" not in str(error.value) and not marker.exists()


def test_convert_lora_refuses_a_malicious_pdparams_in_one_line(tmp_path):
    marker = tmp_path / "pwned"
    evil = plant_malicious_pdparams(tmp_path / "lora.pdparams", marker)
    result = run_python(["scripts/convert_lora.py", "--to", "diffusers", evil, str(tmp_path / "out.safetensors")])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: {evil}: refused to load: the pickle references posix.system; only a "
                                     "Paddle state dict of tensors is read from a pickle-based file (code in a pickle "
                                     "would run), convert other files to .safetensors")
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_convert_lora_reads_a_real_pdparams(saved_lora, tmp_path):
    safetensors_path, pdparams_path = saved_lora
    outputs = []
    for source in saved_lora:
        out = str(tmp_path / (os.path.basename(source) + ".pt.safetensors"))
        result = run_python(["scripts/convert_lora.py", "--to", "diffusers", "--lora_scale", "1.0", source, out])
        assert result.returncode == 0, result.stderr[-2000:]
        outputs.append(load_file(out))
    assert set(outputs[0]) == set(outputs[1]) and all(np.array_equal(outputs[0][k], outputs[1][k]) for k in outputs[0])
