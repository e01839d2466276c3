"""The PCM adversarial discriminator for SD3 (PCM_SPEC §3.9).

The frozen teacher transformer is the feature extractor: the image-token hidden
states after every transformer block. One small trainable head per block turns
its tokens, reshaped to the latent patch grid ``[B, C, H/p, W/p]``, into a map of
logits. Unlike the reference (64x64 tokens and 24 blocks of width 1536 hard-coded,
so only 1024 px SD3-medium works) the grid is read from the input and the head
count and width from the transformer config: any resolution, SD3 and SD3.5 (whose MMDiT-X ``attn2``
runs inside the block, so the features after each block include it).

The backbone is the teacher object itself (or, with ``--share_teacher_weights``, the student's frozen
base), held by reference (not a sublayer), so ``parameters()`` and ``state_dict()`` hold only the heads.
"""
from __future__ import annotations

import paddle
import paddle.nn as nn
import paddle.nn.functional as F

from paddle.autograd import PyLayer

import cpu_kernels
from paddle_compat import run_joint_blocks
from pcm_lora import FrozenBaseView


class DiscriminatorHead(nn.Layer):
    """1x1 conv -> GroupNorm(32) -> LeakyReLU, the same again with a residual, 1x1 conv to one channel."""

    def __init__(self, channels: int, out_channels: int = 1):
        super().__init__()
        if channels % 32:
            raise ValueError(f"discriminator head width {channels} must be a multiple of 32 (GroupNorm(32))")
        self.conv1 = nn.Sequential(nn.Conv2D(channels, channels, 1), nn.GroupNorm(32, channels), nn.LeakyReLU())
        self.conv2 = nn.Sequential(nn.Conv2D(channels, channels, 1), nn.GroupNorm(32, channels), nn.LeakyReLU())
        self.conv_out = nn.Conv2D(channels, out_channels, 1)

    def forward(self, tokens: paddle.Tensor, grid_height: int, grid_width: int) -> paddle.Tensor:
        batch, num_tokens, channels = tokens.shape
        if num_tokens != grid_height * grid_width:
            raise ValueError(f"{num_tokens} tokens do not form a {grid_height}x{grid_width} grid")
        shape = [batch, channels, grid_height, grid_width]
        if _fused(self.conv1, tokens):  # the first 1x1 conv straight from the tokens, W x tokens^T: no transposed copy
            weight = self.conv1[0].weight.reshape([channels, channels])
            x = _norm_act(self.conv1, paddle.matmul(weight, tokens, transpose_y=True).reshape(shape))
        else:
            x = self.conv1(tokens.transpose([0, 2, 1]).reshape(shape))
        x = _conv_norm_act(self.conv2, x) + x
        return self.conv_out(x)


def _fused(block: nn.Sequential, x: paddle.Tensor) -> bool:
    conv, norm, act = block
    return cpu_kernels.head_norm_runs(x, norm, act._negative_slope, conv.bias, norm.weight, norm.bias)


def _norm_act(block: nn.Sequential, product: paddle.Tensor) -> paddle.Tensor:
    """The rest of ``block`` (1x1 conv, GroupNorm, LeakyReLU) on its convolution's product without the bias: bias,
    norm and activation as one op (``cpu_kernels.head_norm``: the same values and gradients)."""
    conv, norm, act = block
    return cpu_kernels.head_norm(product, conv.bias, norm, act._negative_slope)


def _conv_norm_act(block: nn.Sequential, x: paddle.Tensor) -> paddle.Tensor:
    """``block(x)``; on CPU float32 the convolution without its bias, then :func:`_norm_act`."""
    if _fused(block, x):
        return _norm_act(block, F.conv2d(x, block[0].weight))
    return block(x)


class RecomputedHead(PyLayer):
    """A head run without keeping its activations: forward keeps only the block feature (which exists anyway,
    as the next block's input or the D step's detached feature) and recomputes the head in backward, one head
    at a time, giving the gradients of its parameters (and of the feature when it needs one). Same kernels in
    the same order as a plain backward, so the same bits (tested in fp32); costs one more head forward.
    The parameters are inputs so that their gradients accumulate as usual (also under DataParallel)."""

    @staticmethod
    def forward(ctx, head, grid_height, grid_width, tokens, *params):
        ctx.head, ctx.grid = head, (grid_height, grid_width)
        ctx.save_for_backward(tokens)
        with paddle.no_grad(), cpu_kernels.forward_only_kernels_off():  # the ops backward's recomputation runs
            return head(tokens, grid_height, grid_width)

    @staticmethod
    def backward(ctx, grad_output):
        (tokens,) = ctx.saved_tensor()
        x = tokens.detach()
        x.stop_gradient = tokens.stop_gradient
        params = [p for p in ctx.head.parameters() if not p.stop_gradient]
        with paddle.set_grad_enabled(True):
            out = ctx.head(x, *ctx.grid)
        inputs = ([] if x.stop_gradient else [x]) + params
        grads = paddle.grad([out], inputs, [grad_output])
        return tuple(([None] if x.stop_gradient else []) + grads)


