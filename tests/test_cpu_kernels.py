"""cpu_kernels: the compiled CPU attention, softmax, GELU, LayerNorm and bias against exact values and Paddle's own,
their gradients, determinism, where they are used, and the fallbacks."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import paddle_compat  # noqa: F401
import paddle
import paddle.nn.functional as F

import cpu_kernels

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# row lengths around the kernel's 16-float vectors, and the attention rows of the tiny and small teachers
ROW_LENGTHS = [1, 7, 16, 17, 33, 410]


def _scores(rows: int, n: int, seed: int) -> paddle.Tensor:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, n)).astype("float32") * rng.uniform(0.1, 30.0, (rows, 1)).astype("float32")
    x[0] += 1e4  # far from zero: only x - max matters
    if n > 1:
        x[1, 0] = -1e30  # an entry whose probability underflows
    return paddle.to_tensor(x)


@pytest.fixture(scope="module")
def kernels():
    module = cpu_kernels.kernels()
    if module is None:
        pytest.fail("the CPU kernels did not build here (a C++ compiler is part of this machine's set-up)")
    return module


def _exact(x: np.ndarray) -> np.ndarray:
    shifted = x.astype("float64") - x.max(-1, keepdims=True)
    return np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)


@pytest.mark.parametrize("n", ROW_LENGTHS)
def test_softmax_matches_paddles_and_does_not_depend_on_threads(kernels, n):
    """Within 1e-6 of the exact (float64) softmax, plus the rounding of ``x - max`` in float32 (relative 2^-24 of it,
    scaled by ``|x - max|`` in ``exp``), down to the smallest normal float, where Paddle's CPU softmax
    clips ``x - max`` at -64 (so its probabilities stop at exp(-64) = 1.6e-28; PyTorch's do not); the same bits for
    1, 2 or 3 threads."""
    x = _scores(300, n, seed=n)
    results = [kernels.pcm_softmax(x, threads).numpy() for threads in (1, 2, 3)]
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])
    fast, exact, paddles = results[0].astype("float64"), _exact(x.numpy()), F.softmax(x, axis=-1).numpy()
    shift = np.abs(x.numpy() - x.numpy().max(-1, keepdims=True))
    assert np.all(np.abs(fast - exact) <= (1e-6 + 2 ** -23 * shift) * exact + 2e-38)
    assert np.all(np.abs(fast - paddles) <= 2e-6 * paddles + 2e-28)
    if n > 1:
        assert fast[1, 0] < 2e-38  # exp(-1e30 - max) underflows (Paddle's: 1.6e-28 / its row sum)


def test_softmax_gradient_matches_paddles(kernels):
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((2, 3, 40, 41)).astype("float32") * 4)
    x.stop_gradient = False
    grad_out = paddle.to_tensor(np.random.default_rng(1).standard_normal(x.shape).astype("float32"))
    grads = []
    for fn in (lambda t: F.softmax(t, axis=-1), cpu_kernels.softmax):
        (grad,) = paddle.grad([fn(x)], [x], [grad_out])
        grads.append(grad.numpy())
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-5, atol=1e-7)
    assert np.abs(grads[1]).max() > 0.1


def _gelu_tanh_exact(x: np.ndarray) -> np.ndarray:
    x = x.astype("float64")
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


@pytest.mark.parametrize("n", [1, 17, 1024])
def test_gelu_tanh_matches_the_formula_and_paddles_gradient(kernels, n):
    """Within 2e-6 absolute (values up to 30) of the float64 formula, the same bits for any thread count, overflow-
    free at the ends; the gradient within 2e-5 of Paddle's ``F.gelu(approximate=True)``'s."""
    rng = np.random.default_rng(n)
    values = np.concatenate([rng.standard_normal(300 * n) * 4, [-100.0, -30.0, 0.0, 30.0, 100.0]]).astype("float32")
    x = paddle.to_tensor(values)
    results = [kernels.pcm_gelu_tanh(x, threads).numpy() for threads in (1, 2, 3)]
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])
    assert np.all(np.isfinite(results[0]))
    np.testing.assert_allclose(results[0], _gelu_tanh_exact(values), rtol=2e-6, atol=2e-6)
    x.stop_gradient = False
    grad_out = paddle.to_tensor(rng.standard_normal(values.shape).astype("float32"))
    (fast,) = paddle.grad([cpu_kernels.gelu_tanh(x)], [x], [grad_out])
    (plain,) = paddle.grad([F.gelu(x, approximate=True)], [x], [grad_out])
    np.testing.assert_allclose(fast.numpy(), plain.numpy(), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("batch,width,grid", [(2, 64, (4, 5)), (3, 32, (1, 17))])
def test_discriminator_head_norm_keeps_the_ops_results(kernels, monkeypatch, batch, width, grid):
    """A discriminator head with its conv bias, GroupNorm and LeakyReLU as cpu_kernels.head_norm (and its first 1x1
    conv as a matmul on the tokens): the same output, input gradient and gradients of every weight but the conv
    biases and the first conv's weight, bit for bit, as with the transpose and the three ops; those (the same terms
    summed in another order) at fp32 roundoff; for any thread count."""
    from discriminator import DiscriminatorHead

    paddle.seed(batch)
    head = DiscriminatorHead(width)
    rng = np.random.default_rng(width)
    for param in head.parameters():
        param.set_value(rng.standard_normal(param.shape).astype("float32") * 0.3)
    tokens = paddle.to_tensor(rng.standard_normal((batch, grid[0] * grid[1], width)).astype("float32"),
                              stop_gradient=False)
    names = ["out", "tokens"] + [name for name, _ in head.named_parameters()]
    runs = cpu_kernels.head_norm_runs

    def run(fused, threads=2):
        monkeypatch.setattr(cpu_kernels, "threads", lambda: threads)
        monkeypatch.setattr(cpu_kernels, "head_norm_runs", runs if fused else lambda *a: False)
        head.clear_gradients()
        out = head(tokens, *grid)
        loss = (out * out).mean()
        (dx,) = paddle.grad([loss], [tokens], retain_graph=True)
        loss.backward()
        return dict(zip(names, [out.numpy(), dx.numpy()] + [p.grad.numpy() for p in head.parameters()]))

    calls = []
    original = kernels.pcm_head_norm
    monkeypatch.setattr(kernels, "pcm_head_norm", lambda *args: calls.append(1) or original(*args), raising=False)
    fused = run(True)
    assert len(calls) == 2  # both conv blocks
    plain = run(False)
    for name in names:
        if name.endswith("0.bias") or name == "conv1.0.weight":  # biases: ~0 under GroupNorm
            np.testing.assert_allclose(fused[name], plain[name], rtol=1e-5, atol=1e-7 * max(1, np.abs(plain[name]).max()))
        else:
            np.testing.assert_array_equal(fused[name], plain[name], err_msg=name)
    for threads in (1, 3):
        for name, value in run(True, threads).items():
            np.testing.assert_array_equal(value, fused[name], err_msg=name)


@pytest.mark.parametrize("n", [7, 16, 256])
def test_layer_norm_matches_paddles_forward_and_gradient(kernels, n):
    """SD3's LayerNorm (no weight or bias): output and input gradient within a few ulp of Paddle's, the same bits
    for any thread count."""
    rng = np.random.default_rng(n)
    x = paddle.to_tensor((rng.standard_normal((2, 61, n)) * 3 + 1).astype("float32"))
    results = [kernels.pcm_layer_norm(x, 1e-6, threads)[0].numpy() for threads in (1, 2, 3)]
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])
    np.testing.assert_allclose(results[0], F.layer_norm(x, [n], epsilon=1e-6).numpy(), rtol=1e-5, atol=2e-6)
    x.stop_gradient = False
    grad_out = paddle.to_tensor(rng.standard_normal(x.shape).astype("float32"))
    (fast,) = paddle.grad([cpu_kernels.layer_norm(x, 1e-6)], [x], [grad_out])
    (plain,) = paddle.grad([F.layer_norm(x, [n], epsilon=1e-6)], [x], [grad_out])
    np.testing.assert_allclose(fast.numpy(), plain.numpy(), rtol=1e-5, atol=2e-6)
    assert np.abs(fast.numpy()).max() > 0.1


def test_sd3_layers_use_the_kernels_on_cpu(kernels):
    """paddle_compat routes nn.LayerNorm without weight and bias, and ppdiffusers' GELU(tanh), through the kernels;
    LayerNorms with an affine part and exact GELU stay Paddle's."""
    from ppdiffusers.models.activations import GELU

    x = paddle.to_tensor(np.random.default_rng(5).standard_normal((2, 9, 32)).astype("float32"))
    bare, affine = paddle.nn.LayerNorm(32, epsilon=1e-6, weight_attr=False, bias_attr=False), paddle.nn.LayerNorm(32)
    np.testing.assert_array_equal(bare(x).numpy(), kernels.pcm_layer_norm(x, 1e-6, cpu_kernels.threads())[0].numpy())
    np.testing.assert_array_equal(affine(x).numpy(), F.layer_norm(x, [32], affine.weight, affine.bias).numpy())
    tanh, exact = GELU(32, 32, approximate="tanh"), GELU(32, 32)
    np.testing.assert_array_equal(tanh.gelu(x).numpy(), kernels.pcm_gelu_tanh(x, cpu_kernels.threads()).numpy())
    np.testing.assert_array_equal(exact.gelu(x).numpy(), F.gelu(x).numpy())


