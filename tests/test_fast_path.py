"""The fast path: paddle_compat's CPU settings and the memory savings (frozen_linear's frozen Linear layers and
shared LoRA inputs, the discriminator's recomputed heads, frozen_ops' AdaLN products), each with the same results
as without."""
import gc
import json
import os

import numpy as np
import paddle
import pytest
from conftest import run_python
from safetensors.numpy import load_file

import cpu_kernels
import frozen_linear
import frozen_ops
import memory_budget
import paddle_compat
import train_pcm_lora_sd3_adv as trainer


def test_cpu_settings_follow_the_vendor_and_never_override_the_user():
    env = {}
    assert paddle_compat.set_cpu_environment(env, vendor="AuthenticAMD") == {"MKL_DEBUG_CPU_TYPE": "5"}
    assert paddle_compat.set_cpu_environment({}, vendor="GenuineIntel") == {}
    user = {"MKL_DEBUG_CPU_TYPE": "2"}
    assert paddle_compat.set_cpu_environment(user, vendor="AuthenticAMD") == {} and user["MKL_DEBUG_CPU_TYPE"] == "2"
    assert paddle_compat.cpu_vendor("/nonexistent/cpuinfo") == ""


def test_cpu_settings_reach_paddle_and_child_processes():
    """This process imported paddle_compat: Paddle runs with the settings and a process it starts (DataLoader
    worker, launched rank) inherits them. A value the user set before is left alone (then nothing is set)."""
    if paddle.device.get_all_device_type():
        pytest.skip("the stride flag is set on CPU-only Paddle builds only")
    settings = paddle_compat.CPU_SETTINGS
    expected_mkl = "5" if paddle_compat.cpu_vendor() == "AuthenticAMD" else None
    assert settings.get("MKL_DEBUG_CPU_TYPE", expected_mkl) == expected_mkl
    stride = paddle.get_flags(["FLAGS_use_stride_kernel"])["FLAGS_use_stride_kernel"]
    assert stride is settings.get("FLAGS_use_stride_kernel", stride)
    assert os.environ["FLAGS_use_stride_kernel"] == str(int(stride))
    child = "import os, json; print(json.dumps({k: os.environ.get(k) for k in ('MKL_DEBUG_CPU_TYPE', 'FLAGS_use_stride_kernel')}))"
    result = run_python(["-c", child])
    assert json.loads(result.stdout) == {k: os.environ.get(k) for k in ("MKL_DEBUG_CPU_TYPE", "FLAGS_use_stride_kernel")}

    user = {"FLAGS_use_stride_kernel": "1"}
    assert paddle_compat.set_cpu_flags(paddle, user) == {} and user == {"FLAGS_use_stride_kernel": "1"}


def test_each_saving_keeps_less_as_the_tracer_counts(tiny_sd3):
    """A step's graphs (student forward, discriminator g_loss through the frozen teacher, d_loss), measured with
    Paddle's host allocator (scripts/memory_budget.py --measure_cpu) as each saving is switched on: the tracer
    matches every time; frozen_linear keeps less in the student and g_loss, head recompute in g_loss and d_loss,
    the shared LoRA input in the student, the frozen AdaLN factors in g_loss (the student's AdaLN linears carry
    LoRA, so its factors need gradients and its products stay plain multiplies)."""
    mb = memory_budget

    if not paddle.get_device().startswith("cpu"):
        pytest.skip("the measurement reads Paddle's host (CPU) allocator statistics")
    results = {name: mb.measure_g_step_on_cpu(tiny_sd3, 128, 2, 4, *switches) for name, *switches in mb.MEASURED_SAVINGS}
    for name, result in results.items():
        for graph, measured in result["measured_bytes"].items():
            # 2 %, or 4 KiB: what the tiny d_loss keeps with recomputed heads is 64 KiB, near the small tensors
            # (time and pooled embeddings) the tracer leaves out
            assert result["traced_bytes"][graph] == pytest.approx(measured, rel=0.02, abs=4096), (name, graph)
    upstream, frozen, recomputed, shared, factor = (results[name]["measured_bytes"] for name, *_ in mb.MEASURED_SAVINGS)
    assert frozen["student forward"] < upstream["student forward"]
    assert frozen["discriminator g_loss"] < upstream["discriminator g_loss"]
    assert recomputed["discriminator g_loss"] < frozen["discriminator g_loss"]
    assert recomputed["discriminator d_loss"] < frozen["discriminator d_loss"]
    assert shared["student forward"] < recomputed["student forward"]
    assert factor["discriminator g_loss"] < shared["discriminator g_loss"]
    assert factor["student forward"] == shared["student forward"]
    assert factor["discriminator d_loss"] == shared["discriminator d_loss"]


