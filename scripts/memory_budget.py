#!/usr/bin/env python
"""GPU memory budget of PCM-LoRA SD3 training, computed rather than measured.

Paddle cannot run on a GPU here, so the peak memory of one training step is derived:

* **Parameters** are counted exactly from the module structure (analytic formulas that
  reproduce ``sum(p.numel())`` of the ppdiffusers models; the SD3 transformer and VAE
  formulas were checked against models built under ``paddle.LazyGuard()``, the text
  encoders against their published counts and all of them against the tiny test models).
* **Activations** are traced: a small symbolic tracer walks the exact op sequence of
  ``JointTransformerBlock`` / ``JointAttnProcessor2_5`` / the PEFT LoRA layers / the
  discriminator heads with tensor sizes, dtypes (autocast rules of each framework) and
  ``requires_grad`` flags, and records what autograd keeps for backward:
  Paddle keeps every input of a recorded op (measured on CPU: a frozen ``matmul`` still
  keeps its activation input), PyTorch keeps an input only when another input needs its
  gradient. Views share storage; flash / memory-efficient attention keep q, k, v, out and
  the log-sum-exp, plain (math) attention keeps the N x N probabilities.
* **What our trainer does on a GPU** (read from ppdiffusers 0.29 / Paddle 3.3 sources): attention is
  ppdiffusers' ``scaled_dot_product_attention_`` (flash for fp16/bf16 queries, memory-efficient
  "cutlass" for fp32 ones; paddle_compat's plain attention only where that is missing, e.g. CPU);
  ``ppdiffusers.peft`` casts a LoRA layer's result back to its *input* dtype, and the input of
  ``to_q/k/v``, ``to_out``, ``ff`` is the fp32 output of a LayerNorm under AMP, so the student's
  residual stream and attention run in fp32 after block 0 (PyTorch's peft keeps fp16).
* **One calibration constant** ``KAPPA`` multiplies all activation bytes (allocator
  rounding, backward-time gradient buffers, small tensors the tracer leaves out). It is
  fitted so that the PyTorch reference's G-step peak at the seed configuration equals the
  measured 57.2 GiB; the same model then predicts the reference's 41.2 GiB with
  ``--gradient_checkpointing`` (a check, not a fit) and, with Paddle's semantics and our
  trainer's structure, our peaks.

Usage::

    python scripts/memory_budget.py                       # one configuration (the seed's)
    python scripts/memory_budget.py --resolution 512 --batch_size 1 --gradient_checkpointing
    python scripts/memory_budget.py --table               # the README table

The last line printed is always one JSON object with the numbers.
"""
from __future__ import annotations

import argparse
import json
import sys

GiB = 1024**3

# ----------------------------------------------------------------------------------------------
# Model configurations (stabilityai/stable-diffusion-3-medium-diffusers)
# ----------------------------------------------------------------------------------------------
SD3_MEDIUM_TRANSFORMER = {
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 24, "attention_head_dim": 64,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192,
}
# stabilityai/stable-diffusion-3.5-medium and -large (transformer/config.json; text encoders and VAE as SD3's)
SD35_MEDIUM_TRANSFORMER = {**SD3_MEDIUM_TRANSFORMER, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
                           "dual_attention_layers": list(range(13))}
SD35_LARGE_TRANSFORMER = {**SD3_MEDIUM_TRANSFORMER, "num_layers": 38, "num_attention_heads": 38,
                          "caption_projection_dim": 2432, "qk_norm": "rms_norm"}
TRANSFORMERS = {"sd3-medium": SD3_MEDIUM_TRANSFORMER, "sd3.5-medium": SD35_MEDIUM_TRANSFORMER,
                "sd3.5-large": SD35_LARGE_TRANSFORMER}
CLIP_L = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
          "max_position_embeddings": 77, "projection_dim": 768}
CLIP_G = {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
          "max_position_embeddings": 77, "projection_dim": 1280}
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24,
          "relative_attention_num_buckets": 32, "feed_forward_proj": "gated-gelu"}
