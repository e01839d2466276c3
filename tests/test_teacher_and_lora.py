"""The tiny teacher and the seed inference snippet (PCM_SPEC §6) on real ppdiffusers components."""
import json
import os
import textwrap

import numpy as np
import paddle
import pytest
from conftest import REPO, add_random_lora, run_python

import pcm_lora
from make_tiny_sd3 import make_tiny_sd3

SEED_SNIPPET = '''
import os
os.environ["USE_PEFT_BACKEND"] = "True"
import paddle
import numpy as np
from PIL import Image
from pcm_fm_deterministic_scheduler import PCMFMDeterministicScheduler
from ppdiffusers import StableDiffusion3Pipeline

path_to_lora = "{lora}"
step = 4
shift = 3
num_pcm_timesteps = 50

pipe = StableDiffusion3Pipeline.from_pretrained(
    "{model}",
    scheduler=PCMFMDeterministicScheduler(1000, shift, num_pcm_timesteps),
    map_location="cpu",
    paddle_dtype=paddle.float32
)
pipe.load_lora_weights(path_to_lora)
prompt = "portrait photo of a girl, photograph, highly detailed face, depth of field, moody light, golden hour, style by Dan Winters, Russell James, Steve McCurry, centered, extremely detailed, Nikon D850, award winning photography"

with paddle.no_grad():
    result_image = pipe(
        prompt=prompt,
        negative_prompt="",
        num_inference_steps=step,
        guidance_scale=1.2,
        generator=paddle.Generator().manual_seed(42),
        joint_attention_kwargs={{"scale": 0.25}}  # for lora scaling
    ).images[0]
result_image.save(prompt[:5] + prompt[-5:] + ".png")
'''


def _fixed_inputs(transformer):
    config = transformer.config
    gen = np.random.default_rng(0)
    return dict(
        hidden_states=paddle.to_tensor(gen.standard_normal([2, 16, 16, 16]).astype("float32")),
        timestep=paddle.to_tensor([900.0, 250.0]),
        encoder_hidden_states=paddle.to_tensor(gen.standard_normal([2, 154, config.joint_attention_dim]).astype("float32")),
        pooled_projections=paddle.to_tensor(gen.standard_normal([2, config.pooled_projection_dim]).astype("float32")),
    )


@pytest.fixture(scope="module")
def trained_lora(tiny_sd3, tmp_path_factory):
    """A rank-32 LoRA (PEFT default alpha 8) with non-zero lora_B, saved by ppdiffusers; plus reference outputs."""
    from ppdiffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")
    inputs = _fixed_inputs(transformer)
    with paddle.no_grad():
        base_out = transformer(**inputs).sample.numpy()
    add_random_lora(transformer, rank=32, seed=7)
    with paddle.no_grad():
        lora_out = transformer(**inputs).sample.numpy()
    out_dir = str(tmp_path_factory.mktemp("lora"))
    pcm_lora.save_lora(transformer, out_dir)
    return dict(dir=out_dir, inputs=inputs, base_out=base_out, lora_out=lora_out)


def test_tiny_teacher_layout_and_structure(tiny_sd3):
    expected = {"model_index.json", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3",
                "tokenizer", "tokenizer_2", "tokenizer_3", "scheduler"}
    assert expected <= set(os.listdir(tiny_sd3))
    with open(os.path.join(tiny_sd3, "scheduler", "scheduler_config.json")) as f:
        assert json.load(f)["shift"] == 3.0
    with open(os.path.join(tiny_sd3, "transformer", "config.json")) as f:
        tcfg = json.load(f)
    assert (tcfg["in_channels"], tcfg["patch_size"], tcfg["out_channels"]) == (16, 2, 16)
    with open(os.path.join(tiny_sd3, "vae", "config.json")) as f:
        vcfg = json.load(f)
    assert vcfg["latent_channels"] == 16 and 2 ** (len(vcfg["block_out_channels"]) - 1) == 8
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(tiny_sd3) for f in fs)
    assert size < 10 * 2**20


def test_tiny_teacher_is_deterministic_for_a_seed(tmp_path):
    a = make_tiny_sd3(str(tmp_path / "a"), seed=3, num_layers=1)
    b = make_tiny_sd3(str(tmp_path / "b"), seed=3, num_layers=1)
    c = make_tiny_sd3(str(tmp_path / "c"), seed=4, num_layers=1)
    for root, _, files in os.walk(a):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), a)
            with open(os.path.join(a, rel), "rb") as fa, open(os.path.join(b, rel), "rb") as fb:
                assert fa.read() == fb.read(), rel
    weights = os.path.join("transformer", "diffusion_paddle_model.safetensors")
    with open(os.path.join(a, weights), "rb") as fa, open(os.path.join(c, weights), "rb") as fc:
        assert fa.read() != fc.read()