def test_softmax_uses_the_kernel_only_for_cpu_float32(kernels):
    x64 = paddle.to_tensor(np.random.default_rng(2).standard_normal((5, 9)))
    np.testing.assert_array_equal(cpu_kernels.softmax(x64).numpy(), F.softmax(x64, axis=-1).numpy())
    x = _scores(8, 410, seed=3)
    np.testing.assert_array_equal(cpu_kernels.softmax(x).numpy(), kernels.pcm_softmax(x, cpu_kernels.threads()).numpy())
    transposed = x.reshape([8, 10, 41]).transpose([0, 2, 1])  # the kernel reads rows: a copy first if not contiguous
    np.testing.assert_allclose(cpu_kernels.softmax(transposed).numpy(), F.softmax(transposed, axis=-1).numpy(),
                               rtol=2e-6, atol=2e-28)


def test_attention_with_the_kernel_matches_paddles_softmax(kernels, monkeypatch):
    rng = np.random.default_rng(4)
    q, k, v = (paddle.to_tensor(rng.standard_normal((2, 154, 4, 16)).astype("float32")) for _ in range(3))
    fast = paddle_compat.math_attention(q, k, v).numpy()
    monkeypatch.setitem(cpu_kernels._LOADED, "module", None)
    plain = paddle_compat.math_attention(q, k, v).numpy()
    np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(fast, plain)  # the kernel did run: its exp rounds differently