SD3_VAE = {"in_channels": 3, "out_channels": 3, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
           "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}
TEXT_TOKENS = 77 + 77  # CLIP (77) and T5 (77) sequences, concatenated
VAE_FACTOR = 8

# The PyTorch reference measured on one H100 80GB (SD3-medium, 1024 px, batch 2, fp16, rank 32, SDPA):
REFERENCE_MEASURED_GIB = {"no_checkpointing": 57.2, "gradient_checkpointing": 41.2}
HEADROOM = 0.10  # keep 10% of a card free for the allocator's fragmentation and the CUDA context
# A100 40GB: 40960 MiB; L40S / RTX 6000 Ada / A6000 48GB: 46068 MiB usable (45 GiB); A100 80GB: 81920 MiB
# (H100 80GB: 81559 MiB)
CARDS_GIB = {"40GB": 40.0, "48GB": 45.0, "80GB": 80.0}


# ----------------------------------------------------------------------------------------------
# Parameter counts (exact; Paddle layout)
# ----------------------------------------------------------------------------------------------
def _width(config: dict) -> int:
    return int(config["num_attention_heads"]) * int(config["attention_head_dim"])


def _lin(fan_in: int, fan_out: int, bias: bool = True) -> int:
    return fan_in * fan_out + (fan_out if bias else 0)


def _sd35_block(config: dict, i: int) -> tuple:
    """(qk-norm, MMDiT-X attn2) of block ``i`` (sd35_transformer.py; both False for SD3)."""
    return bool(config.get("qk_norm")), i in (config.get("dual_attention_layers") or ())


def transformer_parameter_count(config: dict) -> int:
    """``sum(p.numel() for p in SD3Transformer2DModel(**config).parameters())`` (ppdiffusers 0.29).

    Paddle's ``AdaLayerNormContinuous`` LayerNorm has ``weight_attr=False, bias_attr=True``, so the
    last block's ``norm1_context`` and ``norm_out`` carry a width-sized bias that diffusers (PyTorch)
    does not have: 2 x width more parameters than the PyTorch model."""
    d, p = _width(config), int(config["patch_size"])
    c_in = int(config["in_channels"])
    c_out = int(config.get("out_channels") or c_in)
    n = c_in * p * p * d + d                                            # pos_embed.proj
    n += _lin(256, d) + _lin(d, d)                                      # timestep_embedder
    n += _lin(int(config["pooled_projection_dim"]), d) + _lin(d, d)      # text_embedder
    n += _lin(int(config["joint_attention_dim"]), int(config["caption_projection_dim"]))  # context_embedder
    layers = int(config["num_layers"])
    for i in range(layers):
        last = i == layers - 1
        qk_norm, dual = _sd35_block(config, i)
        n += _lin(d, (9 if dual else 6) * d)                            # norm1.linear (SD3.5 MMDiT-X: 9 chunks)
        n += 4 * _lin(d, d) if dual else 0                              # attn2 to_q/k/v, to_out.0
        n += (4 + 2 * dual) * int(config["attention_head_dim"]) if qk_norm else 0  # q/k RMSNorm weights
        n += _lin(d, 2 * d) + d if last else _lin(d, 6 * d)              # norm1_context (+ LayerNorm bias)
        n += 7 * _lin(d, d)                                             # to_q/k/v, add_q/k/v, to_out.0
        n += _lin(d, 4 * d) + _lin(4 * d, d)                            # ff
        if not last:
            n += _lin(d, d) + _lin(d, 4 * d) + _lin(4 * d, d)            # to_add_out, ff_context
    n += _lin(d, 2 * d) + d                                             # norm_out (+ LayerNorm bias)
    n += _lin(d, p * p * c_out)                                         # proj_out
    return n


def lora_targets(config: dict) -> list:
    """``(name, fan_in, fan_out)`` of every Linear the reference's 22 target patterns wrap
    (``.add_*_proj`` match nothing, ``proj_in`` does not exist in SD3), plus ``("pos_embed.proj", ...)``
    for the patch-embedding Conv2d as ``(name, in_channels * k * k, out_channels)``."""
    d, p = _width(config), int(config["patch_size"])
    c_out = int(config.get("out_channels") or config["in_channels"])
    targets = [
        ("pos_embed.proj", int(config["in_channels"]) * p * p, d),
        ("time_text_embed.timestep_embedder.linear_1", 256, d),
        ("time_text_embed.timestep_embedder.linear_2", d, d),
        ("time_text_embed.text_embedder.linear_1", int(config["pooled_projection_dim"]), d),
        ("time_text_embed.text_embedder.linear_2", d, d),
        ("context_embedder", int(config["joint_attention_dim"]), int(config["caption_projection_dim"])),
        ("proj_out", d, p * p * c_out),
    ]
    layers = int(config["num_layers"])
    for i in range(layers):
        last = i == layers - 1
        pre = f"transformer_blocks.{i}."
        dual = _sd35_block(config, i)[1]
        targets += [(pre + "norm1.linear", d, (9 if dual else 6) * d), (pre + "norm1_context.linear", d, (2 if last else 6) * d)]
        targets += [(pre + f"{attn}.{m}", d, d) for attn in (("attn", "attn2") if dual else ("attn",))
                    for m in ("to_q", "to_k", "to_v", "to_out.0")]
        targets += [(pre + "ff.net.0.proj", d, 4 * d), (pre + "ff.net.2", 4 * d, d)]
        if not last:
            targets += [(pre + "attn.to_add_out", d, d), (pre + "ff_context.net.0.proj", d, 4 * d),
                        (pre + "ff_context.net.2", 4 * d, d)]
    return targets


def lora_parameter_count(config: dict, rank: int) -> int:
    """Trainable parameters ``pcm_lora.add_pcm_lora(transformer, rank)`` creates: ``r * (in + out)`` per
    wrapped Linear; for the Conv2d ``pos_embed.proj`` ``r * in * k * k`` (lora_A) + ``out * r`` (1x1 lora_B)."""
    return sum(rank * (fan_in + fan_out) for _, fan_in, fan_out in lora_targets(config))


def head_parameter_count(width: int) -> int:
    """One discriminator head: two 1x1 convs width->width (+bias), two GroupNorm(32, width), 1x1 conv to 1."""
    return 2 * (width * width + width) + 2 * 2 * width + width + 1


def clip_text_parameter_count(c: dict) -> int:
    """``CLIPTextModelWithProjection`` (token + position embeddings, layers, final LN, projection)."""
    h, i = int(c["hidden_size"]), int(c["intermediate_size"])
    per_layer = 4 * _lin(h, h) + 2 * 2 * h + _lin(h, i) + _lin(i, h)
    return (int(c["vocab_size"]) + int(c["max_position_embeddings"])) * h + int(c["num_hidden_layers"]) * per_layer \
        + 2 * h + h * int(c["projection_dim"])


def t5_encoder_parameter_count(c: dict) -> int:
    """``T5EncoderModel`` (shared embedding, layers without biases, relative bias in layer 0, final LN)."""
    d, f = int(c["d_model"]), int(c["d_ff"])
    inner = int(c["num_heads"]) * int(c["d_kv"])
    gated = str(c.get("feed_forward_proj", "relu")).startswith("gated")
    per_layer = 4 * d * inner + d + (2 if gated else 1) * d * f + f * d + d
    return int(c["vocab_size"]) * d + int(c["num_layers"]) * per_layer \
        + int(c["relative_attention_num_buckets"]) * int(c["num_heads"]) + d


def vae_parameter_count(c: dict) -> int:
    """``AutoencoderKL`` with DownEncoderBlock2D / UpDecoderBlock2D blocks and a mid-block attention."""
    ch, per_block = [int(x) for x in c["block_out_channels"]], int(c["layers_per_block"])
    z = int(c["latent_channels"])

    def conv(i, o, k):
        return i * o * k * k + o

    def resnet(i, o):
        return 2 * i + conv(i, o, 3) + 2 * o + conv(o, o, 3) + (conv(i, o, 1) if i != o else 0)

    top = ch[-1]
    mid = 2 * resnet(top, top) + (2 * top + 4 * _lin(top, top) if c.get("mid_block_add_attention", True) else 0)
    encoder, prev = conv(int(c.get("in_channels", 3)), ch[0], 3), ch[0]
    for k, out in enumerate(ch):
        encoder += sum(resnet(prev if j == 0 else out, out) for j in range(per_block))
        encoder += conv(out, out, 3) if k < len(ch) - 1 else 0
        prev = out
    encoder += mid + 2 * top + conv(top, 2 * z, 3)
    decoder, prev = conv(z, top, 3) + mid, top
    for k, out in enumerate(ch[::-1]):
        decoder += sum(resnet(prev if j == 0 else out, out) for j in range(per_block + 1))
        decoder += conv(out, out, 3) if k < len(ch) - 1 else 0
        prev = out
    decoder += 2 * ch[0] + conv(ch[0], int(c.get("out_channels", 3)), 3)
    quant = (conv(2 * z, 2 * z, 1) if c.get("use_quant_conv", True) else 0) + \
        (conv(z, z, 1) if c.get("use_post_quant_conv", True) else 0)
    return encoder + decoder + quant


def verify_counts_lazily() -> dict:
    """Build the SD3-medium transformer and VAE under ``paddle.LazyGuard()`` (no memory is allocated)
    and compare their parameter counts with the formulas. Needs paddle + ppdiffusers."""
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import paddle_compat  # noqa: F401  (before ppdiffusers)
    import paddle
    from ppdiffusers import AutoencoderKL, SD3Transformer2DModel

    def count(model):
        total = 0
        for param in model.parameters():
            n = 1
            for s in param.shape:
                n *= int(s)
            total += n
        return total

    with paddle.LazyGuard():
        transformer = SD3Transformer2DModel(**SD3_MEDIUM_TRANSFORMER)
        vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                            norm_num_groups=32, **SD3_VAE)
    return {"transformer": (count(transformer), transformer_parameter_count(SD3_MEDIUM_TRANSFORMER)),
            "vae": (count(vae), vae_parameter_count(SD3_VAE))}


def cpu_attention_kind() -> str:
    """The tracer's attention for this process on CPU: ``cpu_kernels``' fused attention where it is built, else
    ``paddle_compat``'s plain one."""
    import cpu_kernels

    return "cpu" if cpu_kernels.has_fused_attention() else "math"