@pytest.mark.parametrize("step", [1, 2, 3, 4], ids=lambda i: memory_budget.MEASURED_SAVINGS[i][0])
def test_saving_gives_bit_identical_gradients(tiny_sd3, monkeypatch, step):
    """Student (LoRA) forward plus the discriminator's g_loss through the frozen teacher, backward, and the
    d_loss's head gradients, with and without a saving (on top of those before it, as the trainer runs them):
    same losses, same LoRA and head gradients, bit for bit. (The shared LoRA input without frozen_linear, which
    the trainer never runs, sums the input's gradient contributions in another order: last-bit differences.)"""
    from conftest import add_random_lora, load_frozen_transformer

    from discriminator import Discriminator

    student = add_random_lora(load_frozen_transformer(tiny_sd3), rank=4, seed=1)
    disc = Discriminator(load_frozen_transformer(tiny_sd3))
    config = student.config
    paddle.seed(3)
    sample = paddle.randn([2, 16, 16, 16])
    t = paddle.full([2], 400.0)
    embeds, pooled = paddle.randn([2, 154, config.joint_attention_dim]), paddle.randn([2, config.pooled_projection_dim])
    lora = [p for p in student.parameters() if not p.stop_gradient]

    trained = lora + list(disc.parameters())

    def run():
        student.clear_gradients()
        disc.clear_gradients()
        fake = student(hidden_states=sample, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled).sample
        g_loss = disc("g_loss", fake, t, embeds, pooled) + (fake * fake).mean()
        g_loss.backward()
        d_loss = disc("d_loss", fake, sample, t, embeds, pooled)
        d_loss.backward()
        return [float(g_loss), float(d_loss)], [p.grad.numpy() for p in trained]

    results = {}
    for on in (False, True):
        with monkeypatch.context() as patch:
            _switch(patch, *memory_budget.MEASURED_SAVINGS[step - 1 + on][1:])
            results[on] = run()
    assert results[True][0] == results[False][0]
    for with_, without in zip(results[True][1], results[False][1]):
        np.testing.assert_array_equal(with_, without)
    assert all(np.abs(g).max() > 0 for g in results[True][1][-len(list(disc.parameters())):])
    assert any(np.abs(g).max() > 0 for g in results[True][1][:len(lora)])


def _kept(fn):
    """Bytes Paddle's host allocator holds after ``fn()`` beyond its outputs: what the graph keeps for backward."""
    from paddle.base import core

    gc.collect()
    before = core.host_memory_stat_current_value("Allocated", 0)
    out = fn()
    outputs = [t for t in (out if isinstance(out, tuple) else (out,)) if t is not None]
    return core.host_memory_stat_current_value("Allocated", 0) - before - sum(int(t.numel()) * t.element_size()
                                                                              for t in outputs)


