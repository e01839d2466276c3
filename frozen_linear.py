"""Frozen linear layers that keep only their weight for backward.

Paddle's ``linear`` op records every input for backward, so a frozen ``nn.Linear`` whose input needs a
gradient keeps that input alive until backward although the only gradient it computes,
``dx = dy @ W^T``, needs the weight alone. PyTorch keeps the input only when the weight needs a
gradient. In this trainer that difference is most of the activation memory of a G step: the frozen
teacher run as discriminator backbone (gradients flow to the generated sample, no weight trains) and the
frozen base layers inside the student's LoRA layers (see ``scripts/memory_budget.py``).

:func:`install` routes exactly those calls (grad enabled, input needs a gradient, weight and bias frozen)
through :class:`FrozenWeightLinear`: the same forward op, and a backward that is the op Paddle's own
``matmul`` backward runs for the input, so losses and gradients are bit-identical (tested in fp32). On CPU in
float32 the same computation runs as one compiled op each way (``cpu_kernels.frozen_linear``; likewise
:class:`LoraLinear` as ``cpu_kernels.lora_linear``): the same bits without a Python call per layer in backward.
Every other call (trainable weights, no-grad passes, frozen inputs) runs ``nn.Linear.forward`` unchanged.
It also installs ``frozen_ops``, the same idea for the SD3 blocks' multiplies by frozen AdaLN factors.

:func:`lora_down` is the LoRA down-projection (``lora_A``) of ``paddle_compat``'s LoRA ``Linear.forward``
through :class:`LoraDown`, which keeps the layer input once in the matmul's dtype (in fp32 the input itself;
under autocast one low-precision copy that ``to_q``, ``to_k`` and ``to_v`` share) instead of each layer's own
copies: the same values, bit-identical results (tested in fp32).
"""
from __future__ import annotations

import weakref

import paddle
from paddle.autograd import PyLayer

import cpu_kernels
import frozen_ops


class FrozenWeightLinear(PyLayer):
    """``F.linear(x, weight, bias)`` with a gradient for ``x`` only, saving ``weight`` (a parameter that
    exists anyway) instead of ``x``. Under autocast the weight is cast again in backward rather than
    keeping its low-precision copy."""

    @staticmethod
    def forward(ctx, x, weight, bias=None):
        ctx.save_for_backward(weight)
        ctx.input_dtype = x.dtype
        return frozen_ops.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensor()
        grad_input = paddle.matmul(grad_output, weight.astype(grad_output.dtype), transpose_y=True)
        return grad_input.astype(ctx.input_dtype)


class LoraDown(PyLayer):
    """``F.linear(x.cast(weight.dtype), weight)`` (a LoRA ``lora_A`` without bias) that saves ``x`` in the
    matmul's dtype - ``x`` itself in fp32, under autocast one low-precision copy per input tensor, shared by the
    layers that read it - instead of each layer's own copies; backward runs the ops Paddle's ``matmul``
    backward runs, casting the gradients back as the casts' backward does."""

    @staticmethod
    def forward(ctx, x, weight):
        out = paddle.matmul(x.astype(weight.dtype), weight)  # F.linear's op without a bias
        ctx.compute_dtype = out.dtype  # the weight's, or autocast's low-precision dtype
        ctx.input_dtype, ctx.input_needs_grad = x.dtype, not x.stop_gradient
        ctx.save_for_backward(_in_dtype(x, out.dtype), weight)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensor()
        dtype = ctx.compute_dtype
        rows = x.reshape([-1, weight.shape[0]])
        grad_weight = paddle.matmul(rows, grad_output.reshape([-1, weight.shape[1]]), transpose_x=True)
        grad_weight = grad_weight.astype(weight.dtype)
        if not ctx.input_needs_grad:
            return None, grad_weight
        grad_input = paddle.matmul(grad_output, weight.astype(dtype), transpose_y=True)
        return grad_input.astype(weight.dtype).astype(ctx.input_dtype), grad_weight