def _attention_exact(q, k, v, scale, grad_out):
    """Attention and its gradients in float64 numpy (``[batch, tokens, heads, dim]``)."""
    q, k, v, g = (t.astype("float64").transpose(0, 2, 1, 3) for t in (q, k, v, grad_out))
    p = _exact(scale * q @ k.transpose(0, 1, 3, 2))
    out = p @ v
    dp = g @ v.transpose(0, 1, 3, 2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    grads = (scale * ds @ k, scale * ds.transpose(0, 1, 3, 2) @ q, p.transpose(0, 1, 3, 2) @ g)
    return [t.transpose(0, 2, 1, 3) for t in (out, *grads)]


# query blocks of 64 rows: fewer, exactly one, one more; keys of other lengths; head widths of SD3 and odd ones
ATTENTION_SHAPES = [(2, 218, 218, 4, 8), (1, 64, 64, 2, 32), (3, 65, 7, 3, 24), (1, 1, 130, 1, 64), (2, 410, 410, 8, 32)]


@pytest.mark.parametrize("shape", ATTENTION_SHAPES)
def test_fused_attention_matches_the_exact_one_and_does_not_depend_on_threads(kernels, shape):
    """Output and the three gradients against float64, within fp32 roundoff; the same bits for 1, 2 or 3 threads;
    the backward needs no ``tokens x tokens`` tensor from the forward (it recomputes the probabilities)."""
    if not cpu_kernels.has_fused_attention():
        pytest.skip("Paddle ships no MKL here: no fused attention (paddle_compat.math_attention runs)")
    batch, queries, keys, heads, dim = shape
    rng = np.random.default_rng(queries)
    arrays = [rng.standard_normal((batch, n, heads, dim)).astype("float32") * 2 for n in (queries, keys, keys)]
    grad_out = rng.standard_normal((batch, queries, heads, dim)).astype("float32")
    scale = dim ** -0.5
    results = []
    for threads in (1, 2, 3):
        q, k, v = (paddle.to_tensor(a, stop_gradient=False) for a in arrays)
        out, _ = kernels.pcm_attention(q, k, v, scale, threads)
        grads = paddle.grad(out, [q, k, v], paddle.to_tensor(grad_out))
        results.append([t.numpy() for t in (out, *grads)])
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            np.testing.assert_array_equal(a, b)
    for fast, exact in zip(results[0], _attention_exact(*arrays, scale, grad_out)):
        np.testing.assert_allclose(fast, exact, rtol=1e-4, atol=2e-5 * np.abs(exact).max())


# x, output width, bias, whether x needs a gradient
LINEAR_CASES = [((2, 154, 64), 96, True, True), ((2, 64, 96), 256, False, True), ((2, 154, 64), 64, True, False),
                ((2, 6), 12, True, True)]


@pytest.mark.parametrize("case", LINEAR_CASES)
def test_compiled_linear_layers_give_the_bits_of_frozen_linears_nodes(kernels, case):
    """cpu_kernels.lora_linear and cpu_kernels.frozen_linear: the output and every gradient (input, LoRA A and B)
    bit for bit as frozen_linear's LoraLinear and FrozenWeightLinear nodes, whose ops they run."""
    import frozen_linear

    if not cpu_kernels.has_fused_attention():
        pytest.skip("Paddle ships no MKL here: no compiled linear")
    shape, width, with_bias, input_grad = case
    rng = np.random.default_rng(width)

    def tensor(*dims, trains=False):
        return paddle.to_tensor(rng.standard_normal(dims).astype("float32") * 0.3, stop_gradient=not trains)

    x = tensor(*shape, trains=input_grad)
    weight, bias = tensor(shape[-1], width), tensor(width) if with_bias else None
    lora_a, lora_b = tensor(shape[-1], 4, trains=True), tensor(4, width, trains=True)
    grad_out = tensor(*shape[:-1], width)

    def run(layer, *args):
        out = layer(*args)
        inputs = [t for t in (x, lora_a, lora_b) if not t.stop_gradient and any(t is a for a in args)]
        return [out.numpy()] + [g.numpy() for g in paddle.grad([out], inputs, [grad_out])]

    pairs = [(run(cpu_kernels.lora_linear, x, weight, bias, lora_a, lora_b, 0.25),
              run(frozen_linear.LoraLinear.apply, x, weight, bias, lora_a, lora_b, 0.25))]
    if input_grad:
        node_args = (x, weight) if bias is None else (x, weight, bias)
        pairs.append((run(cpu_kernels.frozen_linear, x, weight, bias), run(frozen_linear.FrozenWeightLinear.apply, *node_args)))
    for compiled, node in pairs:
        assert len(compiled) == len(node)
        for a, b in zip(compiled, node):
            np.testing.assert_array_equal(a, b)


# image and context tokens: SD3's at 128 px (64 + 154), query blocks across the parts' border, one-token parts
JOINT_SHAPES = [(2, 64, 154, 4, 8), (1, 70, 9, 2, 24), (2, 1, 1, 3, 16)]


@pytest.mark.parametrize("shape", JOINT_SHAPES)
def test_joint_attention_gives_the_bits_of_the_attention_on_the_concatenation(kernels, shape):
    """cpu_kernels.joint_attention on the image and context parts: the same output and gradients, bit for bit, as
    the fused attention on the concatenated tokens followed by the split, also when no gradient reaches the context
    output (SD3's last block drops it), and for 1, 2 or 3 threads."""
    if not cpu_kernels.has_fused_attention():
        pytest.skip("Paddle ships no MKL here: no fused attention")
    batch, image, context, heads, dim = shape
    rng = np.random.default_rng(image)
    width = heads * dim  # the parts as projected: [batch, tokens, heads * head_dim]
    arrays = [rng.standard_normal((batch, n, width)).astype("float32") for n in (image,) * 3 + (context,) * 3]
    grad_image, grad_context = (paddle.to_tensor(rng.standard_normal((batch, n, width)).astype("float32"))
                                for n in (image, context))
    scale = dim ** -0.5

    def run(joint, threads, context_used=True):
        parts = [paddle.to_tensor(a, stop_gradient=False) for a in arrays]
        if joint:
            out_image, out_context, _ = kernels.pcm_joint_attention(*parts, heads, scale, threads)
        else:
            qkv = (paddle.concat([parts[i], parts[i + 3]], axis=1).reshape([batch, -1, heads, dim]) for i in range(3))
            out = kernels.pcm_attention(*qkv, scale, threads)[0].reshape([batch, -1, width])
            out_image, out_context = out[:, :image], out[:, image:]
        outputs, grads = ([out_image, out_context], [grad_image, grad_context]) if context_used else ([out_image], [grad_image])
        return [t.numpy() for t in (out_image, out_context, *paddle.grad(outputs, parts, grads))]

    expected = run(False, 2)
    for threads in (1, 2, 3):
        for got, want in zip(run(True, threads), expected):
            np.testing.assert_array_equal(got, want)
    for got, want in zip(run(True, 2, context_used=False), run(False, 2, context_used=False)):
        np.testing.assert_array_equal(got, want)


def test_sd3_blocks_run_the_joint_attention(kernels, tiny_sd3, monkeypatch):
    """The SD3 transformer's blocks call cpu_kernels.joint_attention (on CPU float32), with the same output as with
    it switched off (concatenation, the fused attention, split)."""
    if not cpu_kernels.has_fused_attention():
        pytest.skip("Paddle ships no MKL here: no fused attention")
    from sd35_transformer import load_transformer

    transformer = load_transformer(tiny_sd3)
    config = transformer.config
    rng = np.random.default_rng(3)
    inputs = dict(hidden_states=paddle.to_tensor(rng.standard_normal((2, config.in_channels, 8, 8)).astype("float32")),
                  timestep=paddle.to_tensor([500.0, 20.0]),
                  encoder_hidden_states=paddle.to_tensor(rng.standard_normal((2, 154, config.joint_attention_dim)).astype("float32")),
                  pooled_projections=paddle.to_tensor(rng.standard_normal((2, config.pooled_projection_dim)).astype("float32")))
    calls = []
    joint = cpu_kernels.joint_attention
    monkeypatch.setattr(cpu_kernels, "joint_attention", lambda *args: calls.append(1) or joint(*args))
    with paddle.no_grad():
        fast = transformer(**inputs).sample.numpy()
        assert len(calls) == config.num_layers
        monkeypatch.setattr(cpu_kernels, "joint_attention_runs", lambda *parts: False)
        plain = transformer(**inputs).sample.numpy()
    assert len(calls) == config.num_layers
    np.testing.assert_array_equal(fast, plain)


def test_sd3_attention_uses_the_fused_kernel_only_where_it_applies(kernels):
    """paddle_compat's scaled_dot_product_attention_ runs the fused kernel for CPU float32 without mask, causality
    or dropout (SD3's joint attention), and math_attention otherwise."""
    if not cpu_kernels.has_fused_attention():
        pytest.skip("Paddle ships no MKL here: no fused attention")
    rng = np.random.default_rng(6)
    q, k, v = (paddle.to_tensor(rng.standard_normal((2, 80, 2, 24)).astype("float32")) for _ in range(3))
    sdpa = paddle_compat.scaled_dot_product_attention_
    fused = kernels.pcm_attention(q, k, v, 24 ** -0.5, cpu_kernels.threads())[0].numpy()
    np.testing.assert_array_equal(sdpa(q, k, v).numpy(), fused)
    plain = paddle_compat.math_attention(q, k, v).numpy()
    np.testing.assert_allclose(fused, plain, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(fused, plain)  # so the comparisons below tell the two apart
    np.testing.assert_array_equal(sdpa(q, k, v, is_causal=True).numpy(),
                                  paddle_compat.math_attention(q, k, v, is_causal=True).numpy())
    np.testing.assert_array_equal(sdpa(q, k, v, attention_op="math").numpy(), plain)
    q64, k64, v64 = (t.astype("float64") for t in (q, k, v))
    np.testing.assert_array_equal(sdpa(q64, k64, v64).numpy(), paddle_compat.math_attention(q64, k64, v64).numpy())


def test_text_encoders_use_the_kernel_softmax_and_an_exact_square(kernels):
    """ppdiffusers' CLIP and T5 modules see cpu_kernels.softmax as their functional softmax; T5LayerNorm squares
    exactly (Paddle's pow(2) is off by an ulp for some inputs; PyTorch's pow(2), the reference's, is exact)."""
    from ppdiffusers.transformers.clip import modeling as clip_modeling
    from ppdiffusers.transformers.t5 import modeling as t5_modeling

    scores = _scores(6, 77, seed=11)
    expected = kernels.pcm_softmax(scores, cpu_kernels.threads()).numpy()
    np.testing.assert_array_equal(clip_modeling.F.softmax(scores, axis=-1).numpy(), expected)
    np.testing.assert_array_equal(t5_modeling.nn.functional.softmax(scores, axis=-1).numpy(), expected)
    np.testing.assert_array_equal(clip_modeling.F.softmax(scores, axis=0).numpy(), F.softmax(scores, axis=0).numpy())
    norm = t5_modeling.T5LayerNorm(64)
    x = np.random.default_rng(12).standard_normal((2, 7, 64)).astype("float32")
    squares = (x * x).mean(-1, keepdims=True, dtype="float32")  # numpy: the exact square, then Paddle's mean below
    variance = paddle.to_tensor(x * x).mean(-1, keepdim=True)
    np.testing.assert_allclose(variance.numpy(), squares, rtol=1e-6)
    expected = (paddle.to_tensor(x) * paddle.rsqrt(variance + 1e-6)).numpy()
    np.testing.assert_array_equal(norm(paddle.to_tensor(x)).numpy(), expected)


# CLIP's causal mask (per sample, shared by the heads), T5's position bias (shared by the batch), a full bias
BIAS_CASES = [("causal", (2, 77, 77, 4, 16), (2, 1)), ("position", (2, 77, 77, 4, 8), (1, 4)),
              ("full", (3, 65, 130, 2, 8), (3, 2)), ("one", (1, 1, 7, 1, 24), (1, 1))]


@pytest.mark.parametrize("case", BIAS_CASES, ids=[c[0] for c in BIAS_CASES])
def test_attention_with_bias_matches_the_exact_one_and_does_not_depend_on_threads(kernels, case):
    """softmax(scale q k^T + bias) v with the bias broadcast over batch or heads: within fp32 roundoff of float64
    (a causal mask of the dtype's minimum gives exact zeros above the diagonal), the same bits for 1, 2, 3 threads."""
    if not cpu_kernels.has_fused_attention():
        pytest.skip("Paddle ships no MKL here: no fused attention")
    name, (batch, queries, keys, heads, dim), (bias_batch, bias_heads) = case
    rng = np.random.default_rng(queries + keys)
    q, k, v = (rng.standard_normal((batch, n, heads, dim)).astype("float32") * 2 for n in (queries, keys, keys))
    if name == "causal":
        bias = np.triu(np.full((bias_batch, 1, queries, keys), np.finfo(np.float32).min, "float32"), 1)
    else:
        bias = rng.standard_normal((bias_batch, bias_heads, queries, keys)).astype("float32") * 3
    scale = 0.3
    scores = scale * np.einsum("bqhd,bkhd->bhqk", q.astype("float64"), k.astype("float64")) + bias
    exact = np.einsum("bhqk,bkhd->bqhd", _exact(scores), v.astype("float64"))
    inputs = [paddle.to_tensor(a) for a in (q, k, v, bias)]
    results = [kernels.pcm_attention_with_bias(*inputs, scale, threads).numpy() for threads in (1, 2, 3)]
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])
    np.testing.assert_allclose(results[0], exact, rtol=1e-4, atol=2e-5 * np.abs(exact).max())
    np.testing.assert_array_equal(cpu_kernels.attention_with_bias(*inputs, scale).numpy(), results[0])
    if name == "causal":  # the first query sees only the first key
        np.testing.assert_array_equal(results[0][:, 0], v[:, 0])


