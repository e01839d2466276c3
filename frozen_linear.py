"""Frozen linear layers that keep only their weight for backward.

Paddle's ``linear`` op records every input for backward, so a frozen ``nn.Linear`` whose input needs a
gradient keeps that input alive until backward although the only gradient it computes,
``dx = dy @ W^T``, needs the weight alone. PyTorch keeps the input only when the weight needs a
gradient. In this trainer that difference is most of the activation memory of a G step: the frozen
teacher run as discriminator backbone (gradients flow to the generated sample, no weight trains) and the
frozen base layers inside the student's LoRA layers (see ``scripts/memory_budget.py``).

:func:`install` routes exactly those calls (grad enabled, input needs a gradient, weight and bias frozen)
through :class:`FrozenWeightLinear`: the same forward op, and a backward that is the op Paddle's own
``matmul`` backward runs for the input, so losses and gradients are bit-identical (tested in fp32).
Every other call (trainable weights, no-grad passes, frozen inputs) runs ``nn.Linear.forward`` unchanged.
"""
from __future__ import annotations

import paddle
import paddle.nn.functional as F
from paddle.autograd import PyLayer


class FrozenWeightLinear(PyLayer):
    """``F.linear(x, weight, bias)`` with a gradient for ``x`` only, saving ``weight`` (a parameter that
    exists anyway) instead of ``x``. Under autocast the weight is cast again in backward rather than
    keeping its low-precision copy."""

    @staticmethod
    def forward(ctx, x, weight, bias=None):
        ctx.save_for_backward(weight)
        ctx.input_dtype = x.dtype
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        (weight,) = ctx.saved_tensor()
        grad_input = paddle.matmul(grad_output, weight.astype(grad_output.dtype), transpose_y=True)
        return grad_input.astype(ctx.input_dtype)


def _is_frozen(param) -> bool:
    return param is None or param.stop_gradient


def linear_forward(self, input):
    """``paddle.nn.Linear.forward``, through :class:`FrozenWeightLinear` where only the input needs a gradient."""
    if input.stop_gradient or not _is_frozen(self.weight) or not _is_frozen(self.bias) or not paddle.is_grad_enabled():
        return _UPSTREAM_FORWARD(self, input)
    if self.bias is None:
        return FrozenWeightLinear.apply(input, self.weight)
    return FrozenWeightLinear.apply(input, self.weight, self.bias)


_UPSTREAM_FORWARD = paddle.nn.Linear.forward


def install() -> bool:
    """Route frozen ``paddle.nn.Linear`` layers through :class:`FrozenWeightLinear` (idempotent).
    Returns whether this call changed anything."""
    if paddle.nn.Linear.forward is linear_forward:
        return False
    paddle.nn.Linear.forward = linear_forward
    return True
