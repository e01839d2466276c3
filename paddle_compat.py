"""Compatibility layer: ppdiffusers 0.29 on Paddle 3.x.

Every entry point of this project (trainer, scheduler modules, scripts) imports
this module first; importing it calls :func:`apply`, which closes the three gaps
measured in ENVIRONMENT.md and six more found while building the trainer:

1. ``ppdiffusers.peft`` calls ``.keys()/.items()/.values()`` on
   ``paddle.nn.ParameterDict``, which Paddle 3 no longer provides.
2. The SD3 joint attention processor calls ``F.scaled_dot_product_attention_``,
   which ppdiffusers only defines when its GPU memory-efficient attention is
   importable; on CPU every SD3 forward fails without it.
3. ``StableDiffusion3Pipeline.load_lora_weights`` infers each module's LoRA rank
   from ``lora_B.weight.shape[1]``: right for PyTorch's ``[out, r]`` layout, but
   the output width in Paddle's ``[r, out]`` Linear layout, so the reloaded
   adapter gets a wrong ``lora_alpha`` and does not reproduce the trained model.

4. With gradient checkpointing on, ``SD3Transformer2DModel`` assigns the
   ``(encoder_hidden_states, hidden_states)`` pair a block returns to
   ``hidden_states`` and fails in the next block (``--gradient_checkpointing``).

5. ``StableDiffusion3Pipeline`` checks for prompt truncation with
   ``paddle.equal(ids, untruncated_ids)`` (a port of ``torch.equal``); on Paddle 3
   that raises for tensors of different lengths, so any prompt over 77 tokens fails.

6. ``ppdiffusers.peft``'s LoRA ``Linear`` casts its output to the *input's* dtype, where PyTorch's PEFT
   keeps the base layer's result dtype. Under fp16 autocast the inputs of most LoRA layers are fp32
   LayerNorm outputs, so the student's whole residual stream would turn fp32 (about 6.6 GiB more
   activations at 1024 px, batch 2: see ``scripts/memory_budget.py``). Same values in fp32 runs.

7. ppdiffusers 0.29 has no SD3.5 transformer (``qk_norm``, ``dual_attention_layers``): an SD3.5 folder would
   load into the SD3 class with mismatched weights. ``SD3Transformer2DModel.from_pretrained`` (also what
   ``StableDiffusion3Pipeline.from_pretrained`` calls) builds the class ``sd35_transformer.transformer_class``
   picks from ``transformer/config.json`` instead, and fails with one clear error on what is unsupported.

8. ``ppdiffusers.utils.smart_load`` (what ``load_lora_weights``, ``from_pretrained`` and PEFT's adapter
   loading read weight files with) hands ``.pdparams`` files to ``paddle.load`` and ``.pt/.bin`` files (and
   anything it cannot identify) to a pickle unpickler: a crafted file runs code. Every file that is not
   safetensors now goes through ``safe_pdparams.load_pdparams`` (an allow-list unpickler that reads only a
   Paddle state dict of tensors and refuses anything else with ``UnsafeFileError``).

9. On CPU, ``paddle.nn.Conv2D`` adds its bias with Paddle's slow broadcast kernel; it now adds it expanded to
   the output's shape (the same sums; a trained bias's gradient sums the same terms in another order), and the
   VAE's ``Downsample2D`` pads inside its convolution instead of with Paddle's slow pad kernel (the same bits).
   Without gradients, convolutions of up to 128 input channels x 3 x 3 run ``cpu_kernels``' direct kernel.

11. On CPU ppdiffusers builds its ``Attention`` layers (the VAE's mid-block) with the plain ``AttnProcessor``
   (Paddle's memory-efficient attention is missing there); on CPU float32 it runs ``AttnProcessor2_5``'s path,
   i.e. ``cpu_kernels``' fused attention: the same attention at fp32 roundoff.

12. Without gradients on CPU, ppdiffusers' CLIP and T5 attention run as ``cpu_kernels.attention_with_bias`` (the
   fused attention with CLIP's causal mask, built once per shape, or T5's position bias); elsewhere they see
   ``cpu_kernels.softmax`` as their functional softmax. T5LayerNorm squares and T5's GELU cubes by multiplying
   (exact, as PyTorch's ``pow(2)`` and ``pow(x, 3)``; Paddle's ``pow`` is not, and 25-40x slower).

13. ``scale_lora_layers``/``unscale_lora_layers`` return at once for weight 1.0, as diffusers' do (ppdiffusers walks
   every sublayer around each transformer forward to leave each scale unchanged).

14. ppdiffusers' SD3 joint attention concatenates the image and context tokens' q, k and v and splits the output;
   on CPU float32 they go to ``cpu_kernels.joint_attention`` as separate parts (the same bits, without the copies).

Before ``import paddle`` it also sets the CPU fast-path settings (MKL's AVX2 path on AMD CPUs, no strided-copy
kernels on CPU-only builds; see "CPU fast path" below and the README), never overriding a user's value, and
on CPU attention (SD3's and, through ppdiffusers' plain ``AttnProcessor``, the VAE's: shim 11), SD3's affine-free
LayerNorms and GELU (tanh), and in no-grad passes GroupNorm and SiLU, run ``cpu_kernels``' compiled kernels
(shim 10).

``apply()`` is idempotent and each shim is a no-op where it is not needed.
It also sets ``USE_PEFT_BACKEND=True`` (the seed snippet's setting) unless the
user chose otherwise, before ppdiffusers is first imported.
"""
from __future__ import annotations

import math
import os
import warnings

os.environ.setdefault("USE_PEFT_BACKEND", "True")
# Import-time noise of Paddle's wheel on machines without ccache; not actionable for users.
warnings.filterwarnings("ignore", message="No ccache found")
warnings.filterwarnings("ignore", message="Setuptools is replacing distutils")