def test_text_encoders_run_the_fused_attention_without_gradients(kernels, tiny_sd3, monkeypatch):
    """The tiny teacher's CLIP and T5 encoders: without gradients their attention runs attention_with_bias (2 + 2
    CLIP layers, 2 T5 layers) and agrees with ppdiffusers' own within fp32 roundoff (here: bit for bit, the same
    products and the same softmax code); with gradients to compute it
    is ppdiffusers' own, bit for bit. CLIP's causal mask is built once per shape and equals upstream's."""
    if not cpu_kernels.has_fused_attention():
        pytest.skip("Paddle ships no MKL here: no fused attention")
    from ppdiffusers.transformers.clip import modeling as clip_modeling
    from ppdiffusers.transformers.t5 import modeling as t5_modeling
    from sd3_text_encoding import _token_ids, load_tokenizers_and_text_encoders

    tokenizers, encoders = load_tokenizers_and_text_encoders(tiny_sd3)
    prompts = ["a red cube on a wooden table", "two dogs"]
    ids = [_token_ids(tokenizer, prompts) for tokenizer in tokenizers]

    def encode():
        clip = [encoder(i, output_hidden_states=True) for encoder, i in zip(encoders[:2], ids[:2])]
        outs = [t for out in clip for t in (out[0], out.hidden_states[-2])] + [encoders[2](ids[2])[0]]
        return [t.numpy() for t in outs]

    calls = []
    fused = cpu_kernels.attention_with_bias
    monkeypatch.setattr(cpu_kernels, "attention_with_bias", lambda *a: calls.append(a[3].shape) or fused(*a))
    with paddle.no_grad():
        fast = encode()
    t5_heads = encoders[2].config.num_heads
    assert [list(shape) for shape in calls] == [[2, 1, 77, 77]] * 4 + [[2, t5_heads, 77, 77]] * 2  # causal; bias
    trained = encode()  # the encoders' weights take gradients here: ppdiffusers' own attention
    assert len(calls) == 6
    upstream = paddle_compat._UPSTREAM_TEXT_ATTENTION
    monkeypatch.setattr(clip_modeling.CLIPAttention, "forward", upstream["clip"])
    monkeypatch.setattr(t5_modeling.T5Attention, "forward", upstream["t5"])
    with paddle.no_grad():
        plain = encode()
    for a, b, c in zip(fast, plain, trained):
        np.testing.assert_array_equal(c, b)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
    text_model = encoders[0].text_model
    mask = text_model._build_causal_attention_mask(3, 9, paddle.float32)
    assert text_model._build_causal_attention_mask(3, 9, paddle.float32) is mask
    np.testing.assert_array_equal(mask.numpy(), upstream["clip_mask"](text_model, 3, 9, paddle.float32).numpy())


