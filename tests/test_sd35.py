"""SD3.5 teachers (sd35_transformer.py): the MMDiT-X / qk-norm block against its equations, the tiny
SD3.5-medium and -large teachers through training, exact resume, validation, inference, LoRA reload and
conversion, diffusers-layout loading and the errors for unsupported configs. (SD3 is the rest of the suite.)"""
import json
import os
import shutil

import numpy as np
import paddle
import pytest
from conftest import run_python
from safetensors.numpy import load_file, save_file

import pcm_lora
import sd35_transformer
import train_pcm_lora_sd3_adv as trainer

VARIANTS = ["sd3.5-medium", "sd3.5-large"]


@pytest.fixture(scope="session")
def tiny35(tmp_path_factory):
    """``tiny35(variant)``: the tiny teacher scripts/make_tiny_sd3.py writes for that variant (built once)."""
    from make_tiny_sd3 import make_tiny_sd3

    built = {}

    def get(variant):
        if variant not in built:
            built[variant] = make_tiny_sd3(str(tmp_path_factory.mktemp(variant)), seed=0, variant=variant)
        return built[variant]

    return get


# ----------------------------------------------------------------------------------------------
# One block against its equations (diffusers' JointTransformerBlock, SD35AdaLayerNormZeroX, RMSNorm,
# JointAttnProcessor2_0), written out in float64 numpy
# ----------------------------------------------------------------------------------------------
def _layer_norm(x, eps=1e-6):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)


def _rms_norm(x, weight, eps=1e-6):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * weight


def _silu(x):
    return x / (1 + np.exp(-x))


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _reference_block(p, x, context, temb, heads, dual, pre_only):
    """(context, image) after one SD3.5 block; ``p`` maps parameter names to arrays (Paddle [in, out] Linear)."""

    def linear(name, v):
        return v @ p[f"{name}.weight"] + p[f"{name}.bias"]

    def split(v):
        return v.reshape(v.shape[0], v.shape[1], heads, -1)

    def attention(prefix, v, ctx):
        q = _rms_norm(split(linear(f"{prefix}.to_q", v)), p[f"{prefix}.norm_q.weight"])
        k = _rms_norm(split(linear(f"{prefix}.to_k", v)), p[f"{prefix}.norm_k.weight"])
        val = split(linear(f"{prefix}.to_v", v))
        if ctx is not None:
            q = np.concatenate([q, _rms_norm(split(linear(f"{prefix}.add_q_proj", ctx)), p[f"{prefix}.norm_added_q.weight"])], 1)
            k = np.concatenate([k, _rms_norm(split(linear(f"{prefix}.add_k_proj", ctx)), p[f"{prefix}.norm_added_k.weight"])], 1)
            val = np.concatenate([val, split(linear(f"{prefix}.add_v_proj", ctx))], 1)
        probs = _softmax(np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1]))
        out = np.einsum("bhqk,bkhd->bqhd", probs, val).reshape(v.shape[0], q.shape[1], -1)
        n = v.shape[1]
        return linear(f"{prefix}.to_out.0", out[:, :n]), out[:, n:]

    def ff(prefix, v):
        return linear(f"{prefix}.net.2", _gelu_tanh(linear(f"{prefix}.net.0.proj", v)))

    chunks = np.split(linear("norm1.linear", _silu(temb)), 9 if dual else 6, axis=1)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = [c[:, None] for c in chunks[:6]]
    normed = _layer_norm(x)
    if pre_only:
        scale_c, shift_c = np.split(linear("norm1_context.linear", _silu(temb)), 2, axis=1)
        norm_context = (_layer_norm(context) + p["norm1_context.norm.bias"]) * (1 + scale_c[:, None]) + shift_c[:, None]
    else:
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = [
            c[:, None] for c in np.split(linear("norm1_context.linear", _silu(temb)), 6, axis=1)]
        norm_context = _layer_norm(context) * (1 + c_scale_msa) + c_shift_msa
    image_attn, context_attn = attention("attn", normed * (1 + scale_msa) + shift_msa, norm_context)
    x = x + gate_msa * image_attn
    if dual:
        shift_msa2, scale_msa2, gate_msa2 = [c[:, None] for c in chunks[6:]]
        x = x + gate_msa2 * attention("attn2", normed * (1 + scale_msa2) + shift_msa2, None)[0]
    x = x + gate_mlp * ff("ff", _layer_norm(x) * (1 + scale_mlp) + shift_mlp)
    if pre_only:
        return None, x
    context = context + c_gate_msa * linear("attn.to_add_out", context_attn)
    context = context + c_gate_mlp * ff("ff_context", _layer_norm(context) * (1 + c_scale_mlp) + c_shift_mlp)
    return context, x