# --- CPU fast path: settings read when Paddle and its MKL start --------------------------
# Set here, before ``import paddle``, so that every entry point (they all import this module
# first), their DataLoader workers and the ranks of ``paddle.distributed.launch`` (children
# inherit ``os.environ``) run with them. A value the user set is never overridden.
def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """The CPU's ``vendor_id`` (``AuthenticAMD``, ``GenuineIntel``, ...), or ``""`` where unknown."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


# Paddle's bundled MKL (2019.0.5, libmklml_intel) dispatches AMD CPUs to its slow generic code
# path; MKL_DEBUG_CPU_TYPE=5 selects the AVX2 kernels (a [820,256]x[256,256] fp32 matmul:
# 1.14 -> 0.45 ms on this AMD EPYC). On Intel CPUs MKL already picks the best path for the CPU
# (AVX-512 where present), and forcing 5 could only lower it, so it is set on AMD only.
# MKL 2020.1 and later ignore the variable.
MKL_ENV_ON_AMD = {"MKL_DEBUG_CPU_TYPE": "5"}
# Paddle's CPU strided-copy kernel makes ``transpose`` + ``reshape`` ~30x slower than a plain
# transpose; with stride kernels off a transpose writes a contiguous result directly (same
# values). On GPUs the stride kernels save copies, so this is set only for CPU-only Paddle builds.
FLAGS_ON_CPU_BUILDS = {"FLAGS_use_stride_kernel": False}


def set_cpu_environment(environ=os.environ, vendor: str = None) -> dict:
    """Put the MKL settings for this CPU into ``environ`` unless the user set them. Returns what it set."""
    vendor = cpu_vendor() if vendor is None else vendor
    chosen = dict(MKL_ENV_ON_AMD) if vendor == "AuthenticAMD" else {}
    applied = {k: v for k, v in chosen.items() if k not in environ}
    environ.update(applied)
    return applied


def set_cpu_flags(paddle_module, environ=os.environ) -> dict:
    """On a CPU-only Paddle build, set ``FLAGS_ON_CPU_BUILDS`` (flags named in ``environ`` by the user
    are left as they are; Paddle read those at import) and export them for child processes."""
    if paddle_module.device.get_all_device_type():  # [] on a CPU-only build without custom devices
        return {}
    applied = {k: v for k, v in FLAGS_ON_CPU_BUILDS.items() if k not in environ}
    if applied:
        paddle_module.set_flags(applied)
        environ.update({k: str(int(v)) if isinstance(v, bool) else str(v) for k, v in applied.items()})
    return applied


CPU_SETTINGS = set_cpu_environment()

import paddle  # noqa: E402
import paddle.nn.functional as F  # noqa: E402

CPU_SETTINGS.update(set_cpu_flags(paddle))

import cpu_kernels  # noqa: E402  (compiled CPU softmax, GELU and LayerNorm: math_attention, shim 10)

# --- 1. ParameterDict mapping methods ---------------------------------------------------
def _patch_parameter_dict() -> bool:
    """Give ``paddle.nn.ParameterDict`` the mapping methods ppdiffusers.peft uses."""
    cls = paddle.nn.ParameterDict
    added = False
    if not hasattr(cls, "keys"):
        cls.keys = lambda self: self._parameters.keys()
        added = True
    if not hasattr(cls, "items"):
        cls.items = lambda self: self._parameters.items()
        added = True
    if not hasattr(cls, "values"):
        cls.values = lambda self: self._parameters.values()
        added = True
    return added


# --- 2. scaled_dot_product_attention_ ---------------------------------------------------
_NATIVE_SDPA_WORKS: dict = {}


def _native_sdpa_works(query: paddle.Tensor) -> bool:
    """Whether Paddle's fused attention runs for this device and dtype (probed once each)."""
    key = (str(query.place), str(query.dtype))
    if key not in _NATIVE_SDPA_WORKS:
        ok = False
        if query.dtype in (paddle.float16, paddle.bfloat16) and not query.place.is_cpu_place():
            try:
                probe = paddle.ones([1, 2, 1, 64], dtype=query.dtype)
                F.scaled_dot_product_attention(probe, probe, probe)
                ok = True
            except Exception:  # no fused kernel for this device/dtype
                ok = False
        _NATIVE_SDPA_WORKS[key] = ok
    return _NATIVE_SDPA_WORKS[key]


def math_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, training=True):
    """Plain softmax attention on ``[batch, seq, heads, head_dim]`` tensors (any device and dtype)."""
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    q = query.transpose([0, 2, 1, 3])
    k = key.transpose([0, 2, 1, 3])
    v = value.transpose([0, 2, 1, 3])
    scores = paddle.matmul(q * scale, k, transpose_y=True)
    if is_causal:
        n_q, n_k = scores.shape[-2], scores.shape[-1]
        causal = paddle.triu(paddle.full([n_q, n_k], float("-inf"), dtype=scores.dtype), diagonal=1)
        scores = scores + causal
    elif attn_mask is not None:
        if attn_mask.dtype == paddle.bool:
            attn_mask = paddle.where(attn_mask, paddle.zeros([], scores.dtype), paddle.full([], float("-inf"), scores.dtype))
        scores = scores + attn_mask.astype(scores.dtype)
    probs = cpu_kernels.softmax(scores.astype("float32")).astype(q.dtype)  # F.softmax off CPU
    if dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p, training=training)
    return paddle.matmul(probs, v).transpose([0, 2, 1, 3])