def measure_g_step_on_cpu(teacher_dir: str, resolution: int, batch: int, rank: int, frozen_linear: bool,
                          head_recompute: bool = True, share_lora_input: bool = True,
                          frozen_factor_multiply: bool = True) -> dict:
    """What Paddle keeps for backward in a training step's graphs (fp32, CPU, real models from ``teacher_dir``):
    the student forward (LoRA), the discriminator's ``g_loss`` through the frozen teacher and its ``d_loss``
    (2B batch, backbone without gradients), measured with the host allocator and traced, with frozen Linear
    layers routed through ``frozen_linear`` or not, the heads recomputed in backward or not, the LoRA
    down-projections keeping their shared input (``frozen_linear.lora_down``) or not and the blocks' AdaLN
    products keeping only their frozen factor (``frozen_ops``) or not."""
    import gc
    import json
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import paddle_compat  # noqa: F401  (before ppdiffusers)
    import paddle
    from paddle.base import core
    from ppdiffusers import SD3Transformer2DModel

    import frozen_linear as frozen_linear_module
    import frozen_ops
    import pcm_lora
    from discriminator import Discriminator

    def load():
        model = SD3Transformer2DModel.from_pretrained(teacher_dir, subfolder="transformer")
        for param in model.parameters():
            param.stop_gradient = True
        return model.eval()

    def kept(fn):
        gc.collect()
        before = core.host_memory_stat_current_value("Allocated", 0)
        out = fn()
        return core.host_memory_stat_current_value("Allocated", 0) - before - int(out.numel()) * out.element_size()

    with open(os.path.join(teacher_dir, "transformer", "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    latent = resolution // VAE_FACTOR
    paddle.seed(0)
    sample = paddle.randn([batch, int(config["in_channels"]), latent, latent])
    kwargs = dict(timestep=paddle.full([batch], 500.0),
                  encoder_hidden_states=paddle.randn([batch, TEXT_TOKENS, int(config["joint_attention_dim"])]),
                  pooled_projections=paddle.randn([batch, int(config["pooled_projection_dim"])]))
    student = load()
    pcm_lora.add_pcm_lora(student, rank)
    fake = sample.clone()
    fake.stop_gradient = False
    disc = Discriminator(load())
    disc.recompute_heads = head_recompute
    previous = paddle.nn.Linear.forward
    previous_ops = frozen_ops.ENABLED, {cls: cls.forward for cls in frozen_ops.FORWARDS}
    frozen_linear_module.SHARE_LORA_INPUT = share_lora_input
    paddle.nn.Linear.forward = (frozen_linear_module.linear_forward if frozen_linear
                                else frozen_linear_module._UPSTREAM_FORWARD)
    frozen_ops.ENABLED = frozen_factor_multiply
    for cls, forward in (frozen_ops.FORWARDS if frozen_factor_multiply else frozen_ops._UPSTREAM_FORWARDS).items():
        cls.forward = forward
    try:
        measured = {"student forward": kept(lambda: student(hidden_states=sample, **kwargs).sample),
                    "discriminator g_loss": kept(lambda: disc("g_loss", fake, kwargs["timestep"],
                                                              kwargs["encoder_hidden_states"],
                                                              kwargs["pooled_projections"])),
                    "discriminator d_loss": kept(lambda: disc("d_loss", fake, sample, kwargs["timestep"],
                                                              kwargs["encoder_hidden_states"],
                                                              kwargs["pooled_projections"]))}
    finally:
        paddle.nn.Linear.forward = previous
        frozen_linear_module.SHARE_LORA_INPUT = True
        frozen_ops.ENABLED = previous_ops[0]
        for cls, forward in previous_ops[1].items():
            cls.forward = forward
    traced = {}
    for role, name in (("student", "student forward"), ("backbone", "discriminator g_loss"),
                       ("backbone", "discriminator d_loss")):
        tr = Trace("paddle", amp=False, attention=cpu_attention_kind(), frozen_linear=frozen_linear,
                   head_recompute=head_recompute,
                   share_lora_input=share_lora_input, frozen_factor=frozen_factor_multiply)
        d_loss = name.endswith("d_loss")
        out = trace_transformer(tr, config, batch=2 * batch if d_loss else batch, resolution=resolution, role=role,
                                rank=rank, input_dt="f32", input_grad=name.endswith("g_loss"), embeds_dt="f32",
                                weight_dt="f32", lora="active" if role == "student" else None)
        if role == "backbone":
            trace_heads(tr, out["features"], _width(config))
        traced[name] = tr.saved_bytes()
    return {"measured_bytes": measured, "traced_bytes": traced}


# ----------------------------------------------------------------------------------------------
# Activation tracer
# ----------------------------------------------------------------------------------------------
class Tensor:
    """A symbolic tensor: element count, dtype ('f32' or 'lp' = fp16/bf16), requires-grad, storage id."""

    __slots__ = ("n", "dt", "grad", "sid")

    def __init__(self, n, dt, grad, sid):
        self.n, self.dt, self.grad, self.sid = n, dt, grad, sid


class Trace:
    """Replays a forward pass op by op and records the storages autograd keeps for backward.

    engine: ``"paddle"`` (every input of a recorded op is kept) or ``"torch"`` (an input is kept only
    when another input of the op needs a gradient). ``amp``: autocast to the low-precision dtype
    (matmul/conv/attention to 'lp', layer/group norm and softmax to f32, other ops promote to f32 if any
    input is f32 - the O1 rules of both frameworks). ``attention``: ``"auto"`` (GPU: flash for
    low-precision queries, memory-efficient otherwise), ``"math"`` (plain softmax attention) or ``"cpu"``
    (Paddle on CPU with ``cpu_kernels``: its attention keeps q, k, v, the output and the log-sum-exp, in fp32,
    and slicing the output copies, as ``paddle_compat`` turns Paddle's stride kernels off on CPU).
    ``dropout_train``: Paddle modules in train mode run Dropout(p=0) and keep a uint8 mask."""

    def __init__(self, engine: str, amp: bool, lp_bytes: int = 2, attention: str = "auto", dropout_train=False,
                 peft_cast: str = None, frozen_linear: bool = True, head_recompute: bool = True,
                 share_lora_input: bool = True, frozen_factor: bool = True):
        self.engine, self.amp, self.lp_bytes, self.attention_kind = engine, amp, lp_bytes, attention
        self.frozen_linear = frozen_linear  # frozen_linear.install(): frozen nn.Linear keeps only its weight
        self.frozen_factor = frozen_factor and engine == "paddle"  # frozen_ops.multiply: AdaLN products
        self.head_recompute = head_recompute and engine == "paddle"  # discriminator.RecomputedHead
        self.share_lora_input = share_lora_input and engine == "paddle"  # frozen_linear.LoraDown
        # dtype a LoRA layer returns: the base layer result's (PyTorch peft, and ppdiffusers.peft with
        # paddle_compat's shim 6); "input" = ppdiffusers.peft without the shim
        self.peft_cast = peft_cast or "result"
        self.dropout_train = dropout_train and engine == "paddle"
        self.sizes, self.saved, self._next = {}, {}, 0
        self.lora_inputs = {}  # storage id -> its copy in the LoRA matmul's dtype (share_lora_input)

    # -- tensors
    def nbytes(self, dt):
        return {"f32": 4, "lp": self.lp_bytes, "u8": 1}[dt]

    def new(self, n, dt, grad=False):
        self._next += 1
        self.sizes[self._next] = int(n) * self.nbytes(dt)
        return Tensor(int(n), dt, grad, self._next)

    @staticmethod
    def param(n, dt, trainable=False):
        return Tensor(int(n), dt, trainable, None)  # parameters are counted with the weights

    @staticmethod
    def view(t, n=None):
        return Tensor(t.n if n is None else int(n), t.dt, t.grad, t.sid)

    def keep(self, *tensors):
        for t in tensors:
            if t.sid is not None:
                self.saved[t.sid] = self.sizes[t.sid]

    def saved_bytes(self) -> int:
        return sum(self.saved.values())

    def _keep_inputs(self, inputs, recorded):
        """Paddle: all inputs of a recorded op; torch: input i only if some other input needs grad."""
        if not recorded:
            return
        if self.engine == "paddle":
            self.keep(*inputs)
        else:
            for i, t in enumerate(inputs):
                if any(o.grad for j, o in enumerate(inputs) if j != i):
                    self.keep(t)

    # -- dtype rules
    def cast(self, t, dt, copy=False):
        """A cast keeps nothing for backward. To the same dtype, Paddle's ``astype`` and PyTorch's ``to``
        share the storage, Paddle's ``Tensor.cast`` copies (``copy=True``; measured)."""
        if t.dt == dt and not (copy and self.engine == "paddle"):
            return self.view(t)
        return self.new(t.n, dt, t.grad)

    def _white(self, *ts):
        return [self.cast(t, "lp") for t in ts] if self.amp else list(ts)

    def _black(self, *ts):
        return [self.cast(t, "f32") for t in ts]

    def _gray(self, *ts):
        if any(t.dt == "f32" for t in ts):
            return [self.cast(t, "f32") for t in ts]
        return list(ts)

    # -- ops
    def matmul(self, x, w, n_out):
        x, w = self._white(x, w)
        recorded = x.grad or w.grad
        self._keep_inputs([x, w], recorded)
        return self.new(n_out, x.dt, recorded)

    def linear(self, x, w, n_out):
        """``nn.Linear``: a matmul, except that this port's ``frozen_linear`` (Paddle) keeps nothing when the
        weight is frozen (its backward needs only the weight, a parameter); PyTorch's rule already does."""
        if self.engine == "paddle" and self.frozen_linear and not w.grad:
            (x,) = self._white(x)
            return self.new(n_out, x.dt, x.grad)
        return self.matmul(x, w, n_out)

    def mul(self, a, b):
        a, b = self._gray(a, b)
        recorded = a.grad or b.grad
        self._keep_inputs([a, b], recorded)
        return self.new(max(a.n, b.n), a.dt, recorded)

    def factor_mul(self, a, b):
        """An adaLN product in the SD3 block (``norm(x) * (1 + scale)``, ``gate * out``): a ``mul``, except that
        this port's ``frozen_ops.multiply`` (Paddle) keeps only the frozen input when the other needs a gradient
        (its backward needs only that factor); PyTorch's rule already does."""
        if self.frozen_factor and a.grad != b.grad:
            a, b = self._gray(a, b)
            self.keep(b if a.grad else a)
            return self.new(max(a.n, b.n), a.dt, True)
        return self.mul(a, b)

    def add(self, a, b):
        a, b = self._gray(a, b)
        return self.new(max(a.n, b.n), a.dt, a.grad or b.grad)

    def scale(self, x):
        return self.new(x.n, x.dt, x.grad)

    def concat(self, *ts):
        ts = self._gray(*ts)
        return self.new(sum(t.n for t in ts), ts[0].dt, any(t.grad for t in ts))

    def activation(self, x, inplace=False):
        """GELU / SiLU / LeakyReLU: keep the input (an in-place LeakyReLU keeps its output, same storage)."""
        if x.grad:
            self.keep(x)
        return self.view(x) if inplace else self.new(x.n, x.dt, x.grad)

    def layer_norm(self, x):
        (x,) = self._black(x)
        if x.grad:
            self.keep(x)
        return self.new(x.n, "f32", x.grad)

    def group_norm(self, x, trainable_affine=True):
        (x,) = self._black(x)
        if x.grad or trainable_affine:
            self.keep(x)
        return self.new(x.n, "f32", x.grad or trainable_affine)

    def dropout(self, x):
        """Dropout(p=0): identity in eval mode (and always in PyTorch); a Paddle module in train mode
        runs the op and keeps a uint8 mask."""
        if not self.dropout_train:
            return x
        out = self.new(x.n, x.dt, x.grad)
        if x.grad:
            self.keep(self.new(x.n, "u8"))
        return out

    def attention(self, q, k, v, batch, heads, tokens):
        """Returns the attention output (same element count as q)."""
        if self.attention_kind == "math":
            return self._math_attention(q, k, v, batch, heads, tokens)
        if self.attention_kind == "cpu":
            pass  # cpu_kernels.attention (CPU float32): no casts
        elif self.engine == "torch":
            q, k, v = self._white(q, k, v)  # SDPA is on autocast's low-precision list; fp32: mem-efficient
        elif self.amp and q.dt == "lp":
            q, k, v = self._white(q, k, v)  # flash_attn is on Paddle's AMP white list
        else:
            q, k, v = self._gray(q, k, v)   # memory-efficient (cutlass) attention runs in fp32
        recorded = q.grad or k.grad or v.grad
        out = self.new(q.n, q.dt, recorded)
        if recorded:
            self.keep(q, k, v, out, self.new(batch * heads * tokens, "f32"))  # + log-sum-exp
        return out

    def joint_attention(self, parts, batch, heads, tokens):
        """``cpu_kernels.joint_attention`` (CPU float32, ``paddle_compat`` shim 14) on the image and context q, k, v:
        keeps the six parts, both outputs and the log-sum-exp; returns the image and context outputs."""
        recorded = any(t.grad for t in parts)
        outputs = self.new(parts[0].n, "f32", recorded), self.new(parts[3].n, "f32", recorded)
        if recorded:
            self.keep(*parts, *outputs, self.new(batch * heads * tokens, "f32"))
        return outputs

    def _math_attention(self, q, k, v, batch, heads, tokens):
        """``paddle_compat.math_attention``: softmax(q k^T * scale) v with the probabilities kept."""
        n2 = batch * heads * tokens * tokens
        qs = self.scale(self.view(q))                      # q.transpose(...) * scale
        scores = self.matmul(qs, self.view(k), n2)         # keeps qs and k
        probs = self.new(n2, "f32", scores.grad)           # softmax(scores.astype(f32))
        if probs.grad:
            self.keep(probs)
        probs = self.cast(probs, q.dt)
        out = self.matmul(probs, self.view(v), q.n)        # keeps probs and v
        return self.new(out.n, out.dt, out.grad)           # transpose + reshape -> contiguous copy


def _peft_linear(tr, x, fan_in, fan_out, weight_dt, lora, rank, conv=False):
    """``nn.Linear`` (lora None) or the PEFT LoRA wrapper around it (lora 'active' / 'disabled');
    ``conv``: the base layer is a (patchifying) ``Conv2D``, which keeps its input as a matmul does.

    ppdiffusers.peft casts the result back to the *input's* dtype; PyTorch's peft to the base layer's
    result dtype. That difference decides whether our student's attention sees fp32 queries."""
    rows = x.n // fan_in
    base = tr.matmul if conv else tr.linear
    result = base(x, tr.param(fan_in * fan_out, weight_dt), rows * fan_out)
    if lora is None:
        return result
    target_dt = x.dt if tr.peft_cast == "input" else result.dt
    if lora == "active":
        if tr.share_lora_input and not conv:  # frozen_linear.LoraDown: x in the matmul's dtype, made and kept once
            dt = "lp" if tr.amp else "f32"
            if x.dt != dt and x.sid not in tr.lora_inputs:
                tr.lora_inputs[x.sid] = tr.new(x.n, dt)
            tr.keep(x if x.dt == dt else tr.lora_inputs[x.sid])
            a = tr.new(rows * rank, dt, True)
        else:
            xa = tr.cast(x, "f32", copy=True)  # x.cast(lora_A.weight.dtype): LoRA weights are fp32
            a = tr.matmul(xa, tr.param(fan_in * rank, "f32", trainable=True), rows * rank)
        b = tr.matmul(a, tr.param(rank * fan_out, "f32", trainable=True), rows * fan_out)
        result = tr.add(result, tr.scale(b))
    return tr.cast(result, target_dt)


def trace_block(tr, h, ctx, temb, *, width, heads, batch, n_img, n_txt, last, weight_dt, lora, rank,
                qk_norm=False, dual=False):
    """One ``JointTransformerBlock`` (ppdiffusers 0.29 / diffusers 0.30 have the same op sequence); with
    ``qk_norm`` / ``dual`` the SD3.5 block of sd35_transformer.py (q/k RMSNorms; MMDiT-X attn2)."""
    d = width

    def linear(x, fan_in, fan_out, target=True):
        return _peft_linear(tr, x, fan_in, fan_out, weight_dt, lora if target else None, rank)

    def modulate(x, scale, shift):  # norm(x) * (1 + scale[:, None]) + shift[:, None]
        return tr.add(tr.factor_mul(tr.layer_norm(x), tr.scale(scale)), shift)

    def rms_norm(x):  # sd35_transformer.RMSNorm: fp32 x * rsqrt(mean(x^2) + eps) * weight, back to x's dtype
        x32 = tr.cast(x, "f32")
        tr.mul(x32, x32)                                                # pow(2) keeps x32
        normed = tr.mul(x32, tr.new(x.n // (d // heads), "f32", x.grad))  # x32 * rsqrt(...)
        return tr.cast(tr.mul(normed, tr.param(d // heads, "f32")), x.dt)

    emb = linear(tr.activation(temb), d, (9 if dual else 6) * d)       # norm1.linear(silu(temb))
    chunk = Trace.view(emb, batch * d)                                  # shift/scale/gate (msa, mlp[, msa2])
    normed_h = tr.layer_norm(h)                                         # shared by attn and attn2 (MMDiT-X)
    x = tr.add(tr.factor_mul(normed_h, tr.scale(chunk)), chunk)
    cemb = linear(tr.cast(tr.activation(temb), ctx.dt) if last else tr.activation(temb), d, (2 if last else 6) * d)
    cchunk = Trace.view(cemb, batch * d)
    cx = modulate(ctx, cchunk, cchunk)

    q, k, v = (linear(x, d, d) for _ in range(3))                       # to_q/k/v (LoRA)
    cq, ck, cv = (linear(cx, d, d, target=False) for _ in range(3))    # add_q/k/v_proj (no LoRA)
    if qk_norm:
        q, k, cq, ck = (rms_norm(t) for t in (q, k, cq, ck))
    if tr.attention_kind == "cpu":  # paddle_compat's joint attention: the parts as they are, the outputs apart
        out, cout = tr.joint_attention((q, k, v, cq, ck, cv), batch, heads, n_img + n_txt)
    else:
        q, k, v = tr.concat(q, cq), tr.concat(k, ck), tr.concat(v, cv)
        out = tr.cast(tr.attention(q, k, v, batch, heads, n_img + n_txt), q.dt)  # .astype(query.dtype)
        out, cout = Trace.view(out, batch * n_img * d), Trace.view(out, batch * n_txt * d)  # the two slices
    attn = tr.dropout(linear(out, d, d))                                # to_out.0, to_out.1
    cattn = None if last else linear(cout, d, d)                        # to_add_out

    h = tr.add(h, tr.factor_mul(chunk, attn))
    if dual:  # attn2 over the image tokens on LayerNorm(block input) * (1 + scale2) + shift2
        x2 = tr.add(tr.factor_mul(normed_h, tr.scale(chunk)), chunk)
        q2, k2, v2 = (linear(x2, d, d) for _ in range(3))                # attn2.to_q/k/v (LoRA)
        if qk_norm:
            q2, k2 = rms_norm(q2), rms_norm(k2)
        out2 = tr.cast(tr.attention(q2, k2, v2, batch, heads, n_img), q2.dt)
        h = tr.add(h, tr.factor_mul(chunk, tr.dropout(linear(out2, d, d))))
    f = tr.activation(linear(modulate(h, chunk, chunk), d, 4 * d))     # ff.net.0 (proj + GELU)
    f = linear(tr.dropout(f), 4 * d, d)                                 # ff.net.1, ff.net.2
    h = tr.add(h, tr.factor_mul(chunk, f))
    if last:
        return h, None
    ctx = tr.add(ctx, tr.factor_mul(cchunk, cattn))
    g = tr.activation(linear(modulate(ctx, cchunk, cchunk), d, 4 * d))
    g = linear(tr.dropout(g), 4 * d, d)
    return h, tr.add(ctx, tr.factor_mul(cchunk, g))


def trace_transformer(tr, config, *, batch, resolution, role, rank=0, input_dt="lp", input_grad=False,
                      embeds_dt="lp", weight_dt="lp", lora=None):
    """The SD3 transformer forward (``role`` 'student': full model with output head; 'backbone': the
    discriminator's feature extractor, stopping after the blocks). Returns a dict with the bytes kept
    outside the blocks, per block, the block-input bytes (what gradient checkpointing keeps) and the
    per-block image-token outputs (the discriminator features)."""
    d, heads, p = _width(config), int(config["num_attention_heads"]), int(config["patch_size"])
    grid = resolution // VAE_FACTOR // p
    n_img, n_txt = grid * grid, TEXT_TOKENS
    c_in = int(config["in_channels"])

    def linear(x, fan_in, fan_out, target=True, conv=False):
        return _peft_linear(tr, x, fan_in, fan_out, weight_dt, lora if target else None, rank, conv=conv)

    start = tr.saved_bytes()
    # inputs exist before the forward (external storages, sid None); they are tiny next to the activations
    latent = Tensor(batch * c_in * (grid * p) ** 2, input_dt, input_grad, None)
    # pos_embed: proj (Conv2d patchify; LoRA-wrapped in the student) + positional table, cast to proj dtype
    proj = linear(latent, c_in * p * p, d, conv=True)
    h = tr.cast(tr.add(proj, tr.param(n_img * d, weight_dt)), proj.dt)  # (latent + pos_embed).cast(latent.dtype)
    # time_text_embed: time_proj (f32) cast to the pooled dtype, two MLPs; context_embedder
    t = linear(tr.activation(linear(tr.cast(tr.new(batch * 256, "f32"), embeds_dt), 256, d)), d, d)
    pooled = Tensor(batch * int(config["pooled_projection_dim"]), embeds_dt, False, None)
    temb = tr.add(t, linear(tr.activation(linear(pooled, int(config["pooled_projection_dim"]), d)), d, d))
    ctx = linear(Tensor(batch * n_txt * int(config["joint_attention_dim"]), embeds_dt, False, None),
                 int(config["joint_attention_dim"]), int(config["caption_projection_dim"]))
    prologue = tr.saved_bytes() - start

    per_block, block_inputs, features = [], [], []
    layers = int(config["num_layers"])
    for i in range(layers):
        block_inputs.append(tr.sizes[h.sid] + tr.sizes[ctx.sid] + tr.sizes[temb.sid])
        before = tr.saved_bytes()
        qk_norm, dual = _sd35_block(config, i)
        h, ctx = trace_block(tr, h, ctx, temb, width=d, heads=heads, batch=batch, n_img=n_img, n_txt=n_txt,
                             last=i == layers - 1, weight_dt=weight_dt, lora=lora, rank=rank, qk_norm=qk_norm, dual=dual)
        per_block.append(tr.saved_bytes() - before)
        features.append(h)
    epilogue = 0
    if role == "student":
        before = tr.saved_bytes()
        emb = _peft_linear(tr, tr.cast(tr.activation(temb), h.dt), d, 2 * d, weight_dt, None, rank)  # norm_out
        y = tr.add(tr.factor_mul(tr.layer_norm(h), tr.scale(Trace.view(emb, batch * d))), Trace.view(emb, batch * d))
        linear(y, d, p * p * int(config.get("out_channels") or c_in))   # proj_out (LoRA)
        epilogue = tr.saved_bytes() - before
    return {"prologue": prologue, "per_block": per_block, "block_inputs": block_inputs, "epilogue": epilogue,
            "features": features, "n_img": n_img, "n_txt": n_txt, "stream_dt": h.dt}


def trace_heads(tr, features, width, *, torch_inplace=False):
    """The discriminator heads on every block feature: returns the bytes they keep for backward and the
    largest of one head's beyond its input. Every head keeps its input, the block feature (its first conv's
    input; under ``tr.head_recompute``, this port's ``discriminator.RecomputedHead``, only that), and the rest
    is live only while that one head is recomputed in backward."""
    before, one_head = tr.saved_bytes(), 0
    for feature in features:
        tr.keep(feature)
        saved = dict(tr.saved)
        n = feature.n
        x = Trace.view(feature)  # tokens.transpose([0, 2, 1]).reshape([B, C, H, W]): views in both frameworks

        def conv(inp, fan_out_per_pixel):
            out = tr.matmul(inp, tr.param(width * fan_out_per_pixel, "f32", trainable=True),
                            n // width * fan_out_per_pixel)
            if tr.engine == "paddle":  # Paddle adds the fp32 bias as a separate (promoting) op
                out = tr.add(out, tr.param(fan_out_per_pixel, "f32", trainable=True))
            return out

        def conv_norm_act(inp):
            if tr.attention_kind == "cpu":  # CPU kernels: the conv without bias, then cpu_kernels.head_norm
                tr.matmul(inp, tr.param(width * width, "f32", trainable=True), n)  # keeps its input
                tr.keep(tr.new(n, "f32", True))  # bias, norm and activation in one op: it keeps the norm's input
                return tr.new(n, "f32", True)
            return tr.activation(tr.group_norm(conv(inp, width)), inplace=torch_inplace)

        first = conv_norm_act(x)
        second = conv_norm_act(first)
        conv(tr.add(second, first), 1)
        one_head = max(one_head, sum(tr.sizes[sid] for sid in tr.saved.keys() - saved.keys()))
        if tr.head_recompute:
            tr.saved = saved
    return tr.saved_bytes() - before, one_head


# ----------------------------------------------------------------------------------------------
# The budget of one training step
# ----------------------------------------------------------------------------------------------
def _nograd_working_set(batch, tokens, width, heads, act_bytes, attention):
    """Transient bytes of one block of a forward without gradients: the MLP working set (stream,
    two 4x-wide activations, an fp32 cast of one) or, with plain attention, the N x N scores."""
    mlp = batch * tokens * width * (4 + 8 * act_bytes + 16)
    if attention != "math":
        return mlp
    return max(mlp, batch * heads * tokens * tokens * (act_bytes + 4 + 4))


def step_budget(resolution=1024, batch_size=2, lora_rank=32, mixed_precision="fp16", gradient_checkpointing=False,
                implementation="ours", share_teacher_weights=False, attention="auto", text_encoders_on_gpu=True,
                kappa=None, config=None, peft_cast=None, frozen_linear=True, head_recompute=True,
                share_lora_input=True, frozen_factor_multiply=True) -> dict:
    """Peak GPU memory (bytes) of one training step, with the static part itemised.

    implementation 'ours' (this Paddle trainer) or 'reference' (the PyTorch script that was measured)."""
    config = dict(config or SD3_MEDIUM_TRANSFORMER)
    kappa = KAPPA if kappa is None else kappa
    engine = "paddle" if implementation == "ours" else "torch"
    attention = attention if implementation == "ours" else "auto"  # the reference was measured with SDPA
    amp = mixed_precision in ("fp16", "bf16")
    lp_bytes = 2
    wbytes = 2 if amp else 4
    wdt = "lp" if amp else "f32"
    B, d, heads = batch_size, _width(config), int(config["num_attention_heads"])
    layers = int(config["num_layers"])
    share = share_teacher_weights and implementation == "ours"

    # ---- static: weights, trainable state
    p_tr = transformer_parameter_count(config)
    pos_table = int(config["pos_embed_max_size"]) ** 2 * d
    p_lora = lora_parameter_count(config, lora_rank)
    p_heads = layers * head_parameter_count(d)
    p_text = clip_text_parameter_count(CLIP_L) + clip_text_parameter_count(CLIP_G) + t5_encoder_parameter_count(T5_XXL)
    static = {
        "teacher (fp32)": 0 if share else (p_tr + pos_table) * 4,
        f"student ({'fp32' if not amp else mixed_precision})": (p_tr + pos_table) * wbytes,
        "text encoders": p_text * wbytes if text_encoders_on_gpu else 0,
        "VAE (fp32)": vae_parameter_count(SD3_VAE) * 4,
        "LoRA params+grads+AdamW (fp32)": p_lora * 4 * 4,
        "heads params+grads+AdamW (fp32)": p_heads * 4 * 4,
    }
    static_total = sum(static.values())

    # ---- traced activations
    def tracer(dropout_train=False):
        return Trace(engine, amp, lp_bytes, attention, dropout_train=dropout_train, peft_cast=peft_cast,
                     frozen_linear=frozen_linear, head_recompute=head_recompute, share_lora_input=share_lora_input,
                     frozen_factor=frozen_factor_multiply)

    student_train = implementation == "reference" or gradient_checkpointing  # ours: train() only with ckpt
    teacher_train = implementation == "ours" and gradient_checkpointing
    st_tr = tracer(student_train)
    student = trace_transformer(st_tr, config, batch=B, resolution=resolution, role="student", rank=lora_rank,
                                input_dt=wdt, input_grad=False, embeds_dt=wdt, weight_dt=wdt, lora="active")
    S_full = st_tr.saved_bytes()
    backbone_weight_dt = wdt if share else "f32"
    backbone_lora = "disabled" if share else None
    disc_tr = tracer(teacher_train)
    fake = trace_transformer(disc_tr, config, batch=B, resolution=resolution, role="backbone", rank=lora_rank,
                             input_dt="f32", input_grad=True, embeds_dt="f32", weight_dt=backbone_weight_dt,
                             lora=backbone_lora)
    T_full = disc_tr.saved_bytes()
    H_g, H_one_g = trace_heads(disc_tr, fake["features"], d, torch_inplace=engine == "torch")
    n_img, n_txt = student["n_img"], student["n_txt"]
    tokens = n_img + n_txt

    # D step: backbone on detached samples (ours: fake and real as one batch of 2B; reference: two passes)
    d_batch = 2 * B if implementation == "ours" else B
    dtr = tracer(teacher_train)
    dpass = trace_transformer(dtr, config, batch=d_batch, resolution=resolution, role="backbone", rank=lora_rank,
                              input_dt="f32", input_grad=False, embeds_dt="f32", weight_dt=backbone_weight_dt,
                              lora=backbone_lora)
    H_d, H_one_d = trace_heads(dtr, dpass["features"], d, torch_inplace=engine == "torch")

    act = 4 if not amp else lp_bytes
    teacher_nograd = _nograd_working_set(2 * B if implementation == "ours" else B, tokens, d, heads, act, attention)
    student_nograd = _nograd_working_set(B, tokens, d, heads, act, attention)
    vae_transient = B * 128 * resolution * resolution * 4 * 3
    if attention == "math":
        vae_transient = max(vae_transient, B * (resolution // VAE_FACTOR) ** 4 * 4 * 2)

    # checkpointing: block inputs kept, one block recomputed at a time in backward
    S_ck = student["prologue"] + student["epilogue"] + sum(student["block_inputs"])
    S_blk = max(student["per_block"])
    T_ck = fake["prologue"] + sum(fake["block_inputs"])
    T_blk = max(fake["per_block"])
    S_g = S_ck if gradient_checkpointing else S_full
    T_g = T_ck if (gradient_checkpointing and implementation == "ours") else T_full

    phases = {
        "step start: VAE encode": vae_transient,
        "G: teacher CFG pass (no grad)": S_g + teacher_nograd,
        "G: target student pass (no grad)": S_g + student_nograd,
        "G: discriminator g_loss, end of forward": S_g + T_g + H_g,
    }
    if gradient_checkpointing:
        if implementation == "ours":
            phases["G: backward, first teacher block recomputed"] = S_g + T_g + H_g + T_blk
        phases["G: backward, student block recomputed"] = S_g + S_blk + student_nograd
    if implementation == "ours":
        phases["D: student / teacher / target passes (no grad)"] = max(teacher_nograd, student_nograd)
        phases["D: discriminator d_loss (2B batch), end of forward"] = H_d  # the heads keep the features
        if head_recompute:  # then the heads' bytes live one head at a time, in backward
            phases["G: backward, one head recomputed"] = S_g + T_g + H_one_g
            phases["D: backward, one head recomputed"] = H_d + H_one_d
    else:  # the reference runs the student with gradients in D steps too, and D(fake), D(real) separately
        phases["D: discriminator d_loss (fake, real passes)"] = S_g + 2 * H_d  # the heads keep the features
    peak_phase = max(phases, key=phases.get)
    activations = {
        "student forward (saved)": S_g, "teacher as discriminator, G step (saved, incl. weight casts)": T_g,
        "discriminator heads, G step (saved)": H_g, "discriminator heads, D step (saved)": H_d,
    }
    # bytes kept per token and channel, per block (per image token for the heads) - the README's formulas
    per_tc = {
        "student block": sum(student["per_block"]) / (layers * B * tokens * d),
        "teacher-as-discriminator block": sum(fake["per_block"]) / (layers * B * tokens * d),
        "discriminator head": H_one_g / (B * n_img * d),
    }
    return {
        "implementation": implementation, "resolution": resolution, "batch_size": B, "lora_rank": lora_rank,
        "mixed_precision": mixed_precision, "gradient_checkpointing": gradient_checkpointing,
        "share_teacher_weights": share, "attention": attention,
        "tokens": {"image": n_img, "text": n_txt},
        "parameters": {"transformer": p_tr, "lora": p_lora, "heads": p_heads, "text_encoders": p_text,
                       "vae": vae_parameter_count(SD3_VAE)},
        "static_bytes": static, "static_total_bytes": static_total,
        "activation_bytes_raw": activations, "phase_activation_bytes_raw": phases,
        "student_stream_dtype": student["stream_dt"], "kappa": kappa, "bytes_per_token_channel": per_tc,
        "peak_phase": peak_phase, "peak_bytes": static_total + kappa * phases[peak_phase],
        "peak_gib": (static_total + kappa * phases[peak_phase]) / GiB,
    }


def calibrate() -> float:
    """``KAPPA`` such that the reference's no-checkpointing G-step peak is the measured 57.2 GiB."""
    raw = step_budget(implementation="reference", gradient_checkpointing=False, kappa=1.0)
    act = raw["phase_activation_bytes_raw"][raw["peak_phase"]]
    return (REFERENCE_MEASURED_GIB["no_checkpointing"] * GiB - raw["static_total_bytes"]) / act


KAPPA = calibrate()


def fits(peak_gib: float) -> dict:
    """Which cards hold the peak with ``HEADROOM`` left for fragmentation and the CUDA context."""
    return {name: peak_gib <= (1 - HEADROOM) * size for name, size in CARDS_GIB.items()}


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
TABLE_ROWS = [
    # (label, implementation, resolution, batch, ckpt, share)
    ("reference (PyTorch), measured 57.2", "reference", 1024, 2, False, False),
    ("reference (PyTorch), measured 41.2", "reference", 1024, 2, True, False),
    ("ours", "ours", 1024, 2, False, False),
    ("ours", "ours", 1024, 2, True, False),
    ("ours", "ours", 1024, 1, False, False),
    ("ours", "ours", 1024, 1, True, False),
    ("ours", "ours", 512, 2, False, False),
    ("ours", "ours", 512, 2, True, False),
    ("ours --share_teacher_weights", "ours", 1024, 2, False, True),
    ("ours --share_teacher_weights", "ours", 1024, 2, True, True),
    # SD3.5 (a 7th item names the transformer in TRANSFORMERS): what it takes to fit 80 GB at 1024 px
    ("ours SD3.5-medium", "ours", 1024, 2, False, False, "sd3.5-medium"),
    ("ours SD3.5-medium", "ours", 1024, 2, True, False, "sd3.5-medium"),
    ("ours SD3.5-large", "ours", 1024, 2, True, False, "sd3.5-large"),
    ("ours SD3.5-large --share_teacher_weights", "ours", 1024, 2, True, True, "sd3.5-large"),
]


def _row(label, result) -> dict:
    ok = fits(result["peak_gib"])
    return {
        "label": label, "implementation": result["implementation"], "resolution": result["resolution"],
        "batch_size": result["batch_size"], "gradient_checkpointing": result["gradient_checkpointing"],
        "share_teacher_weights": result["share_teacher_weights"],
        "static_gib": round(result["static_total_bytes"] / GiB, 1),
        "peak_gib": round(result["peak_gib"], 1), "peak_phase": result["peak_phase"],
        **{f"fits_{card}": ok[card] for card in CARDS_GIB},
    }


def print_rows(rows, out=sys.stdout):
    cards = "".join(f"{card:<5}" for card in CARDS_GIB)
    header = f"{'configuration':<40} {'px':>5} {'B':>2} {'ckpt':>4} {'static':>7} {'peak':>7}  {cards}peak phase"
    print(header, file=out)
    print("-" * len(header), file=out)
    for r in rows:
        print(f"{r['label']:<40} {r['resolution']:>5} {r['batch_size']:>2} {'yes' if r['gradient_checkpointing'] else 'no':>4} "
              f"{r['static_gib']:>7.1f} {r['peak_gib']:>7.1f}  "
              + "".join(f"{'yes' if r[f'fits_{card}'] else 'no':<5}" for card in CARDS_GIB) + r["peak_phase"], file=out)


# --measure_cpu: each saving switched on after the one before
# (name, frozen_linear, head recompute, LoRA input, frozen AdaLN factors)
MEASURED_SAVINGS = [("upstream", False, False, False, False), ("frozen_linear", True, False, False, False),
                    ("head_recompute", True, True, False, False), ("share_lora_input", True, True, True, False),
                    ("frozen_factor_multiply", True, True, True, True)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=2, help="per-GPU batch (--train_batch_size)")
    parser.add_argument("--lora_rank", type=int, default=32)
    parser.add_argument("--mixed_precision", default="fp16", choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--share_teacher_weights", action="store_true",
                        help="--share_teacher_weights: teacher/discriminator backbone = the student's frozen base")
    parser.add_argument("--implementation", default="ours", choices=["ours", "reference"])
    parser.add_argument("--attention", default="auto", choices=["auto", "math"],
                        help="auto: fused attention as on a GPU; math: plain attention (CPU, or "
                             "FLAGS_cudnn_deterministic / FLAGS_sdpa_select_math set)")
    parser.add_argument("--peft_cast", default="result", choices=["input", "result"],
                        help="dtype our LoRA layers return. result = the base layer's (PyTorch peft; ppdiffusers.peft "
                             "with paddle_compat); input = what-if without paddle_compat's shim (the fp32 LayerNorm "
                             "output's, so the student's stream and attention run in fp32)")
    parser.add_argument("--transformer", default="sd3-medium", choices=sorted(TRANSFORMERS),
                        help="teacher transformer (published config; text encoders and VAE are the same for all)")
    parser.add_argument("--no_frozen_linear", action="store_true",
                        help="what-if without frozen_linear (frozen Linear layers keep their input, Paddle's default)")
    parser.add_argument("--no_head_recompute", action="store_true",
                        help="what-if without discriminator.RecomputedHead (every head keeps its activations)")
    parser.add_argument("--no_share_lora_input", action="store_true",
                        help="what-if without frozen_linear.lora_down (every LoRA down-projection keeps an fp32 copy "
                             "of its input)")
    parser.add_argument("--no_frozen_factor_multiply", action="store_true",
                        help="what-if without frozen_ops (the blocks' AdaLN products norm(x) * (1 + scale) and "
                             "gate * out keep both inputs, Paddle's default, also where the factor is frozen)")
    parser.add_argument("--table", action="store_true", help="print the README table (fixed configurations)")
    parser.add_argument("--measure_cpu", metavar="TEACHER_DIR", default=None,
                        help="instead: measure what Paddle keeps for a G step's student forward and discriminator "
                             "g_loss on CPU (fp32, this --resolution/--batch_size/--lora_rank, teacher from "
                             "make_tiny_sd3.py), each saving switched on after the one before, next to the tracer's "
                             "numbers")
    parser.add_argument("--verify_counts", action="store_true",
                        help="also build SD3-medium's transformer and VAE under paddle.LazyGuard and compare counts")
    args = parser.parse_args(argv)
    if args.resolution % (VAE_FACTOR * int(SD3_MEDIUM_TRANSFORMER["patch_size"])):
        parser.error("--resolution must be a multiple of 16")

    if args.measure_cpu:
        print(f"{'graph':<22}{'saving on (with those above)':>30}{'measured MB':>13}{'traced MB':>11}")
        summary = {}
        for name, *switches in MEASURED_SAVINGS:
            result = measure_g_step_on_cpu(args.measure_cpu, args.resolution, args.batch_size, args.lora_rank,
                                           *switches)
            summary[name] = result
            for graph, measured in result["measured_bytes"].items():
                print(f"{graph:<22}{name:>30}{measured / 2**20:>13.1f}{result['traced_bytes'][graph] / 2**20:>11.1f}")
        print(json.dumps(summary))
        return 0
    summary = {"kappa": round(KAPPA, 4), "headroom": HEADROOM}
    ref = {k: step_budget(implementation="reference", gradient_checkpointing=ck)["peak_gib"]
           for k, ck in (("no_checkpointing", False), ("gradient_checkpointing", True))}
    summary["calibration"] = {k: {"measured_gib": REFERENCE_MEASURED_GIB[k], "model_gib": round(v, 2),
                                  "error": round(v / REFERENCE_MEASURED_GIB[k] - 1, 4)} for k, v in ref.items()}
    if args.verify_counts:
        summary["lazy_counts"] = {k: {"lazy": a, "formula": b} for k, (a, b) in verify_counts_lazily().items()}

    if args.table:
        rows = []
        for label, impl, res, bs, ck, share, *transformer in TABLE_ROWS:
            ours = impl == "ours"  # the reference rows are the measured (calibration) configuration
            result = step_budget(resolution=res, batch_size=bs, lora_rank=args.lora_rank if ours else 32,
                                 mixed_precision=args.mixed_precision if ours else "fp16", gradient_checkpointing=ck,
                                 implementation=impl, share_teacher_weights=share, attention=args.attention,
                                 peft_cast=args.peft_cast if ours else None, frozen_linear=not args.no_frozen_linear,
                                 head_recompute=not args.no_head_recompute,
                                 share_lora_input=not args.no_share_lora_input,
                                 frozen_factor_multiply=not args.no_frozen_factor_multiply,
                                 config=TRANSFORMERS[transformer[0]] if transformer else None)
            rows.append(_row(label, result))
        print(f"SD3-medium, ours: {args.mixed_precision}, LoRA rank {args.lora_rank}, attention {args.attention}"
              f"{', what-if --peft_cast input (no compat shim)' if args.peft_cast == 'input' else ''}"
              f"{', what-if without frozen_linear' if args.no_frozen_linear else ''}"
              f"{', what-if without head recompute' if args.no_head_recompute else ''}"
              f"{', what-if without the shared LoRA input' if args.no_share_lora_input else ''}"
              f"{', what-if without frozen AdaLN factors' if args.no_frozen_factor_multiply else ''}; reference: fp16, rank 32; "
              f"kappa {KAPPA:.4f}")
        print(f"peak GiB per GPU (allocated); fits = peak <= {1 - HEADROOM:.0%} of the card "
              f"({HEADROOM:.0%} left for allocator fragmentation and the CUDA context)")
        print_rows(rows)
        summary["rows"] = rows
    else:
        result = step_budget(resolution=args.resolution, batch_size=args.batch_size, lora_rank=args.lora_rank,
                             mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
                             implementation=args.implementation, share_teacher_weights=args.share_teacher_weights,
                             attention=args.attention, config=TRANSFORMERS[args.transformer], frozen_linear=not args.no_frozen_linear,
                             head_recompute=not args.no_head_recompute,
                             share_lora_input=not args.no_share_lora_input,
                             frozen_factor_multiply=not args.no_frozen_factor_multiply, peft_cast=args.peft_cast if args.implementation == "ours" else None)
        label = args.implementation + ("" if args.transformer == "sd3-medium" else f" {args.transformer}") \
            + (" --share_teacher_weights" if result["share_teacher_weights"] else "")
        print_rows([_row(label, result)])
        print("static:", ", ".join(f"{k} {v / GiB:.2f}" for k, v in result["static_bytes"].items()), "GiB")
        print("activations (x kappa):", ", ".join(f"{k} {v * KAPPA / GiB:.2f}"
                                                  for k, v in result["activation_bytes_raw"].items()), "GiB")
        summary["result"] = {**_row(label, result),
                             "static_gib_items": {k: round(v / GiB, 3) for k, v in result["static_bytes"].items()},
                             "activation_gib": {k: round(v * KAPPA / GiB, 3)
                                                for k, v in result["activation_bytes_raw"].items()},
                             "phase_gib": {k: round((result["static_total_bytes"] + KAPPA * v) / GiB, 2)
                                           for k, v in result["phase_activation_bytes_raw"].items()},
                             "parameters": result["parameters"], "student_stream_dtype": result["student_stream_dtype"],
                             "bytes_per_token_channel": {k: round(v, 2) for k, v in
                                                         result["bytes_per_token_channel"].items()}}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