@pytest.mark.parametrize("dual,pre_only", [(True, False), (False, True), (True, True)],
                         ids=["mmdit-x", "qk-norm-last-block", "mmdit-x-last-block"])
def test_block_matches_its_equations(dual, pre_only):
    dim, heads = 32, 4
    paddle.seed(3)
    block = sd35_transformer.SD35JointTransformerBlock(dim, heads, dim // heads, context_pre_only=pre_only,
                                                      qk_norm="rms_norm", use_dual_attention=dual)
    block.eval()
    rng = np.random.default_rng(4)
    for name, param in block.named_parameters():  # every weight random, norm weights around 1
        value = rng.standard_normal(param.shape) * 0.3 + (1.0 if "norm_" in name else 0.0)
        param.set_value(paddle.to_tensor(value.astype("float32")))
    x, context, temb = (rng.standard_normal(s).astype("float32") for s in ([2, 6, dim], [2, 5, dim], [2, dim]))
    params = {name: param.numpy().astype("float64") for name, param in block.named_parameters()}
    names = set(params)
    assert {"attn.norm_q.weight", "attn.norm_k.weight", "attn.norm_added_q.weight", "attn.norm_added_k.weight"} <= names
    assert ("attn2.norm_q.weight" in names) == dual and params["norm1.linear.weight"].shape == (dim, (9 if dual else 6) * dim)

    with paddle.no_grad():
        got_context, got_x = block(paddle.to_tensor(x), paddle.to_tensor(context), paddle.to_tensor(temb))
    want_context, want_x = _reference_block(params, x.astype("float64"), context.astype("float64"),
                                            temb.astype("float64"), heads, dual, pre_only)
    np.testing.assert_allclose(got_x.numpy(), want_x, rtol=1e-4, atol=1e-4)
    assert (got_context is None) == pre_only
    if not pre_only:
        np.testing.assert_allclose(got_context.numpy(), want_context, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------
# The tiny SD3.5 teachers: layout, selection, LoRA targets, discriminator taps
# ----------------------------------------------------------------------------------------------
SD3_LORA_MODULES = 26  # the 2-block tiny SD3 (tests/test_teacher_and_lora.py)
ATTN2 = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]