def scaled_dot_product_attention_(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, training=True, attention_op=None
):
    """Stand-in for ppdiffusers' ``F.scaled_dot_product_attention_`` (``[batch, seq, heads, dim]``).

    Uses Paddle's fused attention where it runs (GPU, fp16/bf16, default scale, no mask), ``cpu_kernels``' fused
    attention for CPU float32 without mask, causality or dropout, else :func:`math_attention`.
    """
    default_scale = scale is None or abs(scale - 1.0 / math.sqrt(query.shape[-1])) < 1e-12
    if attention_op != "math" and attn_mask is None and default_scale and _native_sdpa_works(query):
        return F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout_p if training else 0.0, is_causal=is_causal, training=training
        )
    plain = attn_mask is None and not is_causal and (dropout_p == 0.0 or not training)
    if attention_op != "math" and plain and cpu_kernels.fused_attention_runs(query, key, value):
        return cpu_kernels.attention(query, key, value, 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale)
    return math_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, training)


def _patch_sdpa() -> bool:
    if hasattr(F, "scaled_dot_product_attention_"):
        return False
    F.scaled_dot_product_attention_ = scaled_dot_product_attention_
    return True


# --- 3. SD3 LoRA reload: rank from Paddle's weight layout --------------------------------
def paddle_lora_ranks(state_dict: dict) -> dict:
    """Rank of every ``lora_B`` weight of a Paddle-layout state dict.

    Linear ``lora_B.weight`` is ``[r, out]`` in Paddle; Conv2d ``lora_B.weight`` is
    ``[out, r, kh, kw]``.
    """
    ranks = {}
    for name, weight in state_dict.items():
        if "lora_B" in name:
            ranks[name] = int(weight.shape[0] if len(weight.shape) == 2 else weight.shape[1])
    return ranks


def _patch_sd3_lora_rank() -> bool:
    from ppdiffusers.loaders import lora as lora_module

    mixin = lora_module.SD3LoraLoaderMixin
    original = mixin.__dict__["load_lora_into_transformer"].__func__
    if getattr(original, "_pcm_compat", False):
        return False
    upstream_get_peft_kwargs = lora_module.get_peft_kwargs

    def get_peft_kwargs_paddle_layout(rank_dict, network_alpha_dict, peft_state_dict, is_unet=True):
        corrected = paddle_lora_ranks({k: peft_state_dict[k] for k in rank_dict})
        return upstream_get_peft_kwargs(corrected, network_alpha_dict, peft_state_dict, is_unet=is_unet)

    def load_lora_into_transformer(cls, state_dict, transformer, adapter_name=None, _pipeline=None, from_diffusers=None):
        # A PyTorch-format file keeps [out, r], for which upstream's shape[1] is right.
        if from_diffusers:
            return original(cls, state_dict, transformer, adapter_name, _pipeline, from_diffusers)
        lora_module.get_peft_kwargs = get_peft_kwargs_paddle_layout
        try:
            return original(cls, state_dict, transformer, adapter_name, _pipeline, from_diffusers)
        finally:
            lora_module.get_peft_kwargs = upstream_get_peft_kwargs

    load_lora_into_transformer._pcm_compat = True
    mixin.load_lora_into_transformer = classmethod(load_lora_into_transformer)
    return True


# --- 4. SD3 blocks under gradient checkpointing ----------------------------------------
def _with_differentiable_ops(run):
    def run_block(*args):
        with cpu_kernels.forward_only_kernels_off():
            return run(*args)

    return run_block


def run_joint_blocks(transformer, hidden_states, encoder_hidden_states, temb, features=None, wrap=None):
    """Run the SD3 transformer blocks, recomputing activations in backward when the model is
    training with gradient checkpointing. Appends each block's image-token output to
    ``features`` when given (the discriminator's feature taps). ``wrap(block)`` may return a
    callable to run instead of the block (it is what gets recomputed). Returns both streams."""
    from paddle.distributed.fleet.utils import recompute
    from ppdiffusers.utils import recompute_use_reentrant

    checkpointing = transformer.training and getattr(transformer, "gradient_checkpointing", False)
    for block in transformer.transformer_blocks:
        run = wrap(block) if wrap is not None else block
        if checkpointing:  # the no-grad forward runs the ops that backward's recomputation runs
            kwargs = {} if recompute_use_reentrant() else {"use_reentrant": False}
            encoder_hidden_states, hidden_states = recompute(
                _with_differentiable_ops(run), hidden_states, encoder_hidden_states, temb, **kwargs)
        else:
            encoder_hidden_states, hidden_states = run(hidden_states, encoder_hidden_states, temb)
        if features is not None:
            features.append(hidden_states)
    return encoder_hidden_states, hidden_states


def _patch_sd3_checkpointing() -> bool:
    from ppdiffusers.models.transformer_sd3 import SD3Transformer2DModel

    if getattr(SD3Transformer2DModel.sd3_origin_transformer, "_pcm_compat", False):
        return False

    def sd3_origin_transformer(self, hidden_states, encoder_hidden_states, temb):
        return run_joint_blocks(self, hidden_states, encoder_hidden_states, temb)

    sd3_origin_transformer._pcm_compat = True
    SD3Transformer2DModel.sd3_origin_transformer = sd3_origin_transformer
    return True


# --- 5. SD3 pipeline prompts over 77 tokens ----------------------------------------------
class _ModuleWith:
    """A module as one ppdiffusers module sees it, with some attributes replaced (shims 5 and 12)."""

    def __init__(self, module, **replaced):
        self._module = module
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(self._module, name)


def torch_equal(x, y) -> bool:
    """``torch.equal``: same shape and all elements equal, one bool (what the ported SD3 pipeline means by
    ``paddle.equal``)."""
    return list(x.shape) == list(y.shape) and bool(paddle.equal_all(x, y).item())


def _patch_sd3_prompt_truncation() -> bool:
    from ppdiffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3 as module

    if isinstance(module.paddle, _ModuleWith):
        return False
    module.paddle = _ModuleWith(module.paddle, equal=torch_equal)
    return True


