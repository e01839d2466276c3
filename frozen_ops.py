"""Multiplies by frozen AdaLN factors that keep only the factor for backward.

Paddle's ``multiply`` records both inputs for backward. In the SD3 block the adaLN-Zero products
``norm(x) * (1 + scale)`` and ``gate * attn_output`` / ``gate * ff_output`` (both streams) multiply a large
activation ``[B, N, D]`` by a small factor ``[B, 1, D]`` computed from the timestep embedding. In the frozen
teacher run as discriminator backbone (G step: gradients flow to the generated sample, no weight trains) the
factor is frozen, and the only gradient that flows, ``d activation = dy * factor``, needs the factor alone, yet
Paddle keeps the activation too (the LayerNorm output, the attention and MLP outputs): most of what is left
of a G step's teacher activations after ``frozen_linear`` (see ``scripts/memory_budget.py``).

:func:`multiply` routes exactly those products (grad enabled, one input needs a gradient, the other is frozen
and broadcasts against it) through :class:`FrozenFactorMultiply`: the same forward op, and a backward that is
the op Paddle's own ``multiply`` backward runs for the activation, so losses and gradients are bit-identical
(tested in fp32). Everything else (the student, whose AdaLN linears carry LoRA so its factors need gradients;
no-grad passes) is a plain ``multiply``.

:func:`install` (called by ``frozen_linear.install``, which the trainer's ``load_models`` runs) switches this
on and makes ppdiffusers 0.29's ``AdaLayerNormZero``, ``AdaLayerNormContinuous`` and ``JointTransformerBlock``
use it; ``sd35_transformer``'s SD3.5 block and ``SD35AdaLayerNormZeroX`` call :func:`multiply` themselves.
The replaced forwards run ppdiffusers' ops in ppdiffusers' order, with :func:`multiply` for those products.

Speed on CPU: Paddle's CPU kernels for a broadcast multiply or add (``[B, N, D]`` with ``[B, 1, D]``) are 2-17x
slower than expanding the small operand first and running the same-shape kernel (``[2, 1024, 256]``: 6.9 ms
against 3.0 ms; ``[2, 154, 256]``: 0.84 against 0.05 ms). :func:`multiply` and :func:`add` therefore expand a
factor before the op, on CPU only: the same elementwise products and sums, bit for bit. A factor that needs a
gradient (the student's, through its LoRA) is expanded too when it broadcasts along one axis (``[B, 1, D]``): the
factor's gradient is then a sum over that axis, which Paddle computes with the same kernel and order as the
broadcast op's own backward (bit for bit, tested; products go through :class:`FactorMultiply`, which keeps the
small factor for backward as Paddle's multiply does); the student's AdaLN products take 2.3 -> 0.76 ms forward
and backward at ``[2, 256, 256]``.

The same holds for the bias of a frozen linear layer: ``F.linear`` adds it with the broadcast kernel
(``[4, 410, 768] + [768]``: 2.2 ms against 1.0 ms expanded first). :func:`linear` (which ``frozen_linear`` runs
for ``nn.Linear``) adds a frozen bias on CPU into the product in place where no graph records the product
(``cpu_kernels.add_bias``: no-grad passes, ``FrozenWeightLinear``'s forward), else expanded: the same matmul and
the same sums. A bias that trains keeps
the broadcast add (none does in this trainer; there expanding would be slower in backward). ``Conv2D``'s bias:
``paddle_compat``.
"""
from __future__ import annotations

import math
import os

import paddle_compat  # noqa: F401  (before ppdiffusers)
import cpu_kernels
import paddle
import paddle.nn.functional as F
from paddle.autograd import PyLayer
from ppdiffusers.models.attention import JointTransformerBlock, _chunked_feed_forward
from ppdiffusers.models.normalization import AdaLayerNormContinuous, AdaLayerNormZero

ENABLED = False  # install() turns it on; False: every product is a plain multiply (upstream's graph)