def _count_frozen_factor_calls(patch):
    calls = []
    apply = frozen_ops.FrozenFactorMultiply.apply
    patch.setattr(frozen_ops.FrozenFactorMultiply, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


def _lora_student_and_inputs(tiny_sd3, lora_seed: int, input_seed: int, timestep: float):
    """The tiny teacher with a seeded rank-4 LoRA (frozen_linear installed, as the trainer runs) and seeded inputs."""
    from conftest import add_random_lora, load_frozen_transformer

    frozen_linear.install()
    student = add_random_lora(load_frozen_transformer(tiny_sd3), rank=4, seed=lora_seed)
    config = student.config
    paddle.seed(input_seed)
    inputs = dict(hidden_states=paddle.randn([2, 16, 16, 16]), timestep=paddle.full([2], timestep),
                  encoder_hidden_states=paddle.randn([2, 154, config.joint_attention_dim]),
                  pooled_projections=paddle.randn([2, config.pooled_projection_dim]))
    return student, inputs


def test_no_grad_lora_layers_run_fused_with_the_same_bits(tiny_sd3, monkeypatch):
    """A no-grad pass of the student (the target and the D step's student) runs each LoRA Linear as its ops without
    the layers' calls (paddle_compat._lora_linear_fused): the same output, bit for bit, as layer by layer."""
    student, inputs = _lora_student_and_inputs(tiny_sd3, lora_seed=2, input_seed=4, timestep=600.0)
    fused_calls = []
    fused = paddle_compat._lora_linear_fused
    monkeypatch.setattr(paddle_compat, "_lora_linear_fused",
                        lambda layer, x: fused_calls.append(1) or fused(layer, x))
    with paddle.no_grad():
        fast = student(**inputs).sample.numpy()
        assert len(fused_calls) == len(_peft_lora_linears(student))
        monkeypatch.setattr(paddle_compat, "_lora_linear_fused", lambda layer, x: None)
        plain = student(**inputs).sample.numpy()
    np.testing.assert_array_equal(fast, plain)


def test_fused_lora_layers_with_gradients_keep_the_same_and_match_layer_by_layer(tiny_sd3, monkeypatch):
    """The student's G-step forward on CPU runs every LoRA Linear as one node (frozen_linear.LoraLinear, or its
    compiled op): the same
    output bit for bit, the same bytes kept for backward, and the LoRA gradients layer by layer's within fp32
    roundoff (the input's two gradient terms are summed in the node, not among the input's other consumers)."""
    student, inputs = _lora_student_and_inputs(tiny_sd3, lora_seed=5, input_seed=6, timestep=300.0)
    lora = [p for p in student.parameters() if not p.stop_gradient]
    calls = []
    apply, compiled = frozen_linear.LoraLinear.apply, cpu_kernels.lora_linear  # the node, or its compiled op
    monkeypatch.setattr(frozen_linear.LoraLinear, "apply", lambda *a: calls.append(1) or apply(*a))
    monkeypatch.setattr(cpu_kernels, "lora_linear", lambda *a: calls.append(1) or compiled(*a))
    results = {}
    for fused in (True, False):
        monkeypatch.setattr(frozen_linear, "FUSE_LORA_WITH_GRAD", fused)
        student.clear_gradients()
        kept = _kept(lambda: student(**inputs).sample)
        out = student(**inputs).sample
        (out * out).mean().backward()
        results[fused] = kept, out.numpy(), [p.grad.numpy() for p in lora]
    assert len(calls) == 2 * len(_peft_lora_linears(student))
    assert results[True][0] == results[False][0]
    np.testing.assert_array_equal(results[True][1], results[False][1])
    for fast, plain in zip(results[True][2], results[False][2]):
        np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-6 * np.abs(plain).max())
    assert any(not np.array_equal(a, b) for a, b in zip(results[True][2], results[False][2]))


def _peft_lora_linears(model) -> list:
    from ppdiffusers.peft.tuners.lora.layer import Linear

    return [layer for _, layer in model.named_sublayers() if isinstance(layer, Linear)]