def block_features(backbone, sample, timestep, encoder_hidden_states, pooled_projections) -> list:
    """Image-token hidden states ``[B, H/p * W/p, C]`` after every block of an SD3 transformer.

    ``backbone`` is a transformer, or a :class:`pcm_lora.FrozenBaseView` of the student, whose pieces then
    run with the LoRA adapters off (also when recomputed under gradient checkpointing)."""
    wrap = backbone.wrap if isinstance(backbone, FrozenBaseView) else (lambda module: module)
    hidden_states = wrap(backbone.pos_embed)(sample)
    temb = wrap(backbone.time_text_embed)(timestep, pooled_projections)
    context = wrap(backbone.context_embedder)(encoder_hidden_states)
    features = []
    run_joint_blocks(backbone, hidden_states, context, temb, features, wrap=wrap)
    return features


class Discriminator(nn.Layer):
    """Heads on the frozen backbone's block features, with the hinge losses of PCM.

    Call through ``forward(mode, ...)`` (``"d_loss"``, ``"g_loss"`` or ``"logits"``) so that a
    ``paddle.DataParallel`` wrapper sees every use of the heads. On an accelerator each head runs as a
    :class:`RecomputedHead`; on CPU, where memory is not what limits a run and the recomputation only costs time
    (one more forward of each head: ~10 ms of the small benchmark teacher's 0.5 s step), as a plain layer keeping
    its activations. The same results either way (tested); ``recompute_heads`` True or False chooses.
    """

    recompute_heads = None  # None: recompute on accelerators, not on CPU

    def __init__(self, backbone, num_heads_per_block: int = 1):
        super().__init__()
        object.__setattr__(self, "backbone", backbone)  # a reference, not a sublayer
        config = backbone.config
        width = config.num_attention_heads * config.attention_head_dim
        self.patch_size = config.patch_size
        self.num_heads_per_block = num_heads_per_block
        self.heads = nn.LayerList(
            [nn.LayerList([DiscriminatorHead(width) for _ in range(num_heads_per_block)]) for _ in range(config.num_layers)]
        )

    @property
    def num_heads(self) -> int:
        return len(self.heads) * self.num_heads_per_block

    def logits(self, sample, timestep, encoder_hidden_states, pooled_projections) -> list:
        """One logit map ``[B, 1, H/p, W/p]`` per head."""
        grid_h, grid_w = sample.shape[-2] // self.patch_size, sample.shape[-1] // self.patch_size
        features = block_features(self.backbone, sample, timestep, encoder_hidden_states, pooled_projections)
        if len(features) != len(self.heads):
            raise ValueError(f"backbone gave {len(features)} block features for {len(self.heads)} head groups")
        recompute = self.recompute_heads
        if recompute is None:
            recompute = not paddle.get_device().startswith("cpu")
        if not recompute:
            return [head(feature, grid_h, grid_w) for feature, group in zip(features, self.heads) for head in group]
        return [RecomputedHead.apply(head, grid_h, grid_w, feature, *[p for p in head.parameters() if not p.stop_gradient])
                for feature, group in zip(features, self.heads) for head in group]

    def d_loss(self, fake, real, timestep, encoder_hidden_states, pooled_projections) -> paddle.Tensor:
        """``sum_heads [mean(relu(1 + D(fake))) + mean(relu(1 - D(real)))] / #heads`` on detached samples.

        Fake and real go through the backbone as one batch (the per-sample result is the same)."""
        batch = fake.shape[0]
        both = paddle.concat([fake.detach(), real.detach()])
        outputs = self.logits(
            both, paddle.concat([timestep, timestep]), paddle.concat([encoder_hidden_states] * 2),
            paddle.concat([pooled_projections] * 2),
        )
        loss = paddle.zeros([], dtype="float32")
        for out in outputs:
            out = out.astype("float32")
            loss = loss + F.relu(1 + out[:batch]).mean() + F.relu(1 - out[batch:]).mean()
        return loss / self.num_heads

    def g_loss(self, fake, timestep, encoder_hidden_states, pooled_projections) -> paddle.Tensor:
        """``sum_heads mean(relu(1 - D(fake))) / #heads``; gradients flow through the backbone into ``fake``."""
        outputs = self.logits(fake, timestep, encoder_hidden_states, pooled_projections)
        loss = paddle.zeros([], dtype="float32")
        for out in outputs:
            loss = loss + F.relu(1 - out.astype("float32")).mean()
        return loss / self.num_heads

    def forward(self, mode: str, *args):
        if mode == "d_loss":
            return self.d_loss(*args)
        if mode == "g_loss":
            return self.g_loss(*args)
        if mode == "logits":
            return self.logits(*args)
        raise ValueError(f"unknown discriminator mode {mode!r}")