def _over_one_axis(small, big) -> bool:
    """Whether ``small`` broadcasts against ``big`` along exactly one axis (``[B, 1, D]`` against ``[B, N, D]``)."""
    differ = [(a, b) for a, b in zip(small.shape, big.shape) if a != b]
    return len(small.shape) == len(big.shape) and len(differ) == 1 and differ[0][0] == 1


def _expanded(small, big):
    """``small`` expanded to ``big``'s shape when that is faster: on CPU, a frozen operand of another shape, or one
    that needs a gradient and broadcasts along one axis (expand's backward then sums that axis with the same
    kernel as the broadcast op's backward: the same bits, tested; :func:`multiply` sends such a product with grad
    on through :class:`FactorMultiply`, which keeps the small factor)."""
    if (list(small.shape) != list(big.shape) and big.place.is_cpu_place()
            and (small.stop_gradient or _over_one_axis(small, big))):
        return small.expand(big.shape)
    return small


def _product(x, factor, factor_first=False):
    """``x * factor`` (``factor * x``: the same products) where no graph records it, through
    ``cpu_kernels.factor_multiply`` for a ``[B, 1, D]`` factor against ``[B, N, D]`` on CPU (no expanded copy), else
    with the factor expanded where that is faster."""
    if cpu_kernels.factor_multiply_runs(x, factor):
        return cpu_kernels.factor_multiply(x, factor)
    wide = _expanded(factor, x)
    return wide * x if factor_first else x * wide


class FrozenFactorMultiply(PyLayer):
    """``x * factor`` (``factor * x`` with ``factor_first``) with a gradient for ``x`` only, saving the small
    ``factor`` (in the product's dtype, as Paddle's multiply keeps it) instead of ``x``."""

    @staticmethod
    def forward(ctx, x, factor, factor_first=False):
        out = _product(x, factor, factor_first)
        ctx.save_for_backward(factor if factor.dtype == out.dtype else factor.astype(out.dtype))
        ctx.input_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_output):
        (factor,) = ctx.saved_tensor()
        # Paddle's multiply_grad: dx = dout * y, for an x of the output's shape
        grad_input = _product(grad_output, factor)
        return grad_input if grad_input.dtype == ctx.input_dtype else grad_input.astype(ctx.input_dtype)


class FactorMultiply(PyLayer):
    """``x * factor`` (``factor * x`` with ``factor_first``) for a ``factor`` that needs a gradient and broadcasts
    along one axis: the product of the expanded factor (Paddle's same-shape kernel, fast on CPU), keeping ``x`` and
    the small ``factor`` as Paddle's ``multiply`` does (not the expanded copy); backward is Paddle's
    ``multiply_grad``: ``dx = dout * factor``, ``dfactor`` the sum of ``dout * x`` over that axis (bit for bit,
    tested)."""

    @staticmethod
    def forward(ctx, x, factor, factor_first=False):
        ctx.axis = next(i for i, (a, b) in enumerate(zip(factor.shape, x.shape)) if a != b)
        ctx.save_for_backward(x, factor)
        wide = factor.expand(x.shape)
        return wide * x if factor_first else x * wide

    @staticmethod
    def backward(ctx, grad_output):
        x, factor = ctx.saved_tensor()
        return grad_output * factor.expand(grad_output.shape), (grad_output * x).sum(axis=ctx.axis, keepdim=True)


def _trainable_factor(small, big) -> bool:
    """Both need a gradient and ``small`` broadcasts along one axis of ``big`` (same dtype, on CPU)."""
    return (not small.stop_gradient and not big.stop_gradient and small.dtype == big.dtype
            and big.place.is_cpu_place() and _over_one_axis(small, big))


def _broadcasts_to(small, shape) -> bool:
    return list(paddle.broadcast_shape(small.shape, shape)) == list(shape)


def _plain(op, a, b):
    """``op(a, b)`` with a frozen, broadcast operand expanded first where that is faster (see the module doc)."""
    if not ENABLED:
        return op(a, b)
    if _broadcasts_to(a, b.shape):
        return op(_expanded(a, b), b)
    if _broadcasts_to(b, a.shape):
        return op(a, _expanded(b, a))
    return op(a, b)


