"""scripts/convert_lora.py: our Paddle LoRA <-> diffusers (PyTorch) SD3 LoRA, numpy only."""
import json
import shutil

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


@pytest.fixture(scope="module")
def rank16_lora(tiny_sd3, tmp_path_factory):
    """A rank-16 LoRA copied out of its run folder: no training_args.json beside it."""
    from ppdiffusers import SD3Transformer2DModel

    transformer = add_random_lora(SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer"), 16, seed=12)
    return pcm_lora.save_lora(transformer, str(tmp_path_factory.mktemp("copied")), pdparams_copy=False)


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


def _pytorch_form(ours: dict) -> dict:
    """The same LoRA as the PyTorch reference's trainer saves it: PyTorch layout, no scale folded in."""
    return {k: (v.T.copy() if v.ndim == 2 else v) for k, v in ours.items()}


def test_reference_and_published_pytorch_loras_get_the_scale_that_reproduces_them(our_lora, tiny_sd3, tmp_path):
    """The reference trainer's own output needs alpha/rank = 0.25 (diffusers assumes alpha = rank); the published
    files are its convert.py output (halved, fp16) and are used at diffusers' default 1.0 (its sd3_test.py)."""
    ours = load_file(our_lora)
    save_file(_pytorch_form(ours), str(tmp_path / "raw.safetensors"), metadata={"format": "pt"})
    published = {k: (v / 2).astype(np.float16) for k, v in _pytorch_form(ours).items()}  # reference convert.py
    save_file(published, str(tmp_path / "published.safetensors"), metadata={"format": "pt"})
    cases = {"raw": ("raw", ["--lora_scale", "0.25"], 0.25), "published": ("published", [], 1.0),
             "published_halved": ("published", ["--halved"], 0.25)}
    want = _transformer_output(tiny_sd3, our_lora, 0.25)
    for name, (source, flags, scale) in cases.items():
        out = str(tmp_path / f"{name}_pd.safetensors")
        report = convert("--to", "paddle", *flags, str(tmp_path / f"{source}.safetensors"), out)
        assert report["lora_scale"] == scale and report["rank"] == [32], name
        with safe_open(out, framework="np") as f:
            assert float(f.metadata()["pcm_lora_scale"]) == scale  # what infer.py uses
        tol = 1e-5 if name == "raw" else 1e-3  # fp16 rounding of the published form
        assert np.abs(_transformer_output(tiny_sd3, out, scale) - want).max() <= tol, name


def test_rank_comes_from_the_weights_outside_the_run_folder(rank16_lora, tmp_path):
    report = convert("--to", "diffusers", rank16_lora, str(tmp_path / "pt.safetensors"))
    assert report["folded_scale"] == 0.5 and report["rank"] == [16]  # alpha 8 / rank 16 (no training_args.json)


def test_metadata_that_contradicts_the_weights_is_one_line(rank16_lora, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(rank16_lora, folder / "paddle_lora_weights.safetensors")
    (folder / "training_args.json").write_text(json.dumps({"lora_rank": 32}))
    result = run_python(["scripts/convert_lora.py", "--to", "diffusers", str(folder), str(tmp_path / "o.safetensors")])
    assert result.returncode != 0 and "--lora_rank 32" in result.stderr and "rank-16" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_diffusers_alpha_metadata_is_honoured(rank16_lora, tiny_sd3, tmp_path):
    """diffusers >= 0.33 stores the PEFT config (lora_alpha 8, r 16): its default scale is 8/16; --to paddle keeps
    the weights and records that scale, i.e. it gives back what our trainer wrote at rank 16."""
    ours = load_file(rank16_lora)
    adapter = {"transformer.r": 16, "transformer.lora_alpha": 8, "transformer.rank_pattern": {}, "transformer.alpha_pattern": {}}
    save_file(_pytorch_form(ours), str(tmp_path / "diffusers.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(adapter)})
    out = str(tmp_path / "pd.safetensors")
    report = convert("--to", "paddle", str(tmp_path / "diffusers.safetensors"), out)
    assert report["lora_scale"] == 0.5 and "lora_alpha 8" in report["scale_from"]
    back = load_file(out)
    assert set(back) == set(ours) and all(np.array_equal(back[k], ours[k]) for k in ours)
    adapter["transformer.r"] = 32
    save_file(_pytorch_form(ours), str(tmp_path / "wrong.safetensors"),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(adapter)})
    result = run_python(["scripts/convert_lora.py", "--to", "paddle", str(tmp_path / "wrong.safetensors"), out])
    assert result.returncode != 0 and "r=32" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_missing_and_unreadable_inputs_are_one_line(tmp_path):
    (tmp_path / "lora.pdparams").write_bytes(b"not a safetensors file")
    for name in ("nothing.safetensors", "lora.pdparams"):
        result = run_python(["scripts/convert_lora.py", "--to", "diffusers", str(tmp_path / name), str(tmp_path / "o.safetensors")])
        assert result.returncode != 0 and str(tmp_path / name) in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_rejects_files_that_are_not_loras(tmp_path):
    save_file({"weight": np.zeros([2, 2], np.float32)}, str(tmp_path / "model.safetensors"))
    result = run_python(["scripts/convert_lora.py", "--to", "diffusers", str(tmp_path / "model.safetensors"), str(tmp_path / "o.safetensors")])
    assert result.returncode != 0 and "not a LoRA file" in result.stderr


def test_infer_refuses_a_diffusers_file_in_one_line(our_lora, tmp_path):
    """ppdiffusers 0.29 cannot load diffusers-format SD3 LoRAs (a matmul shape error), so infer.py's scale
    lookup stops first and says how to convert."""
    from convert_lora import lora_file_scale

    out = str(tmp_path / "pt.safetensors")
    convert("--to", "diffusers", our_lora, out)
    with pytest.raises(SystemExit) as stop:
        lora_file_scale(out)
    assert "--to paddle" in str(stop.value) and len(str(stop.value).splitlines()) == 1