# --- 6. LoRA Linear keeps the base layer's result dtype -----------------------------------
def lora_linear_forward(self, x, *args, **kwargs):
    """``ppdiffusers.peft`` LoRA ``Linear.forward`` with PyTorch PEFT's dtype rule: the LoRA branch runs in
    the adapter weights' dtype and the sum is returned in the base layer's result dtype. The down-projection
    keeps its input once, in the matmul's dtype (``frozen_linear.lora_down``). Without gradients, in float32, the
    same ops run without the sublayers' calls, with gradients on CPU as one node (:func:`_lora_linear_fused`)."""
    from frozen_linear import lora_down

    if self.disable_adapters and self.merged:
        self.unmerge()
    if not self.disable_adapters and not self.merged and not args and not kwargs:
        fused = _lora_linear_fused(self, x)
        if fused is not None:
            return fused
    result = self.base_layer(x, *args, **kwargs)
    if self.disable_adapters or self.merged:
        return result
    result_dtype = result.dtype
    for adapter in self.active_adapters:
        if adapter not in self.lora_A.keys():
            continue
        lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
        branch = lora_B(lora_down(lora_A, self.lora_dropout[adapter], x)) * self.scaling[adapter]
        # Tensor.cast copies even to the same dtype (as ppdiffusers.peft); with gradients that copy's node keeps
        # upstream's order of summing the input's gradients (bit for bit); without, astype skips the copy
        result = result + (branch.cast(result_dtype) if paddle.is_grad_enabled() else branch.astype(result_dtype))
    return result


def _lora_linear_fused(layer, x):
    """A float32 LoRA ``Linear`` (one active adapter, no dropout, no LoRA bias) as its ops without the layers' calls.
    Without gradients, with the scale and the sum in place: ``x @ W + b``, then ``+= (x @ A) @ B * s`` (the same
    bits; on CPU that is most of a LoRA layer's cost in the small teacher's target pass). With gradients, on CPU,
    as one graph node (``frozen_linear.lora_linear``). ``None`` where it does not apply."""
    import frozen_linear
    import frozen_ops

    base = layer.base_layer
    if len(layer.active_adapters) != 1 or type(base) is not paddle.nn.Linear:
        return None
    adapter = layer.active_adapters[0]
    if adapter not in layer.lora_A.keys():
        return None
    lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
    if (not isinstance(layer.lora_dropout[adapter], paddle.nn.Identity) or lora_A.bias is not None
            or lora_B.bias is not None
            or not x.dtype == base.weight.dtype == lora_A.weight.dtype == lora_B.weight.dtype == paddle.float32):
        return None
    scale = layer.scaling[adapter]
    if paddle.is_grad_enabled():
        return frozen_linear.lora_linear(x, base.weight, base.bias, lora_A.weight, lora_B.weight, scale)
    if cpu_kernels.linear_runs(x, base.weight, base.bias, lora_A.weight, lora_B.weight):
        return cpu_kernels.linear(x, base.weight, base.bias, lora_A.weight, lora_B.weight, scale)
    result = frozen_ops.linear(x, base.weight, base.bias)
    branch = paddle.matmul(paddle.matmul(x, lora_A.weight), lora_B.weight)
    return result.add_(branch.scale_(scale))


def _patch_lora_linear_dtype() -> bool:
    from ppdiffusers.peft.tuners.lora.layer import Linear

    if Linear.forward is lora_linear_forward:
        return False
    Linear.forward = lora_linear_forward
    return True


# --- 7. SD3.5 transformers selected from their config -------------------------------------
def _patch_sd35_selection() -> bool:
    from ppdiffusers.models.modeling_utils import ModelMixin
    from ppdiffusers.models.transformer_sd3 import SD3Transformer2DModel

    if getattr(SD3Transformer2DModel.from_pretrained, "_pcm_compat", False):
        return False
    upstream = ModelMixin.from_pretrained.__func__

    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        if cls is SD3Transformer2DModel:
            import sd35_transformer  # here, not at import time: it imports this module first

            where = ("subfolder", "revision", "cache_dir", "from_hf_hub", "from_aistudio", "use_auth_token", "proxies",
                     "local_files_only")
            config_kwargs = {k: kwargs[k] for k in where if k in kwargs}
            config = cls.load_config(pretrained_model_name_or_path, **config_kwargs)
            source = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "", cls.config_name)
            cls = sd35_transformer.transformer_class(config, source)
        return upstream(cls, pretrained_model_name_or_path, **kwargs)

    from_pretrained._pcm_compat = True
    SD3Transformer2DModel.from_pretrained = classmethod(from_pretrained)
    return True


# --- 8. weight files: no pickle beyond a Paddle state dict of tensors --------------------
def _patch_smart_load() -> bool:
    import sys

    from ppdiffusers import utils as ppdiffusers_utils
    from ppdiffusers.utils import load_utils

    upstream = load_utils.smart_load
    if getattr(upstream, "_pcm_compat", False):
        return False

    def smart_load(path, map_location=None, return_numpy=False, return_global_step=False, return_is_torch_weight=False):
        """ppdiffusers' ``smart_load`` for safetensors files; every other file through ``safe_pdparams``."""
        import safe_pdparams

        path = str(path)
        if safe_pdparams.is_safetensors(path):
            return upstream(path, map_location, return_numpy, return_global_step, return_is_torch_weight)
        arrays = safe_pdparams.load_pdparams(path)
        if return_numpy:
            return arrays
        with paddle.device_scope(map_location or load_utils.get_map_location_default()):
            return {name: paddle.to_tensor(array) for name, array in arrays.items()}

    smart_load._pcm_compat = True
    for module in [load_utils, ppdiffusers_utils, *list(sys.modules.values())]:  # every `from ... import smart_load`
        if getattr(module, "__dict__", {}).get("smart_load") is upstream:
            module.smart_load = smart_load
    return True