def test_t5_gelu_cubes_exactly(kernels):
    """T5's gelu_new cubes by multiplying, as PyTorch's pow(x, 3) does (Paddle's pow is off by an ulp for some)."""
    from paddlenlp.transformers.activations import ACT2FN

    x = np.random.default_rng(14).standard_normal((2, 7, 64)).astype("float32") * 3
    cubes = paddle.to_tensor(x * x * x)  # numpy: float32 products, rounded after each
    t = paddle.to_tensor(x)
    expected = 0.5 * t * (1.0 + paddle.tanh(float(np.sqrt(2.0 / np.pi)) * (t + 0.044715 * cubes)))
    np.testing.assert_array_equal(ACT2FN["gelu_new"](t).numpy(), expected.numpy())
    assert not np.array_equal(paddle.pow(t, 3.0).numpy(), cubes.numpy())  # what the multiply is for


@pytest.mark.parametrize("shape", [(2, 410, 256), (3, 7, 20), (1, 1, 5), (2, 154, 1536)])
def test_factor_multiply_gives_paddles_products_and_gradients(kernels, shape):
    """x [B, N, D] * factor [B, 1, D] and both gradients: Paddle's multiply (broadcast) bit for bit, for any thread
    count; the factor's gradient is the sum over N in order, as Paddle sums that axis."""
    rng = np.random.default_rng(sum(shape))
    x_np, factor_np = rng.standard_normal(shape).astype("float32"), rng.standard_normal((shape[0], 1, shape[2]))
    grad_np = rng.standard_normal(shape).astype("float32")

    def run(fn):
        x, factor = paddle.to_tensor(x_np, stop_gradient=False), paddle.to_tensor(factor_np.astype("float32"),
                                                                                  stop_gradient=False)
        out = fn(x, factor)
        grads = paddle.grad(out, [x, factor], paddle.to_tensor(grad_np))
        return [t.numpy() for t in (out, *grads)]

    expected = run(paddle.multiply)
    for threads in (1, 2, 3):
        for got, want in zip(run(lambda x, f: kernels.pcm_factor_multiply(x, f, threads)), expected):
            np.testing.assert_array_equal(got, want)
    assert cpu_kernels.factor_multiply_runs(paddle.to_tensor(x_np), paddle.to_tensor(factor_np.astype("float32")))
    assert not cpu_kernels.factor_multiply_runs(paddle.to_tensor(x_np), paddle.to_tensor(x_np[:, :, :1]))


@pytest.mark.parametrize("case", [((2, 410, 256), 256, 256), ((2, 256, 256), 256, 1024), ((2, 32), 32, 192),
                                  ((3, 5, 7), 7, 9)])