def test_frozen_factor_multiply_is_the_plain_multiply_keeping_only_the_factor(monkeypatch):
    """frozen_ops.multiply: the product and the activation's gradient bit for bit as Paddle's multiply (either
    operand order; an fp16 activation times an fp32 factor promotes and casts the gradient back as Paddle does),
    keeping only the factor; a plain multiply where the factor needs a gradient, the activation does not, grad is
    off, or frozen_ops is not installed."""
    if not paddle.get_device().startswith("cpu"):
        pytest.skip("the measurement reads Paddle's host (CPU) allocator statistics")
    monkeypatch.setattr(frozen_ops, "ENABLED", True)
    calls = _count_frozen_factor_calls(monkeypatch)
    paddle.seed(5)
    factor = paddle.randn([2, 1, 32])
    for dtype in ("float32", "float16"):
        for factor_first in (False, True):
            x = paddle.randn([2, 64, 32]).astype(dtype)
            x.stop_gradient = False
            weight = paddle.randn([2, 64, 32])
            results = []
            for multiply in (lambda a, b: a * b, frozen_ops.multiply):
                x.clear_gradient()
                out = multiply(factor, x) if factor_first else multiply(x, factor)
                (out * weight).sum().backward()
                results.append((out.numpy(), out.dtype, x.grad.numpy(), x.grad.dtype))
            np.testing.assert_array_equal(results[0][0], results[1][0])
            np.testing.assert_array_equal(results[0][2], results[1][2])
            assert results[0][1] == results[1][1] == paddle.float32 and results[0][3] == results[1][3] == x.dtype
    assert len(calls) == 4

    x = paddle.randn([2, 64, 32])
    x.stop_gradient = False
    # x * 2 (a scale op) keeps nothing itself: the product is the only holder of its result
    assert _kept(lambda: (x * 2) * factor) == 2 * 64 * 32 * 4
    assert _kept(lambda: frozen_ops.multiply(x * 2, factor)) == 0  # the factor existed before
    assert len(calls) == 5

    trainable = paddle.randn([2, 1, 32])
    trainable.stop_gradient = False
    frozen_ops.multiply(x, trainable).sum().backward()
    assert trainable.grad is not None
    frozen_ops.multiply(x.detach(), factor)
    with paddle.no_grad():
        frozen_ops.multiply(x, factor)
    monkeypatch.setattr(frozen_ops, "ENABLED", False)
    frozen_ops.multiply(x, factor)
    assert len(calls) == 5


@pytest.mark.parametrize("kind", ["sd3", "sd3-last", "sd3.5-mmdit-x", "sd3.5-mmdit-x-last"])
def test_frozen_block_forwards_are_upstreams_keeping_less(monkeypatch, kind):
    """A frozen SD3 block (ppdiffusers' JointTransformerBlock, the last one with AdaLayerNormContinuous) and the
    SD3.5 MMDiT-X block (sd35_transformer, with attn2 and SD35AdaLayerNormZeroX) as the discriminator's backbone
    runs them, both streams needing gradients: frozen_ops' forwards give the same outputs and input gradients bit
    for bit as ppdiffusers' (SD3.5: as with frozen_ops off), every AdaLN product through the PyLayer or the fused
    modulation, and keep less for backward."""
    from ppdiffusers.models.attention import JointTransformerBlock

    import sd35_transformer

    if not paddle.get_device().startswith("cpu"):
        pytest.skip("the measurement reads Paddle's host (CPU) allocator statistics")
    dim, heads, last = 64, 4, kind.endswith("last")
    paddle.seed(6)
    if kind.startswith("sd3.5"):
        block = sd35_transformer.SD35JointTransformerBlock(dim, heads, dim // heads, context_pre_only=last,
                                                           qk_norm="rms_norm", use_dual_attention=True)
    else:
        block = JointTransformerBlock(dim, heads, dim, context_pre_only=last)
    for param in block.parameters():  # random AdaLN weights too: no zero gates
        param.set_value(paddle.randn(param.shape) * 0.2)
        param.stop_gradient = True
    block.eval()
    x, context, temb = paddle.randn([2, 64, dim]), paddle.randn([2, 12, dim]), paddle.randn([2, dim])
    x.stop_gradient = context.stop_gradient = False

    def run():
        x.clear_gradient()
        context.clear_gradient()
        out_context, out = block(x, context, temb)
        loss = (out * out).sum() + (0 if last else (out_context * out_context).sum())
        loss.backward()
        grads = [x.grad.numpy()] + ([] if last else [context.grad.numpy()])
        return [out.numpy()] + ([] if last else [out_context.numpy()]) + grads

    results, kept = {}, {}
    for on in (False, True):
        with monkeypatch.context() as patch:
            _switch_frozen_factor(patch, on)
            calls = _count_frozen_factor_calls(patch)
            results[on] = run()
            kept[on] = _kept(lambda: block(x, context, temb))
            # two forwards; each: image stream gate attn (and attn2: SD3.5, whose norm1 also modulates twice) and the
            # MLP, context stream modulate (the last block's AdaLayerNormContinuous) or gate attn and the MLP; the
            # LayerNorms' modulations run fused (cpu_kernels.layer_norm_modulate, keeping only the factor as well)
            assert len(calls) == on * 2 * (2 + 3 * kind.startswith("sd3.5") + (1 if last else 2))
    for with_, without in zip(results[True], results[False]):
        np.testing.assert_array_equal(with_, without)
    assert kept[True] < kept[False]