def test_size_options_and_width_check(tmp_path):
    from ppdiffusers import SD3Transformer2DModel

    out = make_tiny_sd3(str(tmp_path / "deep"), num_layers=3, num_attention_heads=8, attention_head_dim=8)
    transformer = SD3Transformer2DModel.from_pretrained(out, subfolder="transformer")
    assert len(transformer.transformer_blocks) == 3 and transformer.inner_dim == 64
    with pytest.raises(ValueError, match="multiple of 32"):
        make_tiny_sd3(str(tmp_path / "bad"), num_attention_heads=3, attention_head_dim=8)


def test_tiny_teacher_reloads_and_generates_with_pcm_scheduler(tiny_sd3):
    from ppdiffusers import StableDiffusion3Pipeline

    from pcm_fm_deterministic_scheduler import PCMFMDeterministicScheduler

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, scheduler=PCMFMDeterministicScheduler(1000, 3.0, 50))
    images = [
        pipe(prompt="a photo of a red dog", num_inference_steps=4, height=64, width=64, guidance_scale=1.0,
             generator=paddle.Generator().manual_seed(s), output_type="np").images[0]
        for s in (0, 0, 1)
    ]
    assert images[0].shape == (64, 64, 3) and np.isfinite(images[0]).all()
    np.testing.assert_array_equal(images[0], images[1])
    assert not np.array_equal(images[0], images[2])


def test_reference_lora_target_set(tiny_sd3):
    """22 reference patterns wrap 26 modules of the 2-block tiny SD3; no context q/k/v projections."""
    from ppdiffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer")
    pcm_lora.add_pcm_lora(transformer, rank=4)
    names = pcm_lora.lora_module_names(transformer)
    per_block = ["attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v", "ff.net.0.proj", "ff.net.2",
                 "norm1.linear", "norm1_context.linear"]
    # Block 0 also has the context output path; the last block is context_pre_only (no ff_context, no to_add_out).
    block0_extra = ["attn.to_add_out", "ff_context.net.0.proj", "ff_context.net.2"]
    expected = sorted(
        ["context_embedder", "pos_embed.proj", "proj_out", "time_text_embed.text_embedder.linear_1",
         "time_text_embed.text_embedder.linear_2", "time_text_embed.timestep_embedder.linear_1",
         "time_text_embed.timestep_embedder.linear_2"]
        + [f"transformer_blocks.0.{n}" for n in per_block + block0_extra]
        + [f"transformer_blocks.1.{n}" for n in per_block]
    )
    assert names == expected and len(names) == 26
    assert not any("add_q_proj" in n or "add_k_proj" in n or "add_v_proj" in n for n in names)


def test_seed_snippet_loads_lora_and_writes_png(trained_lora, tiny_sd3, tmp_path):
    for lora_file in ("paddle_lora_weights.pdparams", "paddle_lora_weights.safetensors"):
        script = tmp_path / "snippet.py"
        script.write_text(SEED_SNIPPET.format(model=tiny_sd3, lora=os.path.join(trained_lora["dir"], lora_file)))
        result = run_python([str(script)], cwd=str(tmp_path))
        assert result.returncode == 0, result.stderr[-3000:]
        from PIL import Image

        png = tmp_path / "portrraphy.png"  # prompt[:5] + prompt[-5:]
        with Image.open(png) as image:
            assert image.size == (256, 256)
        png.unlink()


def test_reloaded_lora_reproduces_the_saved_transformer(trained_lora, tiny_sd3):
    from ppdiffusers import StableDiffusion3Pipeline

    from pcm_fm_deterministic_scheduler import PCMFMDeterministicScheduler

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, scheduler=PCMFMDeterministicScheduler(1000, 3, 50))
    pipe.load_lora_weights(os.path.join(trained_lora["dir"], "paddle_lora_weights.pdparams"))
    scale = pcm_lora.inference_lora_scale(rank=32)
    assert scale == 0.25
    with paddle.no_grad():
        out = pipe.transformer(**trained_lora["inputs"], joint_attention_kwargs={"scale": scale}).sample.numpy()
    assert np.abs(out - trained_lora["lora_out"]).max() <= 1e-5
    assert np.abs(out - trained_lora["base_out"]).max() > 1e-3


def test_seed_snippet_text_is_verbatim():
    """The snippet above differs from the seed README only in the model path, the LoRA path and float32."""
    seed_dir = os.path.join(REPO, os.pardir, "shared", "seed")
    if not os.path.isdir(seed_dir):
        pytest.skip("../shared/seed is not beside this checkout")
    seed_text = "".join(open(os.path.join(seed_dir, f), encoding="utf-8").read() for f in sorted(os.listdir(seed_dir)))
    ours = (SEED_SNIPPET.replace("{{", "{").replace("}}", "}")
            .replace('"{model}"', '"stabilityai/stable-diffusion-3-medium-diffusers"')
            .replace('"{lora}"', '"./pcm_deterministic_4step_shift3.pdparams"')
            .replace("paddle.float32", "paddle.float16"))
    assert textwrap.dedent(ours).strip() in seed_text