# --- 9. Conv2D adds its bias expanded on CPU; Downsample2D pads in its convolution ----------------------------------------------
# Paddle's CPU kernel for a broadcast add is slow on a channel bias: [2, 8, 256, 256] + [1, 8, 1, 1] takes 15.9 ms,
# 1.1 ms with the bias expanded to the output's shape first (the VAE encoder; the discriminator heads at
# [4, 256, 16, 16]: 6.4 against 0.9 ms forward and backward). The same sums, so the same outputs and input
# gradients; the gradient of a bias that trains (the discriminator heads') is then expand's sum over the batch and
# grid instead of add's: the same terms in another order (differences at fp32 roundoff).
def _conv_with_expanded_bias(conv, x, padding):
    """``conv``'s convolution of ``x`` (NCHW) with ``padding`` (Paddle's explicit form), its bias (if any) added
    expanded to the output's shape; without gradients, where ``cpu_kernels``' direct convolution takes it, that
    kernel (the bias added in it)."""
    pads = _explicit_pads(padding)
    if (pads is not None and conv._padding_algorithm == "EXPLICIT" and conv._groups == 1
            and list(conv._dilation) == [1, 1] and cpu_kernels.conv2d_runs(x, conv.weight, conv.bias)):
        return cpu_kernels.conv2d(x, conv.weight, conv.bias, conv._stride, pads)
    out = F.conv._conv_nd(x, conv.weight, None, conv._stride, padding, conv._padding_algorithm, conv._dilation,
                          conv._groups, conv._data_format, conv._channel_dim, conv._op_type, conv._use_cudnn)
    return out if conv.bias is None else out + conv.bias.reshape([1, -1, 1, 1]).expand(out.shape)


def _explicit_pads(padding):
    """Paddle's explicit 2-D padding (``[h, w]`` or ``[top, bottom, left, right]``) as ``(top, bottom, left,
    right)``; ``None`` for any other form."""
    padding = list(padding) if isinstance(padding, (list, tuple)) else None
    if padding is None or not all(isinstance(p, int) for p in padding):
        return None
    if len(padding) == 2:
        return padding[0], padding[0], padding[1], padding[1]
    return tuple(padding) if len(padding) == 4 else None


def conv2d_forward(self, x):
    """``paddle.nn.Conv2D.forward``, with the bias expanded before the add on CPU (zero padding, NCHW)."""
    if (self.bias is None or not x.place.is_cpu_place() or self._padding_mode != "zeros"
            or self._data_format != "NCHW" or x.is_dist()):
        return _UPSTREAM_CONV2D_FORWARD(self, x)
    return _conv_with_expanded_bias(self, x, self._updated_padding)


_UPSTREAM_CONV2D_FORWARD = paddle.nn.Conv2D.forward


# The VAE encoder's downsampling pads by (0, 1, 0, 1) with ``F.pad`` and then convolves without padding; Paddle's
# CPU pad kernel is slow ([2, 8, 256, 256]: pad 12 ms, then the stride-2 conv 5 ms). A convolution with that same
# asymmetric padding gives the same bits in 7 ms.
def downsample2d_forward(self, hidden_states, scale: float = 1.0):
    """ppdiffusers' ``Downsample2D.forward``, with the (0, 1, 0, 1) zero padding inside the convolution on CPU."""
    conv = self.conv
    if not (self.use_conv and self.padding == 0 and self.data_format == "NCHW" and type(conv) is paddle.nn.Conv2D
            and conv._padding_mode == "zeros" and list(conv._updated_padding) == [0, 0]
            and hidden_states.place.is_cpu_place() and not hidden_states.is_dist()):
        return _UPSTREAM_DOWNSAMPLE2D_FORWARD(self, hidden_states, scale)
    if hidden_states.shape[1] != self.channels:
        raise ValueError(f"Downsample2D: {hidden_states.shape[1]} input channels, expected {self.channels}")
    return _conv_with_expanded_bias(conv, hidden_states, [0, 1, 0, 1])  # (top, bottom, left, right)


def _patch_conv2d_bias() -> bool:
    from ppdiffusers.models.resnet import Downsample2D

    global _UPSTREAM_DOWNSAMPLE2D_FORWARD
    if paddle.nn.Conv2D.forward is conv2d_forward:
        return False
    paddle.nn.Conv2D.forward = conv2d_forward
    _UPSTREAM_DOWNSAMPLE2D_FORWARD = Downsample2D.forward
    Downsample2D.forward = downsample2d_forward
    return True


# --- 10. SD3's LayerNorms and GELU, the VAE's GroupNorms and SiLUs on CPU through cpu_kernels ---------------
# Paddle's CPU LayerNorm backward and GELU (tanh) forward and backward are scalar single-threaded code (see
# cpu_kernels.py); the SD3 and SD3.5 blocks' LayerNorms (no weight, no bias) and their feed-forward GELU run the
# compiled kernels on CPU float32 tensors, Paddle's own ops everywhere else. GroupNorm and SiLU (single-threaded
# too: half of a VAE encode after the convolutions) run forward-only kernels where no gradient flows.
def layer_norm_forward(self, input):
    """``paddle.nn.LayerNorm.forward``; without weight and bias, over the last axis: ``cpu_kernels.layer_norm``."""
    if self.weight is None and self.bias is None and len(self._normalized_shape) == 1:
        return cpu_kernels.layer_norm(input, self._epsilon)
    return _UPSTREAM_LAYER_NORM_FORWARD(self, input)


_UPSTREAM_LAYER_NORM_FORWARD = paddle.nn.LayerNorm.forward


def gelu_method(self, gate):
    """ppdiffusers' ``GELU.gelu``; the tanh approximation through ``cpu_kernels.gelu_tanh``."""
    if self.approximate == "tanh":
        return cpu_kernels.gelu_tanh(gate)
    return F.gelu(gate, approximate=self.approximate != "none")


def group_norm_forward(self, input):
    """``paddle.nn.GroupNorm.forward``; channels first: ``cpu_kernels.group_norm`` (its kernel without gradients)."""
    if self._data_format in ("NC", "NCL", "NCHW", "NCDHW"):
        return cpu_kernels.group_norm(input, self._num_groups, self._epsilon, self.weight, self.bias)
    return _UPSTREAM_GROUP_NORM_FORWARD(self, input)