def test_no_grad_linear_gives_paddles_bits(kernels, case):
    """cpu_kernels.linear: x @ W, + b, and a LoRA layer's + ((x @ A) @ B) * s as Paddle's matmul, add and scale ops
    compute them, bit for bit; it runs only where no gradient is needed."""
    if not cpu_kernels.has_fused_attention():
        pytest.skip("Paddle ships no MKL here: no compiled linear")
    shape, k, n = case
    rng = np.random.default_rng(k + n)
    x, w, b, a = (paddle.to_tensor(rng.standard_normal(s).astype("float32")) for s in (shape, (k, n), (n,), (k, 4)))
    lora_b = paddle.to_tensor(rng.standard_normal((4, n)).astype("float32") * 0.05)
    with paddle.no_grad():
        assert cpu_kernels.linear_runs(x, w, b, a, lora_b)
        np.testing.assert_array_equal(cpu_kernels.linear(x, w).numpy(), paddle.matmul(x, w).numpy())
        np.testing.assert_array_equal(cpu_kernels.linear(x, w, b).numpy(), (paddle.matmul(x, w) + b).numpy())
        lora = (paddle.matmul(x, w) + b).add_(paddle.matmul(paddle.matmul(x, a), lora_b).scale_(2.0))
        np.testing.assert_array_equal(cpu_kernels.linear(x, w, b, a, lora_b, 2.0).numpy(), lora.numpy())
    w.stop_gradient = False
    assert not cpu_kernels.linear_runs(x, w, b) and cpu_kernels.linear_runs(x, w.detach(), b)


@pytest.mark.parametrize("shape", [(2, 256, 256), (4, 154, 32), (1, 3, 20)])
def test_layer_norm_modulate_gives_the_ops_bits(kernels, shape, monkeypatch):
    """LayerNorm without weight and bias, times 1 + scale, plus shift, as one op: the bits of cpu_kernels.layer_norm
    and frozen_ops' modulation (as the trainer ran them), for any thread count; with gradients (scale and shift
    trained, or frozen) the same gradients, bit for bit."""
    import frozen_ops

    monkeypatch.setattr(frozen_ops, "ENABLED", True)
    rng = np.random.default_rng(shape[1])
    arrays = [rng.standard_normal(s).astype("float32") for s in (shape, (shape[0], shape[2]), (shape[0], shape[2]))]
    grad_out = paddle.to_tensor(rng.standard_normal(shape).astype("float32"))
    x, scale, shift = (paddle.to_tensor(a) for a in arrays)
    expected = frozen_ops.modulate(cpu_kernels.layer_norm(x, 1e-6), scale, shift).numpy()
    for threads in (1, 2, 3):
        np.testing.assert_array_equal(kernels.pcm_layer_norm_modulate(x, scale, shift, 1e-6, threads).numpy(), expected)
    for trained in (True, False):
        results = []
        for fused in (True, False):
            x, scale, shift = (paddle.to_tensor(a, stop_gradient=stop) for a, stop in zip(arrays, (False, not trained,
                                                                                                    not trained)))
            assert cpu_kernels.layer_norm_modulate_runs(x, scale, shift)
            out = (cpu_kernels.layer_norm_modulate(x, scale, shift, 1e-6) if fused
                   else frozen_ops.modulate(cpu_kernels.layer_norm(x, 1e-6), scale, shift))
            inputs = [x, scale, shift] if trained else [x]
            results.append([out.numpy()] + [g.numpy() for g in paddle.grad(out, inputs, grad_out)])
        for a, b in zip(*results):
            np.testing.assert_array_equal(a, b)
    x, scale, shift = (paddle.to_tensor(a) for a in arrays)
    scale.stop_gradient = False  # a trained scale with a frozen shift: not taken where gradients flow
    assert not cpu_kernels.layer_norm_modulate_runs(x, scale, shift)
    with paddle.no_grad():
        assert cpu_kernels.layer_norm_modulate_runs(x, scale, shift)


@pytest.mark.parametrize("shape", [(2, 256, 256), (3, 7, 20)])
def test_gated_residual_gives_the_ops_bits(kernels, shape, monkeypatch):
    """x + gate[:, None] * y as one op: the bits of frozen_ops' gated residual (as the trainer ran it), for any
    thread count; only where no gradient is needed."""
    import frozen_ops

    monkeypatch.setattr(frozen_ops, "ENABLED", True)
    rng = np.random.default_rng(shape[2])
    x, gate, y = (paddle.to_tensor(rng.standard_normal(s).astype("float32"))
                  for s in (shape, (shape[0], shape[2]), shape))
    expected = (x + frozen_ops.gated(gate, y)).numpy()
    for threads in (1, 2, 3):
        np.testing.assert_array_equal(kernels.pcm_gated_residual(x, gate, y, threads).numpy(), expected)
    np.testing.assert_array_equal(frozen_ops.gated_residual(x, gate, y).numpy(), expected)
    y.stop_gradient = False
    assert not cpu_kernels.gated_residual_runs(x, gate, y)
    with paddle.no_grad():
        assert cpu_kernels.gated_residual_runs(x, gate, y)


def test_softmax_of_masked_scores_has_no_subnormal_probabilities(kernels):
    """Probabilities below the smallest normal float are 0 (a causal mask's -inf entries, far-off scores): MKL's
    matmul of the probabilities would otherwise run many times slower."""
    x = _scores(64, 77, seed=13).numpy()
    x[:, 40:] = -np.inf
    x[:, 20] -= 200.0
    probs = kernels.pcm_softmax(paddle.to_tensor(x), 1).numpy()
    assert np.all(probs[:, 40:] == 0) and np.all(probs[probs > 0] >= np.finfo(np.float32).tiny)
    np.testing.assert_allclose(probs.sum(-1), np.ones(64), rtol=1e-6)