def _inputs(config, batch=2, size=8, seed=3):
    rng = np.random.default_rng(seed)
    return dict(
        hidden_states=paddle.to_tensor(rng.standard_normal([batch, 16, size, size]).astype("float32")),
        timestep=paddle.to_tensor(np.linspace(800.0, 120.0, batch).astype("float32")),
        encoder_hidden_states=paddle.to_tensor(rng.standard_normal([batch, 154, config.joint_attention_dim]).astype("float32")),
        pooled_projections=paddle.to_tensor(rng.standard_normal([batch, config.pooled_projection_dim]).astype("float32")),
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_teacher_config_lora_targets_and_discriminator_taps(tiny35, variant):
    from ppdiffusers import SD3Transformer2DModel

    from discriminator import Discriminator, block_features

    folder = tiny35(variant)
    config = json.load(open(os.path.join(folder, "transformer", "config.json")))
    index = json.load(open(os.path.join(folder, "model_index.json")))
    assert config["_class_name"] == "SD3Transformer2DModel" and index["transformer"][1] == "SD3Transformer2DModel"
    assert config["qk_norm"] == "rms_norm"
    assert config.get("dual_attention_layers", []) == ([0] if variant == "sd3.5-medium" else [])

    transformer = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer")  # what every entry point calls
    assert type(transformer) is sd35_transformer.SD35Transformer2DModel
    transformer.eval()
    pcm_lora.add_pcm_lora(transformer, rank=4)
    names = pcm_lora.lora_module_names(transformer)
    attn2 = [f"transformer_blocks.0.{n}" for n in ATTN2] if variant == "sd3.5-medium" else []
    assert len(names) == SD3_LORA_MODULES + len(attn2) and set(attn2) <= set(names)
    assert not any(".norm_" in n for n in names)  # the q/k RMSNorms are not Linear: frozen, no LoRA
    assert all(p.stop_gradient for n, p in transformer.named_parameters() if ".norm_" in n)

    # One discriminator head per block on the features after every block (attn2 included): the last
    # feature is what the transformer's output layer turns into its prediction.
    discriminator = Discriminator(transformer)
    inputs = _inputs(transformer.config)
    args = (inputs["hidden_states"], inputs["timestep"], inputs["encoder_hidden_states"], inputs["pooled_projections"])
    with paddle.no_grad():
        features = block_features(transformer, *args)
        logits = discriminator("logits", *args)
        temb = transformer.time_text_embed(inputs["timestep"], inputs["pooled_projections"])
        head = transformer.proj_out(transformer.norm_out(features[-1], temb)).reshape([2, 4, 4, 2, 2, 16])
        from_features = head.transpose([0, 5, 1, 3, 2, 4]).reshape([2, 16, 8, 8]).numpy()
        sample = transformer(**inputs).sample.numpy()
    assert len(features) == len(logits) == config["num_layers"] and logits[0].shape == [2, 1, 4, 4]
    np.testing.assert_allclose(from_features, sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_memory_budget_counts_and_tracer_match_the_tiny_model(tiny35, shards, tmp_path, variant):
    """scripts/memory_budget.py's SD3.5 formulas (parameters, LoRA targets) and its tracer of the SD3.5 block
    (fp32, attention as it runs on CPU) against the student the trainer prepares and what Paddle's host allocator keeps."""
    import gc

    import memory_budget as mb
    from paddle.base import core

    folder = tiny35(variant)
    config = json.load(open(os.path.join(folder, "transformer", "config.json")))
    args = trainer.parse_args(["--pretrained_teacher_model", folder, "--data_path", shards, "--output_dir",
                               str(tmp_path), "--lora_rank", "4"])
    student = trainer.load_models(args, "float32", lambda *a: None)[-1]
    base = [p for n, p in student.named_parameters() if ".lora_" not in n]
    assert mb.transformer_parameter_count(config) == sum(int(np.prod(p.shape)) for p in base)
    assert sorted(name for name, _, _ in mb.lora_targets(config)) == pcm_lora.lora_module_names(student)
    trainable = [p for p in student.parameters() if not p.stop_gradient]
    assert mb.lora_parameter_count(config, 4) == sum(int(np.prod(p.shape)) for p in trainable)
    if not paddle.get_device().startswith("cpu"):
        pytest.skip("the measurement reads Paddle's host (CPU) allocator statistics")
    inputs = _inputs(student.config, size=16)
    gc.collect()
    before = core.host_memory_stat_current_value("Allocated", 0)
    out = student(**inputs).sample
    measured = core.host_memory_stat_current_value("Allocated", 0) - before - int(out.numel()) * out.element_size()
    tr = mb.Trace("paddle", amp=False, attention=mb.cpu_attention_kind())
    mb.trace_transformer(tr, config, batch=2, resolution=128, role="student", input_dt="f32", embeds_dt="f32",
                         weight_dt="f32", rank=4, lora="active")
    assert tr.saved_bytes() == pytest.approx(measured, rel=0.02)


def test_diffusers_layout_folder_loads(tiny35, tmp_path):
    """A folder as diffusers publishes SD3.5 (PyTorch [out, in] Linear weights, published names and config)."""
    from ppdiffusers import SD3Transformer2DModel

    folder = tiny35("sd3.5-medium")
    ours = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer")
    linears = {name for name, layer in ours.named_sublayers() if isinstance(layer, paddle.nn.Linear)}
    state = load_file(os.path.join(folder, "transformer", "diffusion_paddle_model.safetensors"))
    torch_layout = {k: (v.T.copy() if k.endswith(".weight") and k[: -len(".weight")] in linears else v) for k, v in state.items()}
    dim = ours.inner_dim
    published = {  # diffusers' names and PyTorch shapes for an MMDiT-X block with qk-norm
        "transformer_blocks.0.norm1.linear.weight": (9 * dim, dim), "transformer_blocks.0.attn.norm_q.weight": (8,),
        "transformer_blocks.0.attn.norm_added_k.weight": (8,), "transformer_blocks.0.attn2.to_out.0.weight": (dim, dim),
        "transformer_blocks.0.attn2.norm_k.weight": (8,), "transformer_blocks.1.norm1.linear.weight": (6 * dim, dim),
    }
    assert {k: torch_layout[k].shape for k in published} == published
    config = json.load(open(os.path.join(folder, "transformer", "config.json")))
    config.pop("_ppdiffusers_version")
    config["_diffusers_version"] = "0.31.0.dev0"
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(config))
    save_file(torch_layout, str(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    loaded = SD3Transformer2DModel.from_pretrained(str(tmp_path), subfolder="transformer", from_diffusers=True)
    assert type(loaded) is sd35_transformer.SD35Transformer2DModel
    inputs = _inputs(ours.config)
    with paddle.no_grad():
        np.testing.assert_array_equal(loaded(**inputs).sample.numpy(), ours(**inputs).sample.numpy())


def test_unsupported_configs_fail_with_one_clear_error(tiny35, tmp_path):
    teacher = tmp_path / "teacher"
    for name in ("model_index.json", "transformer/config.json", "vae/config.json", "scheduler/scheduler_config.json"):
        (teacher / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(tiny35("sd3.5-large"), name), teacher / name)
    config_file = teacher / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    argv = ["--pretrained_teacher_model", str(teacher), "--data_path", str(tmp_path), "--output_dir", str(tmp_path / "o")]
    for change, message in [({"qk_norm": "layer_norm"}, "qk_norm 'layer_norm' is not supported"),
                            ({"use_rope": True}, "use_rope is not supported")]:
        config_file.write_text(json.dumps({**config, **change}))
        with pytest.raises(trainer.ArgumentError, match=message) as error:  # before any model is loaded
            trainer.validate_args(trainer.parse_args(argv))
        assert str(config_file) in str(error.value) and "\n" not in str(error.value)
        with pytest.raises(ValueError, match=message):  # and where the pipeline/scripts load it
            from ppdiffusers import SD3Transformer2DModel

            SD3Transformer2DModel.from_pretrained(str(teacher), subfolder="transformer")


# ----------------------------------------------------------------------------------------------
# Training, exact resume, validation, reload, inference, conversion on both tiny SD3.5 teachers
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from make_tiny_cc3m import make_tiny_cc3m

    out = str(tmp_path_factory.mktemp("sd35-data"))
    make_tiny_cc3m(out, num_shards=2, samples_per_shard=4, seed=5)
    return out


# The flags README "Works with" gives for fitting each variant into 80 GB at 1024 px.
MEMORY_FLAGS = {"sd3.5-medium": ["--gradient_checkpointing"],
                "sd3.5-large": ["--gradient_checkpointing", "--share_teacher_weights"]}


@pytest.fixture(scope="module", params=VARIANTS)
def run35(request, tiny35, shards, tmp_path_factory):
    """A 2-step run (a D step then a G step) with a checkpoint after each step and validation at the end,
    with the variant's memory flags."""
    teacher = tiny35(request.param)
    out = str(tmp_path_factory.mktemp(f"run-{request.param}"))
    argv = ["--pretrained_teacher_model", teacher, "--data_path", shards, "--output_dir", out, "--resolution", "64",
            "--train_batch_size", "2", "--max_train_steps", "2", "--checkpointing_steps", "1", "--seed", "11",
            "--lora_rank", "4", "--learning_rate", "1e-2", "--validation_steps", "2", "--num_validation_images", "1",
            "--resume_from_checkpoint", "latest", "--report_to", "none", *MEMORY_FLAGS[request.param]]
    args = trainer.parse_args(argv)
    result = trainer.train(args, trainer.validate_args(args))
    assert result.exit_code == 0 and result.global_step == 2
    return dict(variant=request.param, teacher=teacher, out=out, argv=argv, result=result)


def test_training_validation_and_exact_resume(run35):
    out = run35["out"]
    assert type(run35["result"].student) is sd35_transformer.SD35Transformer2DModel
    assert os.path.isfile(os.path.join(out, "validation", "step-2.png"))
    trained = load_file(os.path.join(out, "paddle_lora_weights.safetensors"))
    assert any(".attn2." in k for k in trained) == (run35["variant"] == "sd3.5-medium")
    # Resume from the checkpoint after the D step: the G step is replayed bit for bit.
    shutil.rmtree(os.path.join(out, "checkpoint-2"))
    os.remove(os.path.join(out, "paddle_lora_weights.safetensors"))
    args = trainer.parse_args([*run35["argv"], "--num_validation_images", "0"])
    resumed = trainer.train(args, trainer.validate_args(args))
    assert resumed.exit_code == 0 and resumed.global_step == 2
    again = load_file(os.path.join(out, "paddle_lora_weights.safetensors"))
    assert set(again) == set(trained)
    for key in trained:
        np.testing.assert_array_equal(again[key], trained[key], err_msg=key)


def test_reload_inference_and_conversion(run35, tmp_path):
    from ppdiffusers import StableDiffusion3Pipeline

    import infer

    student, lora_file = run35["result"].student, os.path.join(run35["out"], "paddle_lora_weights.safetensors")
    inputs = _inputs(student.config)
    with paddle.no_grad():
        trained = student(**inputs).sample.numpy()
    pipe = StableDiffusion3Pipeline.from_pretrained(run35["teacher"])  # the seed snippet's loading path
    assert type(pipe.transformer) is sd35_transformer.SD35Transformer2DModel
    with paddle.no_grad():
        base = pipe.transformer(**inputs).sample.numpy()
    pipe.load_lora_weights(lora_file)
    scale = pcm_lora.inference_lora_scale(4)
    with paddle.no_grad():
        reloaded = pipe.transformer(**inputs, joint_attention_kwargs={"scale": scale}).sample.numpy()
    assert np.abs(reloaded - trained).max() <= 1e-5 and np.abs(trained - base).max() > 1e-4

    infer.main(["--pretrained_teacher_model", run35["teacher"], "--lora", lora_file, "--num_inference_steps", "2",
                "--height", "64", "--width", "64", "--output", str(tmp_path / "pcm.png")])
    from PIL import Image

    with Image.open(tmp_path / "pcm.png") as image:
        assert image.size == (64, 64)

    for direction, source, target in [("diffusers", lora_file, "pt.safetensors"), ("paddle", str(tmp_path / "pt.safetensors"), "back.safetensors")]:
        result = run_python(["scripts/convert_lora.py", "--to", direction, source, str(tmp_path / target)])
        assert result.returncode == 0, result.stderr[-2000:]
    ours, torch_form, back = (load_file(p) for p in (lora_file, str(tmp_path / "pt.safetensors"), str(tmp_path / "back.safetensors")))
    assert set(back) == set(ours) and all(np.array_equal(ours[k], back[k]) for k in ours)
    for key in [k for k in ours if ".attn2." in k]:  # MMDiT-X attn2 in PyTorch layout too
        assert torch_form[key].shape == ours[key].shape[::-1]