def silu_forward(self, x):
    """``paddle.nn.Silu.forward`` through ``cpu_kernels.silu`` (its kernel without gradients)."""
    return cpu_kernels.silu(x)


_UPSTREAM_GROUP_NORM_FORWARD = paddle.nn.GroupNorm.forward


def _patch_cpu_kernel_layers() -> bool:
    from ppdiffusers.models.activations import GELU

    if paddle.nn.LayerNorm.forward is layer_norm_forward:
        return False
    paddle.nn.LayerNorm.forward = layer_norm_forward
    paddle.nn.GroupNorm.forward = group_norm_forward
    paddle.nn.Silu.forward = silu_forward
    GELU.gelu = gelu_method
    return True


# --- 11. ppdiffusers' plain attention processor through the fused CPU attention --------------------------
# Where Paddle's memory-efficient attention is missing (CPU), ppdiffusers builds its ``Attention`` layers (the VAE's
# mid-block) with ``AttnProcessor``: two matmuls around Paddle's single-threaded softmax, plus same-dtype casts that
# copy the N x N scores. Its ``AttnProcessor2_5`` computes the same attention through ``F.scaled_dot_product_attention_``
# (here: cpu_kernels' fused attention on CPU float32). VAE encode of the small benchmark teacher, 256 px: see README.
def attn_processor_call(self, attn, hidden_states, *args, **kwargs):
    """``AttnProcessor.__call__``; on CPU float32 where the fused attention is built, ``AttnProcessor2_5``'s."""
    if (hidden_states.dtype == paddle.float32 and hidden_states.place.is_cpu_place()
            and cpu_kernels.has_fused_attention()):
        return _SDPA_PROCESSOR(attn, hidden_states, *args, **kwargs)
    return _UPSTREAM_ATTN_PROCESSOR_CALL(self, attn, hidden_states, *args, **kwargs)


def _patch_attn_processor() -> bool:
    from ppdiffusers.models.attention_processor import AttnProcessor, AttnProcessor2_5

    global _SDPA_PROCESSOR, _UPSTREAM_ATTN_PROCESSOR_CALL
    if AttnProcessor.__call__ is attn_processor_call:
        return False
    _SDPA_PROCESSOR, _UPSTREAM_ATTN_PROCESSOR_CALL = AttnProcessor2_5(), AttnProcessor.__call__
    AttnProcessor.__call__ = attn_processor_call
    return True


# --- 12. The text encoders on CPU -------------------------------------------------------------------------------
# ppdiffusers' CLIP and T5 attention are two matmuls around Paddle's single-threaded CPU softmax (0.15 ms on a
# [2, 4, 77, 77] tiny encoder's scores), with CLIP's causal mask or T5's position bias added to the scores in
# between; CLIP builds its causal mask anew on every call. Where no gradient flows (the trainer's prompt encoding),
# both attentions run as ``cpu_kernels.attention_with_bias`` (the fused attention with the mask or bias added to its
# scores; PyTorch's CLIP runs its fused attention with the mask too), and CLIP's mask is built once per shape.
# Elsewhere both modules see ``cpu_kernels.softmax`` as their functional softmax over the last axis. T5LayerNorm
# squares with ``pow(2)`` (0.11 ms on [2, 77, 64] against 3 us for a multiply, and not exact: 4 % of squares are off
# by an ulp) and T5's GELU cubes with ``pow(x, 3)`` (0.12 ms against 5 us, also off by an ulp); PyTorch's ``pow``
# with exponent 2 or 3, which the reference runs, is exactly ``x * x`` or ``x * x * x``, and so are these. The tiny
# teacher's prompt encoding: see README.
def text_encoder_softmax(x, axis=-1, dtype=None, name=None):
    """``F.softmax``; over the last axis without a dtype, ``cpu_kernels.softmax`` (its kernel on CPU float32)."""
    if dtype is None and axis in (-1, len(x.shape) - 1):
        return cpu_kernels.softmax(x)
    return F.softmax(x, axis=axis, dtype=dtype, name=name)


def _fused_text_attention(layer, hidden_states, bias, heads: int, projections, scale: float, dropout: float):
    """The attention of ``hidden_states`` ``[batch, tokens, width]`` through ``cpu_kernels.attention_with_bias``, with
    ``projections`` (q, k, v: their outputs split into ``heads``; q multiplied by ``scale`` first unless it is 1),
    or ``None`` where that kernel does not take it (not CPU float32, a gradient to compute, dropout)."""
    if (bias is None or (layer.training and dropout > 0) or hidden_states.dtype != paddle.float32
            or not hidden_states.place.is_cpu_place() or not cpu_kernels.has_fused_attention()):
        return None
    if paddle.is_grad_enabled() and not all(t.stop_gradient for t in (hidden_states, bias, *layer.parameters())):
        return None
    batch, tokens = hidden_states.shape[:2]
    if (len(bias.shape) != 4 or bias.dtype != paddle.float32 or bias.shape[0] not in (1, batch)
            or bias.shape[1] not in (1, heads) or bias.shape[2:] != [tokens, tokens]):
        return None
    query, key, value = (projection(hidden_states) for projection in projections)
    if scale != 1.0:
        query = query * scale
    query, key, value = (t.reshape([batch, tokens, heads, -1]) for t in (query, key, value))
    return cpu_kernels.attention_with_bias(query, key, value, bias, 1.0).reshape([batch, tokens, -1])