def test_add_bias_adds_in_place_with_paddles_sums(kernels):
    """cpu_kernels.add_bias: the bits of Paddle's broadcast add, written into the product itself from 32k elements
    (row lengths around the vector width), into a new tensor below that and for other dtypes."""
    rng = np.random.default_rng(8)
    for n in (1, 15, 16, 17, 256):
        rows = cpu_kernels.MIN_BIAS_KERNEL_ELEMENTS // n + 3
        for shape in ((rows, n), (3, 5, n)):
            x, bias = rng.standard_normal(shape).astype("float32"), rng.standard_normal(n).astype("float32")
            out = paddle.to_tensor(x)
            result = cpu_kernels.add_bias(out, paddle.to_tensor(bias))
            np.testing.assert_array_equal(result.numpy(), (paddle.to_tensor(x) + paddle.to_tensor(bias)).numpy())
            assert np.array_equal(out.numpy(), result.numpy()) == (len(shape) == 2)  # in place from 32k elements
    x64 = paddle.to_tensor(rng.standard_normal((4, 3)))
    np.testing.assert_array_equal(cpu_kernels.add_bias(x64, paddle.ones([3], "float64")).numpy(), x64.numpy() + 1)


# (batch, in, out, size, kernel, stride, (top, bottom, left, right)): the VAE's 3x3 convolutions, its downsampling
# (stride 2, padding (0, 1, 0, 1)), conv_in (3 channels), 1x1, odd sizes and channel counts around the 8-channel blocks
CONVOLUTIONS = [(2, 8, 8, 64, 3, 1, (1, 1, 1, 1)), (2, 8, 8, 64, 3, 2, (0, 1, 0, 1)), (1, 3, 8, 40, 3, 1, (1, 1, 1, 1)),
                (2, 8, 32, 16, 3, 1, (1, 1, 1, 1)), (1, 5, 11, 17, 3, 2, (1, 1, 1, 1)), (2, 8, 8, 33, 1, 1, (0, 0, 0, 0)),
                (3, 4, 20, 9, 5, 3, (2, 1, 0, 3)), (1, 128, 9, 6, 3, 1, (1, 1, 1, 1))]


@pytest.mark.parametrize("case", CONVOLUTIONS)
def test_conv2d_matches_paddles_and_does_not_depend_on_threads(kernels, case):
    """The direct convolution against Paddle's (same bits here: both sum (channel, ky, kx) in order with fused
    multiply-adds; at most fp32 roundoff in general), with and without bias, for 1, 2 or 3 threads."""
    batch, cin, cout, size, k, stride, pads = case
    rng = np.random.default_rng(cin * size)
    x = paddle.to_tensor(rng.standard_normal((batch, cin, size, size)).astype("float32"))
    w = paddle.to_tensor(rng.standard_normal((cout, cin, k, k)).astype("float32"))
    b = paddle.to_tensor(rng.standard_normal(cout).astype("float32"))
    padding = [[0, 0], [0, 0], list(pads[:2]), list(pads[2:])]
    for bias in (b, None):
        expected = F.conv2d(x, w, bias, stride=stride, padding=padding).numpy()
        results = [kernels.pcm_conv2d(x, w, bias, stride, stride, *pads, threads).numpy() for threads in (1, 2, 3)]
        for other in results[1:]:
            np.testing.assert_array_equal(other, results[0])
        np.testing.assert_allclose(results[0], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("shape, groups", [((2, 256, 16, 16), 32), ((3, 8, 5, 7), 4), ((2, 32, 17), 32)])
def test_affine_group_norm_and_its_gradients_match_paddles(kernels, shape, groups):
    """GroupNorm with weight and bias (the VAE's, the discriminator heads'): output and the gradients of the input,
    weight and bias against Paddle's within fp32 roundoff; the same bits for 1, 2 or 3 threads."""
    rng = np.random.default_rng(shape[1])
    arrays = [rng.standard_normal(shape).astype("float32") * 3 + 1] + [
        rng.standard_normal(shape[1]).astype("float32") for _ in range(2)]
    grad_out = paddle.to_tensor(rng.standard_normal(shape).astype("float32"))
    results = []
    for threads in (1, 2, 3, None):
        x, w, b = (paddle.to_tensor(a, stop_gradient=False) for a in arrays)
        if threads is None:
            out = F.group_norm(x, groups, 1e-5, w, b)
        else:
            out = kernels.pcm_affine_group_norm(x, w, b, groups, 1e-5, threads)[0]
        results.append([t.numpy() for t in (out, *paddle.grad(out, [x, w, b], grad_out))])
    for other in results[1:3]:
        for a, b in zip(other, results[0]):
            np.testing.assert_array_equal(a, b)
    for fast, plain in zip(results[0], results[3]):
        np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=2e-6 * np.abs(plain).max())