def _trainable_product(x, factor, factor_first):
    """:class:`FactorMultiply`, or for ``[B, 1, D]`` against ``[B, N, D]`` ``cpu_kernels.factor_multiply`` (its graph
    node keeps what Paddle's multiply keeps, and backward gives its gradients: the same bits)."""
    if cpu_kernels.factor_multiply_runs(x, factor):
        return cpu_kernels.factor_multiply(x, factor)
    return FactorMultiply.apply(x, factor, factor_first)


def multiply(a, b):
    """``a * b``; through :class:`FrozenFactorMultiply` when enabled, grad is on, exactly one input needs a
    gradient and the frozen one broadcasts against it (the other's shape is the product's); through
    :class:`FactorMultiply` (or its compiled kernel) when both need one and one broadcasts along one axis (on CPU);
    without gradients, a ``[B, 1, D]`` factor against ``[B, N, D]`` through the kernel (no expanded copy)."""
    if not ENABLED or cpu_kernels.no_gradient(a, b):
        if ENABLED and cpu_kernels.factor_multiply_runs(a, b):
            return cpu_kernels.factor_multiply(a, b)
        if ENABLED and cpu_kernels.factor_multiply_runs(b, a):
            return cpu_kernels.factor_multiply(b, a)
        return _plain(paddle.multiply, a, b)
    if _trainable_factor(b, a):
        return _trainable_product(a, b, False)
    if _trainable_factor(a, b):
        return _trainable_product(b, a, True)
    if a.stop_gradient == b.stop_gradient:
        return _plain(paddle.multiply, a, b)
    if b.stop_gradient and _broadcasts_to(b, a.shape):
        return FrozenFactorMultiply.apply(a, b, False)
    if a.stop_gradient and _broadcasts_to(a, b.shape):
        return FrozenFactorMultiply.apply(b, a, True)
    return a * b


def add(a, b):
    """``a + b``, a frozen broadcast operand expanded first on CPU."""
    return _plain(paddle.add, a, b)


def linear(x, weight, bias=None):
    """``F.linear(x, weight, bias)``; without a bias its matmul (``F.linear``'s own op, without its ~10 us flag lookup
    per call), on CPU a frozen bias added in place or expanded (the same matmul and sums)."""
    if (math.prod(x.shape[:-1]) * weight.shape[-1] >= cpu_kernels.MIN_BIAS_KERNEL_ELEMENTS
            and cpu_kernels.linear_runs(x, weight, bias)):  # no gradients, CPU: one op (below, Paddle's are faster)
        return cpu_kernels.linear(x, weight, bias)
    if bias is None:
        return paddle.matmul(x, weight)
    if not bias.stop_gradient or not x.place.is_cpu_place():
        return F.linear(x, weight, bias)
    out = paddle.matmul(x, weight)
    if out.stop_gradient:  # no graph holds the product: the bias goes in place
        return cpu_kernels.add_bias(out, bias)
    return out + bias.expand(out.shape)


def modulate(x, scale, shift):
    """adaLN modulation ``x * (1 + scale[:, None]) + shift[:, None]`` (``scale``, ``shift``: ``[B, D]``)."""
    return add(multiply(x, 1 + scale[:, None]), shift[:, None])


# False: a trained scale and shift (the student's AdaLN, through its LoRA) are modulated by the separate ops. The fused
# op gives the same values and gradients, but the timestep embedding's gradient then adds its terms in another order
# (last-bit differences in the embedders' LoRA): the savings' bit-identity tests switch it off in both arms.
FUSE_TRAINED_MODULATION = True


def norm_modulate(norm, x, scale, shift):
    """``modulate(norm(x), scale, shift)``; for a LayerNorm without weight and bias over the last axis on CPU, one
    compiled op (the same bits as the LayerNorm kernel and the ops, and with gradients the same gradients and kept
    tensors)."""
    if (ENABLED and type(norm) is paddle.nn.LayerNorm and norm.weight is None and norm.bias is None
            and len(norm._normalized_shape) == 1 and cpu_kernels.layer_norm_modulate_runs(x, scale, shift)
            and (FUSE_TRAINED_MODULATION or scale.stop_gradient or not paddle.is_grad_enabled())):
        return cpu_kernels.layer_norm_modulate(x, scale, shift, norm._epsilon)
    return modulate(norm(x), scale, shift)