def clip_attention_forward(self, hidden_states, attention_mask=None, causal_attention_mask=None,
                           output_attentions=False):
    """``CLIPAttention.forward``; without a padding mask or attention weights to return, the fused attention
    (see :func:`_fused_text_attention`)."""
    if attention_mask is None and not output_attentions:
        out = _fused_text_attention(self, hidden_states, causal_attention_mask, self.num_heads,
                                    (self.q_proj, self.k_proj, self.v_proj), self.scale, self.dropout)
        if out is not None:
            return self.out_proj(out), None
    return _UPSTREAM_TEXT_ATTENTION["clip"](self, hidden_states, attention_mask, causal_attention_mask,
                                            output_attentions)


def t5_attention_forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None,
                         past_key_value=None, query_length=None, use_cache=False, output_attentions=False):
    """``T5Attention.forward``; for self-attention without a cache or attention weights to return, the fused
    attention with the (masked) position bias, computed as upstream does and returned for the next layer (or, where
    the fused attention does not run, handed to upstream's forward, which then uses it as given)."""
    if key_value_states is None and past_key_value is None and not output_attentions and not (
            self.is_decoder and use_cache):
        if position_bias is None and hidden_states.place.is_cpu_place():
            tokens = hidden_states.shape[1]
            if self.has_relative_attention_bias:
                position_bias = self.compute_bias(tokens, tokens)
            else:
                position_bias = paddle.zeros((1, self.n_heads, tokens, tokens), dtype=hidden_states.dtype)
                position_bias.stop_gradient = not (self.gradient_checkpointing and self.training)
            if mask is not None:
                position_bias = position_bias + mask
        out = _fused_text_attention(self, hidden_states, position_bias, self.n_heads, (self.q, self.k, self.v), 1.0,
                                    self.dropout)
        if out is not None:
            return self.o(out), None, position_bias
    return _UPSTREAM_TEXT_ATTENTION["t5"](self, hidden_states, mask, key_value_states, position_bias, past_key_value,
                                          query_length, use_cache, output_attentions)


_CAUSAL_MASKS: dict = {}  # (batch, tokens, dtype, place) -> CLIP's causal mask (read only)


def clip_causal_mask(self, bsz, seq_len, dtype):
    """``CLIPTextTransformer._build_causal_attention_mask`` (the dtype's minimum above the diagonal, else 0), built
    once per shape, dtype and device."""
    key = (int(bsz), int(seq_len), str(dtype), str(paddle.get_device()))
    if key not in _CAUSAL_MASKS:
        if len(_CAUSAL_MASKS) >= 16:
            _CAUSAL_MASKS.clear()
        _CAUSAL_MASKS[key] = _UPSTREAM_TEXT_ATTENTION["clip_mask"](self, bsz, seq_len, dtype)
    return _CAUSAL_MASKS[key]


def t5_layer_norm_forward(self, hidden_states):
    """ppdiffusers' ``T5LayerNorm.forward``, squaring by a multiply (``astype``: no copy in fp32)."""
    from ppdiffusers.transformers.t5.modeling import amp_state

    x32 = hidden_states.astype(paddle.float32)
    variance = (x32 * x32).mean(-1, keepdim=True)
    hidden_states = hidden_states * paddle.rsqrt(variance + self.variance_epsilon)
    if amp_state() or self.weight.dtype in [paddle.float16, paddle.bfloat16]:
        hidden_states = hidden_states.cast(self.weight.dtype)
    return self.weight * hidden_states


def new_gelu_forward(self, input):
    """PaddleNLP's ``NewGELUActivation.forward`` (T5's ``gelu_new``), cubing by multiplies."""
    return 0.5 * input * (1.0 + paddle.tanh(math.sqrt(2.0 / math.pi) * (input + 0.044715 * (input * input * input))))


_UPSTREAM_TEXT_ATTENTION: dict = {}


def _patch_text_encoders() -> bool:
    from paddlenlp.transformers.activations import NewGELUActivation
    from ppdiffusers.transformers.clip import modeling as clip_modeling
    from ppdiffusers.transformers.t5 import modeling as t5_modeling

    if t5_modeling.T5LayerNorm.forward is t5_layer_norm_forward:
        return False
    functional = _ModuleWith(F, softmax=text_encoder_softmax)
    clip_modeling.F = functional
    t5_modeling.nn = _ModuleWith(t5_modeling.nn, functional=functional)
    t5_modeling.T5LayerNorm.forward = t5_layer_norm_forward
    NewGELUActivation.forward = new_gelu_forward
    text_transformer = clip_modeling.CLIPTextTransformer
    _UPSTREAM_TEXT_ATTENTION.update(clip=clip_modeling.CLIPAttention.forward, t5=t5_modeling.T5Attention.forward,
                                    clip_mask=text_transformer._build_causal_attention_mask)
    clip_modeling.CLIPAttention.forward = clip_attention_forward
    t5_modeling.T5Attention.forward = t5_attention_forward
    text_transformer._build_causal_attention_mask = clip_causal_mask
    return True


# --- 13. LoRA scale 1.0 without walking every sublayer ---------------------------------------------------------
# ppdiffusers' SD3 transformer (and pipelines) call ``scale_lora_layers`` and ``unscale_lora_layers`` around every
# forward; at weight 1.0 each layer's scale is left as it is (``scale_layer`` returns, ``unscale_layer`` divides by
# 1.0), but both walk all sublayers: 1.2 of the tiny student's 5.5 ms no-grad forward. diffusers returns at once
# for 1.0; so do these.
def scale_lora_layers(model, weight):
    """ppdiffusers' ``scale_lora_layers``, returning at once for weight 1.0 (as diffusers' does)."""
    if weight == 1.0:
        return None
    return _UPSTREAM_LORA_SCALING[0](model, weight)


def unscale_lora_layers(model, weight=None):
    """ppdiffusers' ``unscale_lora_layers``, returning at once for weight 1.0."""
    if weight is not None and weight == 1.0:
        return None
    return _UPSTREAM_LORA_SCALING[1](model, weight)


_UPSTREAM_LORA_SCALING: list = []