def test_lora_input_copy_is_made_once_per_tensor():
    """Under autocast (GPU) LoraDown keeps the low-precision copy of its input: to_q, to_k and to_v, called with
    the same tensor, share one copy, with autocast's values; in the matmul's own dtype the input itself."""
    x = paddle.randn([2, 8, 32])
    copy = frozen_linear._in_dtype(x, paddle.float16)
    assert frozen_linear._in_dtype(x, paddle.float16) is copy and copy.dtype == paddle.float16
    np.testing.assert_array_equal(copy.numpy(), x.cast(paddle.float16).numpy())
    assert frozen_linear._in_dtype(x * 1, paddle.float16) is not copy
    assert frozen_linear._in_dtype(x, paddle.float32) is x


def _switch(patch, frozen, head_recompute, share_lora_input, frozen_factor):
    """Turn the savings on or off for this test (the trainer has all on). frozen_linear.install() installs
    frozen_linear and frozen_ops: with frozen_linear off, install does nothing. The fused LoRA node (a speed path
    that sums the layer input's gradient terms in another order) and the fused modulation of trained AdaLN factors
    (the timestep embedding's gradient terms in another order) are off in both arms: their own tests compare them."""
    from discriminator import Discriminator

    patch.setattr(frozen_linear, "FUSE_LORA_WITH_GRAD", False)
    patch.setattr(frozen_ops, "FUSE_TRAINED_MODULATION", False)

    patch.setattr(paddle.nn.Linear, "forward", frozen_linear.linear_forward if frozen else frozen_linear._UPSTREAM_FORWARD)
    if not frozen:
        patch.setattr(frozen_linear, "install", lambda: False)
    patch.setattr(Discriminator, "recompute_heads", head_recompute)
    patch.setattr(frozen_linear, "SHARE_LORA_INPUT", share_lora_input)
    _switch_frozen_factor(patch, frozen_factor)


def _switch_frozen_factor(patch, on):
    patch.setattr(frozen_ops, "ENABLED", on)
    for cls, forward in (frozen_ops.FORWARDS if on else frozen_ops._UPSTREAM_FORWARDS).items():
        patch.setattr(cls, "forward", forward)


def test_training_is_bit_identical_with_and_without_the_savings(tiny_sd3, tmp_path, monkeypatch):
    """Two D and two G steps in fp32 (seed-command loss and solver flags), all savings off and all on (each one
    alone: the gradient test above): same logged losses, same LoRA."""
    from make_tiny_cc3m import make_tiny_cc3m

    data = str(tmp_path / "data")
    make_tiny_cc3m(data, num_shards=1, samples_per_shard=8, min_size=64, max_size=96, seed=2)
    runs = []
    for installed in (False, True):
        out = tmp_path / f"frozen-{installed}"
        argv = ["--pretrained_teacher_model", tiny_sd3, "--data_path", data, "--output_dir", str(out),
                "--resolution", "64", "--train_batch_size", "2", "--max_train_steps", "4", "--seed", "7",
                "--report_to", "none", "--num_validation_images", "0", "--learning_rate", "1e-3",
                "--loss_type", "huber", "--num_euler_timesteps", "100", "--multiphase", "4"]
        with monkeypatch.context() as patch:
            patch.setattr(paddle.nn.Linear, "forward", frozen_linear._UPSTREAM_FORWARD)
            _switch(patch, installed, installed, installed, installed)
            assert trainer.main(argv) == 0
            assert (paddle.nn.Linear.forward is frozen_linear.linear_forward) == installed
            assert frozen_ops.ENABLED == installed
        rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
        losses = [{k: v for k, v in row.items() if k.endswith("loss")} for row in rows]
        runs.append((losses, load_file(str(out / "paddle_lora_weights.safetensors"))))
    assert runs[0][0] == runs[1][0] and all("d_loss" in r or "g_loss" in r for r in runs[0][0])
    for key, value in runs[0][1].items():
        np.testing.assert_array_equal(value, runs[1][1][key], err_msg=key)
    assert any(np.abs(v).max() > 0 for k, v in runs[1][1].items() if "lora_B" in k)  # it did train