def gated_residual(x, gate, y):
    """The gated residual ``x + gate.unsqueeze(1) * y``; without gradients on CPU one compiled op (the same bits)."""
    if ENABLED and cpu_kernels.gated_residual_runs(x, gate, y):
        return cpu_kernels.gated_residual(x, gate, y)
    return x + gated(gate, y)


def gated(gate, x):
    """The gated residual branch ``gate.unsqueeze(1) * x`` (``gate``: ``[B, D]``)."""
    return multiply(gate.unsqueeze(1), x)


# --- ppdiffusers 0.29's forwards with multiply() for the frozen-factor products ----------------------------


def ada_layer_norm_zero_forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
    """``AdaLayerNormZero.forward``: ``(norm(x) * (1 + scale_msa) + shift_msa, gate_msa, shift_mlp,
    scale_mlp, gate_mlp)``."""
    if self.emb is not None:
        emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.linear(self.silu(emb)).chunk(6, axis=1)
    return norm_modulate(self.norm, x, scale_msa, shift_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


def ada_layer_norm_continuous_forward(self, x, conditioning_embedding):
    """``AdaLayerNormContinuous.forward``: ``norm(x) * (1 + scale) + shift`` (the Triton inference path
    unchanged)."""
    if os.getenv("INFERENCE_OPTIMIZE_TRITON"):
        return _UPSTREAM_FORWARDS[AdaLayerNormContinuous](self, x, conditioning_embedding)
    scale, shift = paddle.chunk(self.linear(self.silu(conditioning_embedding).cast(x.dtype)), 2, axis=1)
    return norm_modulate(self.norm, x, scale, shift)


def _feed_forward(block, ff, x):
    if block._chunk_size is not None:
        return _chunked_feed_forward(ff, x, block._chunk_dim, block._chunk_size)
    return ff(x)


def joint_transformer_block_forward(self, hidden_states, encoder_hidden_states, temb):
    """``JointTransformerBlock.forward`` (SD3's MM-DiT block): returns ``(encoder_hidden_states,
    hidden_states)``, the context ``None`` in the last (``context_pre_only``) block."""
    norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, emb=temb)
    if self.context_pre_only:
        norm_context = self.norm1_context(encoder_hidden_states, temb)
    else:
        norm_context, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states,
                                                                                            emb=temb)
    attn_output, context_attn_output = self.attn(hidden_states=norm_x, encoder_hidden_states=norm_context)
    hidden_states = gated_residual(hidden_states, gate_msa, attn_output)
    norm_x = norm_modulate(self.norm2, hidden_states, scale_mlp, shift_mlp)
    hidden_states = gated_residual(hidden_states, gate_mlp, _feed_forward(self, self.ff, norm_x))
    if self.context_pre_only:
        return None, hidden_states
    encoder_hidden_states = gated_residual(encoder_hidden_states, c_gate_msa, context_attn_output)
    norm_context = norm_modulate(self.norm2_context, encoder_hidden_states, c_scale_mlp, c_shift_mlp)
    encoder_hidden_states = gated_residual(encoder_hidden_states, c_gate_mlp,
                                           _feed_forward(self, self.ff_context, norm_context))
    return encoder_hidden_states, hidden_states


FORWARDS = {AdaLayerNormZero: ada_layer_norm_zero_forward,
            AdaLayerNormContinuous: ada_layer_norm_continuous_forward,
            JointTransformerBlock: joint_transformer_block_forward}
_UPSTREAM_FORWARDS = {cls: cls.forward for cls in FORWARDS}


def install() -> bool:
    """Keep only the frozen factor of the SD3 blocks' AdaLN products (idempotent). Returns whether this call
    changed anything."""
    global ENABLED
    changed = not ENABLED
    ENABLED = True
    for cls, forward in FORWARDS.items():
        if cls.forward is not forward:
            cls.forward = forward
            changed = True
    return changed