def test_vae_layers_use_the_kernels_without_gradients(kernels):
    """Conv2D (up to 128 input channels x 3 x 3) and SiLU run the forward-only kernels in no-grad passes on CPU
    float32, and Paddle's ops when a gradient flows (the discriminator heads train their convolutions) or inside
    forward_only_kernels_off (a no-grad forward that backward recomputes); an affine GroupNorm runs its kernel
    (forward and backward) always, the forward-only one (no affine) under the same rule as the convolution."""
    rng = np.random.default_rng(9)
    x = paddle.to_tensor(rng.standard_normal((2, 8, 12, 12)).astype("float32"))
    conv, norm = paddle.nn.Conv2D(8, 16, 3, padding=1), paddle.nn.GroupNorm(4, 8)
    norm.weight.set_value(paddle.to_tensor(rng.standard_normal(8).astype("float32")))
    with paddle.no_grad():
        np.testing.assert_array_equal(conv(x).numpy(),
                                      kernels.pcm_conv2d(x, conv.weight, conv.bias, 1, 1, 1, 1, 1, 1,
                                                         cpu_kernels.threads()).numpy())
        fast_norm = norm(x).numpy()
        np.testing.assert_array_equal(fast_norm, kernels.pcm_group_norm(x, norm.weight, norm.bias, 4, 1e-5,
                                                                        cpu_kernels.threads())[0].numpy())
        fast_silu = paddle.nn.Silu()(x).numpy()
        np.testing.assert_array_equal(fast_silu, kernels.pcm_silu(x, cpu_kernels.threads()).numpy())
    plain_norm = F.group_norm(x, 4, 1e-5, norm.weight, norm.bias).numpy()
    np.testing.assert_allclose(fast_norm, plain_norm, rtol=1e-5, atol=2e-6)
    bare = paddle.nn.GroupNorm(4, 8, weight_attr=False, bias_attr=False)
    with paddle.no_grad():
        np.testing.assert_array_equal(bare(x).numpy(), kernels.pcm_group_norm(x, None, None, 4, 1e-5, 1)[0].numpy())
    np.testing.assert_allclose(bare(x).numpy(), F.group_norm(x, 4, 1e-5).numpy(), rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(fast_silu, F.silu(x).numpy(), rtol=2e-6, atol=1e-7)
    with paddle.no_grad(), cpu_kernels.forward_only_kernels_off():  # a forward that backward recomputes
        np.testing.assert_array_equal(paddle.nn.Silu()(x).numpy(), F.silu(x).numpy())
        np.testing.assert_array_equal(conv(x).numpy(), F.conv2d(x, conv.weight, conv.bias, padding=1).numpy())
        np.testing.assert_array_equal(norm(x).numpy(), fast_norm)  # the affine kernel has a backward: it stays
    x.stop_gradient = False  # a gradient to compute: Paddle's convolution and SiLU, which record it
    for layer in (conv, norm, paddle.nn.Silu()):
        assert not layer(x).stop_gradient
    np.testing.assert_array_equal(norm(x).numpy(), fast_norm)


def test_vae_attention_runs_the_fused_kernel(kernels):
    """ppdiffusers' AttnProcessor (the VAE's mid-block on CPU) runs AttnProcessor2_5's path, i.e. the fused
    attention; the VAE encoding agrees with the plain processor within fp32 roundoff."""
    if not cpu_kernels.has_fused_attention():
        pytest.skip("Paddle ships no MKL here: no fused attention")
    from ppdiffusers.models.attention_processor import Attention

    attn = Attention(8, heads=1, dim_head=8, norm_num_groups=4, residual_connection=True, bias=True,
                     upcast_softmax=True, _from_deprecated_attn_block=True)
    attn.eval()
    x = paddle.to_tensor(np.random.default_rng(10).standard_normal((2, 8, 6, 6)).astype("float32"))
    with paddle.no_grad():
        fast = attn(x).numpy()
        plain = paddle_compat._UPSTREAM_ATTN_PROCESSOR_CALL(attn.processor, attn, x).numpy()
    np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(fast, plain)


PROBE = textwrap.dedent("""
    import sys, warnings
    sys.path.insert(0, {repo!r})
    import paddle_compat, paddle, paddle.nn.functional as F, cpu_kernels
    x = paddle.randn([4, 410])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        same = bool((cpu_kernels.softmax(x) == F.softmax(x, axis=-1)).all())
    print(cpu_kernels.kernels() is None, same, [str(w.message) for w in caught if "cpu_kernels" in str(w.message)])
""")


@pytest.mark.parametrize("case", ["switched_off", "no_compiler"])
def test_without_the_kernel_paddles_softmax_runs(tmp_path, case):
    """PCM_CPU_KERNELS=0: Paddle's softmax, silently. No working compiler (an empty extension folder): one warning
    naming the switch, then Paddle's softmax (and its other ops)."""
    env = dict(os.environ, PADDLE_EXTENSION_DIR=str(tmp_path / "extensions"))
    if case == "switched_off":
        env["PCM_CPU_KERNELS"] = "0"
    else:
        env.pop("PCM_CPU_KERNELS", None)
        env.update(CC="/bin/false", CXX="/bin/false")
    out = subprocess.run([sys.executable, "-c", PROBE.format(repo=REPO)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    missing, same, warned = out.stdout.strip().splitlines()[-1].split(" ", 2)
    assert missing == "True" and same == "True"
    if case == "switched_off":
        assert warned == "[]"
    else:
        assert "could not build the fast CPU kernels" in warned and "PCM_CPU_KERNELS=0" in warned


def test_each_cpu_fast_path_keeps_the_results_it_claims(tiny_sd3):
    """scripts/benchmark_cpu_paths.py on the tiny teacher: switching the bias, padding, AdaLN-factor, gated-residual,
    no-grad linear, plain-head, joint-attention, head-norm and compiled-linear paths off changes no bit of the prompt embeddings, the VAE latents, the teacher's
    CFG output, the G step's loss and LoRA gradients; the compiled kernels, the fused LoRA node with gradients, the
    fused LayerNorm modulation (on the G step) and the text encoders' fused attention change them only at fp32
    roundoff."""
    from benchmark_cpu_paths import main

    results = main(["--teacher", tiny_sd3, "--resolution", "64", "--reps", "1"])["results"]
    for path in ("conv_bias_and_pad", "linear_bias", "trainable_factor", "factor_kernel", "gated_residual",
                 "no_grad_linear", "plain_heads", "joint_attention", "head_norm", "compiled_linear"):
        for workload, result in results[path].items():
            assert result["equal"], (path, workload, result["max_difference"])
    fused = results["norm_modulate"]  # the same values; the trained factors' gradient terms added in another order
    assert all(fused[workload]["equal"] for workload in ("text_encode", "vae_encode", "teacher_cfg"))
    assert fused["g_step"]["max_difference"] < 1e-6, fused["g_step"]
    for path in ("cpu_kernels", "fused_attention"):
        for workload in ("teacher_cfg", "g_step"):
            compiled = results[path][workload]
            assert not compiled["equal"] and 0 < compiled["max_difference"] < 1e-4, (path, workload, compiled)
    fused = results["fused_lora_with_grad"]  # the same forward; the input's gradient terms summed in the node
    assert all(fused[workload]["equal"] for workload in ("text_encode", "vae_encode", "teacher_cfg"))
    assert not fused["g_step"]["equal"] and fused["g_step"]["max_difference"] < 1e-5, fused["g_step"]
    for workload, result in results["text_attention"].items():  # the same products and softmax code here
        assert result["max_difference"] < 1e-5, (workload, result)
