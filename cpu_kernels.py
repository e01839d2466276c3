"""Compiled CPU kernels where Paddle's own are slow: attention, softmax, GELU (tanh), LayerNorm without affine, a
frozen linear layer's bias, and the VAE's convolution, GroupNorm and SiLU.

- :func:`attention` (``paddle_compat``'s ``scaled_dot_product_attention_`` on CPU): Paddle has no fused attention on
  CPU, so attention was two batched matmuls around a softmax, with the ``[batch, heads, N, N]`` scores and
  probabilities written to memory and kept for backward. ``cpu_kernels.cc`` computes it as PyTorch's CPU flash
  attention does: per head, blocks of 64 queries, their scores and probabilities in a per-thread buffer that stays
  in cache, the products through Paddle's MKL ``sgemm`` on strided views of the ``[batch, tokens, heads, dim]``
  inputs (no transposes); backward recomputes the probabilities from each row's log-sum-exp. On the small benchmark
  teacher (``[4, 410, 8, 32]``, 2 threads) one attention takes 3.9 ms against 13 (softmax 6.1, the two matmuls 7)
  and PyTorch's 4.3, and its teacher forward 189 -> 112 ms (PyTorch: 96). It keeps q, k, v, the output and the
  log-sum-exp for backward instead of the probabilities. Built where Paddle ships MKL (x86).
- :func:`softmax` (``math_attention``, where the fused attention does not run): Paddle's CPU ``softmax`` is
  single-threaded scalar code (``[4, 8, 410, 410]``: 19 ms); vectorised (16-float GCC vectors, a polynomial
  ``exp``) and split over Paddle's own OpenMP threads: 5.7 ms forward (2 threads), 15 ms forward and backward
  against Paddle's 30.
- :func:`gelu_tanh` and :func:`layer_norm` (``paddle_compat``'s shim 10): GELU with the tanh approximation
  (``[2, 410, 1024]`` forward and backward: Paddle 10.0 ms, PyTorch 3.9) and the backward of the SD3 blocks'
  LayerNorms without weight and bias (``[2, 410, 256]``: Paddle 2.9 ms forward and backward, PyTorch 0.6).
- :func:`add_bias` (``frozen_ops.linear``): a frozen bias added into the matmul's product in place, the same sums
  without Paddle's broadcast kernel or another tensor.
- :func:`joint_attention` (``paddle_compat``'s shim 14): the SD3 blocks' attention from the image and context
  tokens' separate q, k, v into separate outputs, without the concatenations and the split around :func:`attention`
  (the same bits). :func:`head_norm` (``discriminator``): the heads' conv bias, GroupNorm and LeakyReLU as one op
  each way (Paddle's bits but for the conv bias's gradient's summation order).
- :func:`conv2d`, :func:`group_norm`, :func:`silu` (``paddle_compat``'s ``Conv2D``, ``GroupNorm`` and ``Silu``
  where no gradient flows: the VAE): Paddle's CPU convolution unfolds its input on one thread before a GEMM, its
  GroupNorm and SiLU are single-threaded. A direct convolution (output rows on the threads, 8 output channels x 16
  columns in vector accumulators) and forward-only GroupNorm and SiLU take the small teacher's VAE encode (256 px,
  batch 2) from 42.6 to 18.9 ms with the fused attention in its mid-block (PyTorch's whole VAE phase: 12.5).

Each function uses its kernel for CPU float32 tensors and falls back to Paddle's op everywhere else. The kernels
are built once per source, CPU model and Paddle version with ``paddle.utils.cpp_extension`` (about 20 s, under a
file lock so that ranks and test workers wait for one build; cached in Paddle's extension folder,
``PADDLE_EXTENSION_DIR`` or ``~/.cache/paddle_extensions``). Where they cannot be built (no C++ compiler), one
warning says so and Paddle's ops are used. ``PCM_CPU_KERNELS=0`` uses Paddle's ops always.

Results are not Paddle's bit for bit (fp32 roundoff: the softmax is within 1e-6 relative of the exact one, GELU
and LayerNorm within a few ulp of Paddle's, attention and its gradients within fp32 roundoff of float64; tested;
the bias is Paddle's sum exactly), and the kernels are deterministic (the same bits for any
thread count; see ``cpu_kernels.cc``).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import math
import os
import warnings

import paddle
import paddle.nn.functional as F

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_kernels.cc")
CXX_FLAGS = ["-O3", "-march=native", "-ffp-contract=off"]
# Paddle's OpenMP runtime (MKL's): the kernels' threads are then the ones a matmul just used. Without it (a Paddle
# build that does not ship it) the kernels run on the calling thread.
IOMP = os.path.join(os.path.dirname(paddle.__file__), "libs", "libiomp5.so")
# Paddle's MKL (x86 builds): attention's products go through its sgemm. Without it there is no fused attention.
MKL = os.path.join(os.path.dirname(paddle.__file__), "libs", "libmklml_intel.so")


MIN_BIAS_KERNEL_ELEMENTS = 1 << 15  # add_bias: smaller products take Paddle's expand and add (fewer microseconds)
MAX_DIRECT_CONV_TAPS = 128 * 3 * 3  # conv2d: input channels x kernel taps up to which the direct kernel is faster
SWITCH = "PCM_CPU_KERNELS"  # "0": Paddle's own kernels
_LOADED: dict = {}  # "module": the built extension, or None where it cannot be built or is switched off


def _openmp_flags() -> tuple:
    """Compiler and linker flags for Paddle's OpenMP runtime and MKL (none where the Paddle build does not ship
    them)."""
    if not os.path.exists(IOMP):
        return [], []
    libs = os.path.dirname(IOMP)
    cflags, ldflags = ["-fopenmp"], [f"-L{libs}", "-liomp5", f"-Wl,-rpath,{libs}"]
    if os.path.exists(MKL):
        cflags, ldflags = cflags + ["-DPCM_WITH_MKL"], ldflags + ["-lmklml_intel"]
    return cflags, ldflags


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            return "".join(line for line in f if line.startswith(("model name", "flags")))
    except OSError:
        return ""


def build_name() -> str:
    """The extension's name: a hash of the source, the flags, the CPU (``-march=native``) and Paddle's version."""
    digest = hashlib.sha256()
    flags = [*CXX_FLAGS, *(flag for group in _openmp_flags() for flag in group)]
    with open(SOURCE, "rb") as f:
        source = f.read()
    for part in (source, " ".join(flags).encode(), _cpu_model().encode(), paddle.__version__.encode()):
        digest.update(part + b"\0")
    return "pcm_cpu_kernels_" + digest.hexdigest()[:16]


def _build():
    from paddle.utils.cpp_extension import extension_utils, get_build_directory, load

    name, root = build_name(), get_build_directory()
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(root, name, name + ".so")):  # built before: load it without a setup run
            return extension_utils._import_module_from_library(name, os.path.join(root, name))
        print(f"cpu_kernels: building the CPU kernels once (about 20 s) in {root}", flush=True)
        with contextlib.redirect_stdout(io.StringIO()):
            openmp_cflags, openmp_ldflags = _openmp_flags()
            return load(name=name, sources=[SOURCE], extra_cxx_cflags=CXX_FLAGS + openmp_cflags,
                        extra_ldflags=openmp_ldflags, build_directory=root)


def kernels():
    """The built extension (``None`` when switched off or when it cannot be built: one warning says why)."""
    if "module" not in _LOADED:
        module = None
        if os.environ.get(SWITCH, "1") != "0":
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    module = _build()
            except Exception as error:  # no compiler, no headers, a failed build: Paddle's own ops still work
                first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
                warnings.warn(f"cpu_kernels: could not build the fast CPU kernels ({first_line[:200]}); using "
                              f"Paddle's own ops (slower on CPU). Set {SWITCH}=0 to skip the attempt.")
        _LOADED["module"] = module
    return _LOADED["module"]


def threads() -> int:
    """Threads for one kernel call: ``OMP_NUM_THREADS`` where set (as Paddle's MKL), else the usable cores."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return len(os.sched_getaffinity(0))


def _runs_here(x: paddle.Tensor) -> bool:
    return x.dtype == paddle.float32 and x.place.is_cpu_place() and 0 not in x.shape and kernels() is not None


def _contiguous(x: paddle.Tensor) -> paddle.Tensor:
    return x if x.is_contiguous() else x.contiguous()


def softmax(x: paddle.Tensor) -> paddle.Tensor:
    """Softmax over the last axis: the compiled kernel for CPU float32 tensors, else ``F.softmax``."""
    if _runs_here(x):
        return kernels().pcm_softmax(_contiguous(x), threads())
    return F.softmax(x, axis=-1)


def has_fused_attention() -> bool:
    """Whether the kernels are built with the fused attention (they are where Paddle ships MKL: x86)."""
    return kernels() is not None and hasattr(kernels(), "pcm_attention")


def fused_attention_runs(query: paddle.Tensor, key: paddle.Tensor, value: paddle.Tensor) -> bool:
    """Whether :func:`attention` takes these ``[batch, tokens, heads, head_dim]`` tensors (CPU float32)."""
    return (all(t.dtype == paddle.float32 and t.place.is_cpu_place() and len(t.shape) == 4 and 0 not in t.shape
                for t in (query, key, value))
            and has_fused_attention())


def attention(query: paddle.Tensor, key: paddle.Tensor, value: paddle.Tensor, scale: float) -> paddle.Tensor:
    """``softmax(scale * q k^T) v`` per head on ``[batch, tokens, heads, head_dim]`` tensors, without the
    ``tokens x tokens`` matrices in memory (the compiled kernel; see :func:`fused_attention_runs`)."""
    q, k, v = (_contiguous(t) for t in (query, key, value))
    return kernels().pcm_attention(q, k, v, float(scale), threads())[0]


def joint_attention_runs(*parts: paddle.Tensor) -> bool:
    """Whether :func:`joint_attention` takes these image and context q, k, v (``[batch, tokens, width]``, CPU float32)."""
    return (len(parts) == 6 and all(t.dtype == paddle.float32 and t.place.is_cpu_place() and len(t.shape) == 3
                                    and 0 not in t.shape for t in parts) and has_fused_attention())


def joint_attention(query, key, value, context_query, context_key, context_value, heads: int, scale: float) -> tuple:
    """:func:`attention` over the image tokens followed by the context tokens (the SD3 blocks' joint attention) from
    their separate ``[batch, tokens, heads * head_dim]`` projections, into the two parts' outputs (the same shape):
    the same values as :func:`attention` on the concatenated tokens, without the concatenation, the split and the
    reshapes into heads (see :func:`joint_attention_runs`)."""
    parts = (_contiguous(t) for t in (query, key, value, context_query, context_key, context_value))
    image, context, _ = kernels().pcm_joint_attention(*parts, int(heads), float(scale), threads())
    return image, context


def attention_with_bias(query: paddle.Tensor, key: paddle.Tensor, value: paddle.Tensor, bias: paddle.Tensor,
                        scale: float) -> paddle.Tensor:
    """``softmax(scale * q k^T + bias) v`` per head on ``[batch, tokens, heads, head_dim]`` tensors, ``bias``
    broadcast from ``[batch or 1, heads or 1, queries, keys]`` (a causal mask, T5's position bias): the fused
    attention's forward, for passes without gradients (the caller checks the shapes: ``paddle_compat``'s text
    encoders)."""
    q, k, v, b = (_contiguous(t) for t in (query, key, value, bias))
    return kernels().pcm_attention_with_bias(q, k, v, b, float(scale), threads())


def linear_runs(x: paddle.Tensor, weight: paddle.Tensor, *others) -> bool:
    """Whether :func:`linear` takes ``x @ weight`` with ``others`` (bias, LoRA A and B; ``None`` entries ignored):
    :func:`frozen_linear_runs`, and no gradient to compute."""
    return frozen_linear_runs(x, weight, *others) and no_gradient(x, weight, *others)


def linear(x: paddle.Tensor, weight: paddle.Tensor, bias=None, lora_a=None, lora_b=None,
           scale: float = 1.0) -> paddle.Tensor:
    """``x @ weight + bias``, plus ``((x @ lora_a) @ lora_b) * scale`` for a LoRA layer, as one op without gradients
    (see :func:`linear_runs`): Paddle's matmul, add and scale bit for bit, without their separate calls."""
    return kernels().pcm_linear(_contiguous(x), weight, bias, lora_a, lora_b, float(scale), threads())


def frozen_linear_runs(x: paddle.Tensor, weight: paddle.Tensor, *others) -> bool:
    """Whether :func:`frozen_linear` / :func:`lora_linear` take ``x @ weight`` with ``others`` (bias, LoRA A and B;
    ``None`` entries ignored): CPU float32 where the kernels have MKL, a 2-D weight."""
    return (_runs_here(x) and has_fused_attention() and len(weight.shape) == 2
            and all(t is None or t.dtype == paddle.float32 for t in (weight, *others)))


def frozen_linear(x: paddle.Tensor, weight: paddle.Tensor, bias=None) -> paddle.Tensor:
    """``x @ weight + bias`` with a gradient for ``x`` only, as one op each way, keeping only ``weight`` (``frozen_linear``'s
    ``FrozenWeightLinear`` on CPU): Paddle's bits forward and backward (see :func:`frozen_linear_runs`)."""
    return kernels().pcm_frozen_linear(_contiguous(x), weight, bias, threads())


def lora_linear(x: paddle.Tensor, weight: paddle.Tensor, bias, lora_a: paddle.Tensor, lora_b: paddle.Tensor,
                scale: float) -> paddle.Tensor:
    """A LoRA Linear with a frozen base and a trained adapter, ``x @ W + b + ((x @ A) @ B) * scale``, as one op each
    way, keeping ``x`` and ``x @ A`` (``frozen_linear.LoraLinear``'s ops and bits; see :func:`frozen_linear_runs`)."""
    op = kernels().pcm_lora_adapter_linear if x.stop_gradient else kernels().pcm_lora_linear
    return op(_contiguous(x), weight, bias, lora_a, lora_b, float(scale), threads())[0]


def gated_residual_runs(x: paddle.Tensor, gate: paddle.Tensor, y: paddle.Tensor) -> bool:
    """Whether :func:`gated_residual` takes these: CPU float32 ``x`` and ``y`` ``[B, N, D]``, ``gate`` ``[B, D]``,
    and no gradient to compute."""
    return (_runs_here(x) and len(x.shape) == 3 and list(y.shape) == list(x.shape) and y.dtype == gate.dtype == x.dtype
            and list(gate.shape) == [x.shape[0], x.shape[2]]
            and no_gradient(x, gate, y))


def gated_residual(x: paddle.Tensor, gate: paddle.Tensor, y: paddle.Tensor) -> paddle.Tensor:
    """``x + gate[:, None] * y`` as one op without gradients: Paddle's multiply and add, bit for bit."""
    return kernels().pcm_gated_residual(_contiguous(x), _contiguous(gate), _contiguous(y), threads())


def layer_norm_modulate_runs(x: paddle.Tensor, scale: paddle.Tensor, shift: paddle.Tensor) -> bool:
    """Whether :func:`layer_norm_modulate` takes these: CPU float32 ``x`` ``[B, N, D]``, ``scale`` and ``shift``
    ``[B, D]``, and no gradient to compute or ``scale`` and ``shift`` both frozen or both trained."""
    return (_runs_here(x) and len(x.shape) == 3 and scale.dtype == shift.dtype == paddle.float32
            and list(scale.shape) == list(shift.shape) == [x.shape[0], x.shape[2]]
            and (scale.stop_gradient == shift.stop_gradient or no_gradient(x, scale, shift)))


def layer_norm_modulate(x: paddle.Tensor, scale: paddle.Tensor, shift: paddle.Tensor,
                        epsilon: float) -> paddle.Tensor:
    """``layer_norm(x) * (1 + scale[:, None]) + shift[:, None]`` (a LayerNorm without weight and bias over the last
    axis, then adaLN's modulation) as one op: :func:`layer_norm`'s and Paddle's ops' bits, and their gradients'
    (see :func:`layer_norm_modulate_runs`). With gradients it keeps what those ops keep."""
    x, scale, shift = _contiguous(x), _contiguous(scale), _contiguous(shift)
    if no_gradient(x, scale, shift):
        return kernels().pcm_layer_norm_modulate(x, scale, shift, float(epsilon), threads())
    op = kernels().pcm_layer_norm_modulate_frozen if scale.stop_gradient else kernels().pcm_layer_norm_modulate_trained
    return op(x, scale, shift, float(epsilon), threads())[0]


def add_bias(out: paddle.Tensor, bias: paddle.Tensor) -> paddle.Tensor:
    """``out + bias`` over the last axis, for an ``out`` that no graph records (a no-grad matmul's result): added in
    place by the compiled kernel for CPU float32 tensors of at least 32k elements (below, the call costs more than
    it saves), else with ``bias`` expanded first (Paddle's broadcast add is slow on CPU). The same sums either way;
    use the returned tensor."""
    shape = out.shape
    if math.prod(shape) >= MIN_BIAS_KERNEL_ELEMENTS and bias.dtype == out.dtype and _runs_here(out):
        return kernels().pcm_add_bias_(out, _contiguous(bias), threads())
    return out + bias.expand(shape)


def factor_multiply_runs(x: paddle.Tensor, factor: paddle.Tensor) -> bool:
    """Whether :func:`factor_multiply` takes ``x * factor``: CPU float32, ``x`` ``[B, N, D]``, ``factor`` ``[B, 1, D]``."""
    return (_runs_here(x) and factor.dtype == paddle.float32 and len(x.shape) == 3
            and list(factor.shape) == [x.shape[0], 1, x.shape[2]])


def factor_multiply(x: paddle.Tensor, factor: paddle.Tensor) -> paddle.Tensor:
    """``x * factor`` broadcast along axis 1 (see :func:`factor_multiply_runs`) without expanding ``factor``: Paddle's
    products; backward keeps ``x`` and ``factor`` as Paddle's multiply does and gives its gradients bit for bit."""
    return kernels().pcm_factor_multiply(_contiguous(x), _contiguous(factor), threads())


def conv2d(x: paddle.Tensor, weight: paddle.Tensor, bias, stride, padding) -> paddle.Tensor:
    """``conv2d(x, weight) + bias`` (NCHW, groups 1, dilation 1, zero ``padding`` as ``(top, bottom, left,
    right)``) by the compiled direct convolution, for CPU float32 tensors no gradient flows through (see
    :func:`conv2d_runs`)."""
    return kernels().pcm_conv2d(_contiguous(x), _contiguous(weight), None if bias is None else _contiguous(bias),
                                int(stride[0]), int(stride[1]), *(int(p) for p in padding), threads())


def conv2d_runs(x: paddle.Tensor, weight: paddle.Tensor, bias) -> bool:
    """Whether :func:`conv2d` takes this convolution: CPU float32, no gradient to compute, and few enough input
    channels x taps (at most 128 x 3 x 3) that the direct kernel beats Paddle's (im2col and GEMM; 2 threads:
    ``[2, 8, 256, 256]`` 3x3 10.9 -> 1.1 ms, PyTorch 1.4; ``[2, 128, 64, 64]`` 18.5 -> 13.4 ms; with 256
    channels Paddle's is faster)."""
    return (_runs_here(x) and weight.dtype == paddle.float32 and len(weight.shape) == 4
            and math.prod(weight.shape[1:]) <= MAX_DIRECT_CONV_TAPS and _no_grad(x, weight, bias))


_FORWARD_ONLY = [True]  # False inside forward_only_kernels_off()


@contextlib.contextmanager
def forward_only_kernels_off():
    """Paddle's ops instead of the forward-only kernels (:func:`conv2d`, :func:`silu`, :func:`group_norm` without
    affine) in this block: for a no-grad forward that backward recomputes with gradients (gradient checkpointing,
    the discriminator's recomputed heads), so that both passes run the same ops and give the same bits."""
    previous, _FORWARD_ONLY[0] = _FORWARD_ONLY[0], False
    try:
        yield
    finally:
        _FORWARD_ONLY[0] = previous


def no_gradient(*tensors) -> bool:
    """No gradient flows through an op on ``tensors`` (``None`` entries ignored): grad off, or none of them needs one.
    Enough for the kernels that give Paddle's bits (:func:`linear`, :func:`gated_residual`, ...)."""
    return not paddle.is_grad_enabled() or all(t is None or t.stop_gradient for t in tensors)


def _no_grad(*tensors) -> bool:
    """A forward-only kernel may run: :func:`no_gradient`, outside :func:`forward_only_kernels_off`."""
    return _FORWARD_ONLY[0] and no_gradient(*tensors)


def group_norm(x: paddle.Tensor, groups: int, epsilon: float, weight=None, bias=None) -> paddle.Tensor:
    """GroupNorm of ``[N, C, ...]`` on CPU float32: with weight and bias the compiled kernel with its backward (the
    VAE's, the discriminator heads'), without them the forward-only kernel where no gradient flows; else
    ``F.group_norm``."""
    if _runs_here(x) and len(x.shape) >= 2:
        if weight is not None and bias is not None and weight.dtype == bias.dtype == paddle.float32:
            return kernels().pcm_affine_group_norm(_contiguous(x), weight, bias, int(groups), float(epsilon),
                                                   threads())[0]
        if _no_grad(x, weight, bias):
            return kernels().pcm_group_norm(_contiguous(x), weight, bias, int(groups), float(epsilon), threads())[0]
    return F.group_norm(x, groups, epsilon, weight, bias)


def head_norm_runs(x: paddle.Tensor, norm: paddle.nn.GroupNorm, slope: float, *params) -> bool:
    """Whether :func:`head_norm` takes this ``[N, C, ...]`` convolution output, GroupNorm (with weight and bias) and
    LeakyReLU slope (below 1), with ``params`` (the conv bias, the norm's weight and bias): CPU float32."""
    return (_runs_here(x) and len(x.shape) >= 2 and norm._data_format in ("NCHW", "NCL", "NCDHW")
            and slope < 1 and all(p is not None and p.dtype == paddle.float32 for p in params))


def head_norm(x: paddle.Tensor, conv_bias, norm: paddle.nn.GroupNorm, slope: float) -> paddle.Tensor:
    """``leaky_relu(norm(x + conv_bias[:, None, None]), slope)`` (the discriminator heads' convolution bias, GroupNorm
    and LeakyReLU) as one op with its gradients: the three ops' bits forward and for the input, the norm's weight
    and bias; the conv bias's gradient sums the same terms in another order (see :func:`head_norm_runs`)."""
    return kernels().pcm_head_norm(_contiguous(x), conv_bias, norm.weight, norm.bias, int(norm._num_groups),
                                   float(norm._epsilon), float(slope), threads())[0]


def silu(x: paddle.Tensor) -> paddle.Tensor:
    """SiLU: the compiled kernel for CPU float32 tensors no gradient flows through, else ``F.silu``."""
    if _runs_here(x) and _no_grad(x):
        return kernels().pcm_silu(_contiguous(x), threads())
    return F.silu(x)


def gelu_tanh(x: paddle.Tensor) -> paddle.Tensor:
    """GELU with the tanh approximation: the compiled kernel for CPU float32 tensors, else ``F.gelu``."""
    if _runs_here(x):
        return kernels().pcm_gelu_tanh(_contiguous(x), threads())
    return F.gelu(x, approximate=True)


def layer_norm(x: paddle.Tensor, epsilon: float) -> paddle.Tensor:
    """LayerNorm over the last axis without weight and bias: the compiled kernel for CPU float32 tensors, else
    ``F.layer_norm``."""
    if _runs_here(x):
        return kernels().pcm_layer_norm(_contiguous(x), float(epsilon), threads())[0]
    return F.layer_norm(x, x.shape[-1:], epsilon=epsilon)