class LoraLinear(PyLayer):
    """A float32 LoRA ``Linear`` with a frozen base layer, ``x @ W + b + (x @ A) @ B * scale``, as one node: the ops
    of ``FrozenWeightLinear``, :class:`LoraDown`, ``lora_B``'s matmul, the scale, and the sum (the same forward bits),
    keeping what they keep (``x`` and ``h = x @ A``; ``W``, ``A``, ``B`` are parameters) without their six graph
    nodes and the branch's same-dtype copy (``Tensor.cast``). Backward runs the ops those nodes' backwards run, but
    adds the input's two gradient terms here, where the engine added them among the input's other consumers, and
    computes ``dA`` transposed (last-bit differences in ``dx`` and ``dA``). On the small benchmark teacher's G step
    (CPU): see README."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale):
        out = frozen_ops.linear(x, weight, bias)
        h = paddle.matmul(x, lora_a)
        out.add_(paddle.matmul(h, lora_b).scale_(scale))
        ctx.save_for_backward(x, h, weight, lora_a, lora_b)
        ctx.scale, ctx.has_bias, ctx.input_needs_grad = scale, bias is not None, not x.stop_gradient
        return out

    @staticmethod
    def backward(ctx, grad_output):
        x, h, weight, lora_a, lora_b = ctx.saved_tensor()
        rank, width = lora_b.shape
        grad = grad_output * ctx.scale  # the scale's backward
        grad_b = paddle.matmul(h.reshape([-1, rank]), grad.reshape([-1, width]), transpose_x=True)
        grad_h = paddle.matmul(grad, lora_b, transpose_y=True)
        # dA = x^T dh as (dh^T x)^T: MKL's [r, rows] x [rows, K] product is 2-3x faster than one with r outputs
        grad_a = paddle.matmul(grad_h.reshape([-1, rank]), x.reshape([-1, lora_a.shape[0]]), transpose_x=True).T
        grad_x = None
        if ctx.input_needs_grad:
            grad_x = paddle.matmul(grad_output, weight, transpose_y=True) + paddle.matmul(grad_h, lora_a,
                                                                                           transpose_y=True)
        return (grad_x, None, None, grad_a, grad_b) if ctx.has_bias else (grad_x, None, grad_a, grad_b)


FUSE_LORA_WITH_GRAD = True  # False: LoRA layers with gradients run layer by layer (bit-identity tests of the savings)


def lora_linear(x, weight, bias, lora_a, lora_b, scale: float):
    """:class:`LoraLinear` where it applies: switched on, ``frozen_linear`` installed with the shared LoRA input (the
    trainer's savings; off, the layers' own ops run, as the memory measurements switch them), grad on, CPU, a frozen
    base layer and a trainable adapter. ``None`` elsewhere."""
    if (not FUSE_LORA_WITH_GRAD or not SHARE_LORA_INPUT or paddle.nn.Linear.forward is not linear_forward
            or not paddle.is_grad_enabled()
            or not x.place.is_cpu_place() or not _is_frozen(weight) or not _is_frozen(bias)
            or lora_a.stop_gradient or lora_b.stop_gradient):
        return None
    if cpu_kernels.frozen_linear_runs(x, weight, bias, lora_a, lora_b):  # float32: the node's ops as one compiled op
        return cpu_kernels.lora_linear(x, weight, bias, lora_a, lora_b, scale)
    return LoraLinear.apply(x, weight, bias, lora_a, lora_b, scale)


_last_copy = [lambda: None, lambda: None]  # weak references: the last input cast by _in_dtype, and its copy


def _in_dtype(x, dtype):
    """``x`` cast to ``dtype`` (the same values as autocast's cast), made once for consecutive calls with the same
    tensor (to_q, to_k, to_v), held weakly here."""
    if x.dtype == dtype:
        return x
    copy = _last_copy[1]()
    if _last_copy[0]() is not x or copy is None or copy.dtype != dtype:
        copy = x.cast(dtype)
        _last_copy[:] = [weakref.ref(x), weakref.ref(copy)]
    return copy


SHARE_LORA_INPUT = True  # False: the LoRA branch as ppdiffusers.peft runs it (for tests and measurements)


def lora_down(lora_A, dropout, x):
    """``lora_A(dropout(x.cast(lora_A.weight.dtype)))``, through :class:`LoraDown` when the dropout is the
    identity (PEFT's ``lora_dropout=0``), ``lora_A`` has no bias and its weight trains."""
    if not SHARE_LORA_INPUT:  # ppdiffusers.peft's own branch: Tensor.cast copies x even to its own dtype
        return lora_A(dropout(x.cast(lora_A.weight.dtype)))
    if (not isinstance(dropout, paddle.nn.Identity) or lora_A.bias is not None or lora_A.weight.stop_gradient
            or not paddle.is_grad_enabled()):
        return lora_A(dropout(x.astype(lora_A.weight.dtype)))  # astype: no copy to the same dtype
    return LoraDown.apply(x, lora_A.weight)


def _is_frozen(param) -> bool:
    return param is None or param.stop_gradient


def linear_forward(self, input):
    """``paddle.nn.Linear.forward``, through :class:`FrozenWeightLinear` where only the input needs a gradient, and
    with a frozen bias added expanded on CPU (``frozen_ops.linear``)."""
    if input.stop_gradient or not _is_frozen(self.weight) or not _is_frozen(self.bias) or not paddle.is_grad_enabled():
        return frozen_ops.linear(input, self.weight, self.bias)
    if cpu_kernels.frozen_linear_runs(input, self.weight, self.bias):  # float32: one compiled op each way, same bits
        return cpu_kernels.frozen_linear(input, self.weight, self.bias)
    if self.bias is None:
        return FrozenWeightLinear.apply(input, self.weight)
    return FrozenWeightLinear.apply(input, self.weight, self.bias)


_UPSTREAM_FORWARD = paddle.nn.Linear.forward


def install() -> bool:
    """Route frozen ``paddle.nn.Linear`` layers through :class:`FrozenWeightLinear` and the SD3 blocks' frozen
    AdaLN products through ``frozen_ops`` (idempotent). Returns whether this call changed anything."""
    changed = frozen_ops.install()
    if paddle.nn.Linear.forward is linear_forward:
        return changed
    paddle.nn.Linear.forward = linear_forward
    return True
