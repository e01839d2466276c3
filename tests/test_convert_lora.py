"""scripts/convert_lora.py: our Paddle LoRA <-> diffusers (PyTorch) SD3 LoRA, numpy only."""
import json

import numpy as np
import paddle
import pytest
from conftest import add_random_lora, run_python
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import pcm_lora


@pytest.fixture(scope="module")
def our_lora(tiny_sd3, tmp_path_factory):
    """A rank-32 LoRA (alpha 8 -> scale 0.25) with non-zero lora_B, saved as the trainer does."""
    from ppdiffusers import SD3Transformer2DModel

    transformer = add_random_lora(SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer"), 32, seed=11)
    folder = tmp_path_factory.mktemp("ours")
    path = pcm_lora.save_lora(transformer, str(folder), pdparams_copy=False)
    (folder / "training_args.json").write_text(json.dumps({"lora_rank": 32}))
    return path


def convert(*args):
    result = run_python(["scripts/convert_lora.py", *args])
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_to_diffusers_layout_keys_and_folded_scale(our_lora, tmp_path):
    out = tmp_path / "pytorch_lora_weights.safetensors"
    report = convert("--to", "diffusers", our_lora, str(out))
    assert report["folded_scale"] == 0.25  # alpha 8 / rank 32, read from training_args.json
    ours, theirs = load_file(our_lora), load_file(str(out))
    assert set(ours) == set(theirs) and all(k.startswith("transformer.") for k in theirs)
    with safe_open(str(out), framework="np") as f:
        assert f.metadata()["format"] == "pt"
    linear = "transformer.transformer_blocks.0.attn.to_q"
    a_pd, b_pd = ours[f"{linear}.lora_A.weight"], ours[f"{linear}.lora_B.weight"]  # Paddle: [in, r], [r, out]
    a_pt, b_pt = theirs[f"{linear}.lora_A.weight"], theirs[f"{linear}.lora_B.weight"]  # PyTorch: [r, in], [out, r]
    assert a_pt.shape == a_pd.shape[::-1] and b_pt.shape == b_pd.shape[::-1]
    # The same LoRA delta in both conventions: Paddle x @ A @ B * 0.25 (seed snippet scale), PyTorch (x A^T) B^T at scale 1.
    x = np.random.default_rng(0).standard_normal([3, a_pd.shape[0]]).astype("float32")
    np.testing.assert_allclose(x @ a_pt.T @ b_pt.T, x @ a_pd @ b_pd * 0.25, rtol=1e-5, atol=1e-6)
    conv = "transformer.pos_embed.proj"  # Conv2d weights keep [out, in, kh, kw] in both
    assert theirs[f"{conv}.lora_A.weight"].shape == ours[f"{conv}.lora_A.weight"].shape


def test_round_trip_is_bit_exact(our_lora, tmp_path):
    convert("--to", "diffusers", our_lora, str(tmp_path / "pt.safetensors"))
    convert("--to", "paddle", str(tmp_path / "pt.safetensors"), str(tmp_path / "back.safetensors"))
    ours, back = load_file(our_lora), load_file(str(tmp_path / "back.safetensors"))
    assert set(ours) == set(back)
    assert all(np.array_equal(ours[k], back[k]) and ours[k].dtype == back[k].dtype for k in ours)


def _transformer_output(tiny_sd3, lora_file, scale):
    from ppdiffusers import StableDiffusion3Pipeline

    rng = np.random.default_rng(5)
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    pipe.load_lora_weights(lora_file)
    inputs = dict(hidden_states=paddle.to_tensor(rng.standard_normal([1, 16, 8, 8]).astype("float32")),
                  timestep=paddle.to_tensor([640.0]),
                  encoder_hidden_states=paddle.to_tensor(rng.standard_normal([1, 20, 64]).astype("float32")),
                  pooled_projections=paddle.to_tensor(rng.standard_normal([1, 64]).astype("float32")))
    with paddle.no_grad():
        return pipe.transformer(**inputs, joint_attention_kwargs={"scale": scale}).sample.numpy()


def _official_pytorch_form(ours: dict) -> dict:
    """What the PyTorch reference saves for the same LoRA: PyTorch layout, no scale folded in."""
    return {k: (v.T.copy() if v.ndim == 2 else v) for k, v in ours.items()}


def test_official_and_halved_pytorch_loras_load_in_the_seed_snippet(our_lora, tiny_sd3, tmp_path):
    ours = load_file(our_lora)
    save_file(_official_pytorch_form(ours), str(tmp_path / "official.safetensors"), metadata={"format": "pt"})
    halved = {k: (v / 2).astype(np.float16) for k, v in _official_pytorch_form(ours).items()}  # reference convert.py
    save_file(halved, str(tmp_path / "half_official.safetensors"), metadata={"format": "pt"})
    convert("--to", "paddle", str(tmp_path / "official.safetensors"), str(tmp_path / "official_pd.safetensors"))
    convert("--to", "paddle", "--halved", str(tmp_path / "half_official.safetensors"), str(tmp_path / "half_pd.safetensors"))
    want = _transformer_output(tiny_sd3, our_lora, 0.25)
    assert np.abs(_transformer_output(tiny_sd3, str(tmp_path / "official_pd.safetensors"), 0.25) - want).max() <= 1e-5
    # fp16 rounding of the halved file only
    assert np.abs(_transformer_output(tiny_sd3, str(tmp_path / "half_pd.safetensors"), 0.25) - want).max() <= 1e-3


def test_rejects_files_that_are_not_loras(tmp_path):
    save_file({"weight": np.zeros([2, 2], np.float32)}, str(tmp_path / "model.safetensors"))
    result = run_python(["scripts/convert_lora.py", "--to", "diffusers", str(tmp_path / "model.safetensors"), str(tmp_path / "o.safetensors")])
    assert result.returncode != 0 and "not a LoRA file" in result.stderr