def _patch_lora_scaling() -> bool:
    import sys

    from ppdiffusers.models import transformer_sd3  # noqa: F401  (holds the functions by name)
    from ppdiffusers.utils import peft_utils

    if peft_utils.scale_lora_layers is scale_lora_layers:
        return False
    _UPSTREAM_LORA_SCALING[:] = [peft_utils.scale_lora_layers, peft_utils.unscale_lora_layers]
    ours = {"scale_lora_layers": scale_lora_layers, "unscale_lora_layers": unscale_lora_layers}
    for module in list(sys.modules.values()):  # every ppdiffusers module that imported them by name
        if getattr(module, "__name__", "").startswith("ppdiffusers"):
            for name, function in ours.items():
                if getattr(module, name, None) in _UPSTREAM_LORA_SCALING:
                    setattr(module, name, function)
    return True


# --- 14. The SD3 blocks' joint attention ----------------------------------------------------------------------------
# ppdiffusers' ``JointAttnProcessor2_5`` concatenates the image and context tokens' queries, keys and values (three
# copies) and slices the attention's output apart (two more); backward undoes each (three splits, two zero-filled
# slice gradients and their sum). On CPU float32 the parts go to ``cpu_kernels.joint_attention`` as they are: the
# same bits as the fused attention on the concatenation (tested). Elsewhere the same steps as upstream. The processor
# also runs SD3.5's per-head q/k norms where the attention has them (``sd35_transformer``), and image-only attention
# (SD3.5's ``attn2``) without ``encoder_hidden_states``.
def joint_attention(heads, query, key, value, context_query=None, context_key=None, context_value=None):
    """Attention over the image tokens followed by the context tokens (all ``[B, N, heads * head_dim]``), split into
    the image and context outputs of the same shape (the image output alone without a context)."""
    parts = (query, key, value, context_query, context_key, context_value)
    if context_query is not None and cpu_kernels.joint_attention_runs(*parts):
        return cpu_kernels.joint_attention(*parts, heads, 1.0 / math.sqrt(query.shape[-1] // heads))
    batch, num_image_tokens, width = query.shape
    if context_query is not None:
        query, key, value = (paddle.concat([parts[i], parts[i + 3]], axis=1) for i in range(3))
    query, key, value = (t.reshape([batch, -1, heads, width // heads]) for t in (query, key, value))
    out = F.scaled_dot_product_attention_(query, key, value, dropout_p=0.0, is_causal=False)
    out = out.reshape([batch, -1, width]).astype(query.dtype)
    if context_query is None:
        return out
    return out[:, :num_image_tokens], out[:, num_image_tokens:]


def joint_attn_processor_call(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args,
                              **kwargs):
    """``JointAttnProcessor2_5.__call__`` for ``[B, N, C]`` tokens without a mask, through :func:`joint_attention`;
    anything else goes to upstream's."""
    if hidden_states.ndim != 3 or attention_mask is not None or (
            encoder_hidden_states is not None and encoder_hidden_states.ndim != 3):
        return _UPSTREAM_JOINT_ATTN_CALL[0](self, attn, hidden_states, encoder_hidden_states, attention_mask, *args,
                                            **kwargs)
    heads = attn.heads

    def project(layer, x, norm_name=None):  # with the per-head norm where the attention has one (SD3.5)
        x = layer(x)
        norm = getattr(attn, norm_name, None) if norm_name else None
        if norm is None:
            return x
        batch, tokens, width = x.shape
        return norm(x.reshape([batch, tokens, heads, width // heads])).reshape([batch, tokens, width])

    image_qkv = (project(attn.to_q, hidden_states, "norm_q"), project(attn.to_k, hidden_states, "norm_k"),
                 project(attn.to_v, hidden_states))
    if encoder_hidden_states is None:
        return attn.to_out[1](attn.to_out[0](joint_attention(heads, *image_qkv)))
    context_qkv = (project(attn.add_q_proj, encoder_hidden_states, "norm_added_q"),
                   project(attn.add_k_proj, encoder_hidden_states, "norm_added_k"),
                   project(attn.add_v_proj, encoder_hidden_states))
    image, context = joint_attention(heads, *image_qkv, *context_qkv)
    image = attn.to_out[1](attn.to_out[0](image))
    return image, (context if attn.context_pre_only else attn.to_add_out(context))


_UPSTREAM_JOINT_ATTN_CALL: list = []


def _patch_joint_attn_processor() -> bool:
    from ppdiffusers.models.attention_processor import JointAttnProcessor2_5

    if JointAttnProcessor2_5.__call__ is joint_attn_processor_call:
        return False
    _UPSTREAM_JOINT_ATTN_CALL[:] = [JointAttnProcessor2_5.__call__]
    JointAttnProcessor2_5.__call__ = joint_attn_processor_call
    return True


def apply() -> dict:
    """Apply every shim (idempotent). Returns which ones changed something on this call."""
    import ppdiffusers  # noqa: F401  (defines its own attention first where it can)

    changed = {
        "parameter_dict": _patch_parameter_dict(),
        "scaled_dot_product_attention_": _patch_sdpa(),
        "sd3_lora_rank": _patch_sd3_lora_rank(),
        "sd3_gradient_checkpointing": _patch_sd3_checkpointing(),
        "sd3_long_prompts": _patch_sd3_prompt_truncation(),
        "lora_result_dtype": _patch_lora_linear_dtype(),
        "sd35_transformers": _patch_sd35_selection(),
        "safe_weight_files": _patch_smart_load(),
        "cpu_conv2d_bias": _patch_conv2d_bias(),
        "cpu_kernel_layers": _patch_cpu_kernel_layers(),
        "cpu_attention_processor": _patch_attn_processor(),
        "cpu_text_encoders": _patch_text_encoders(),
        "lora_scale_one": _patch_lora_scaling(),
        "joint_attention": _patch_joint_attn_processor(),
    }
    return changed


apply()
