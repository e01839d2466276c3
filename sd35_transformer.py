"""SD3.5 transformers (stabilityai/stable-diffusion-3.5-medium and -large) for ppdiffusers 0.29.

ppdiffusers 0.29 implements the SD3 MM-DiT only. SD3.5 adds, per the published diffusers
``transformer/config.json``:

* ``qk_norm: "rms_norm"`` (medium and large): an RMSNorm (eps 1e-6, learned weight of one head's width)
  on every head's query and key, ``attn.norm_q`` / ``attn.norm_k`` for the image stream and
  ``attn.norm_added_q`` / ``attn.norm_added_k`` for the context stream's added projections.
* ``dual_attention_layers`` (medium, MMDiT-X: blocks 0-12): those blocks carry a second attention over
  the image tokens only (``attn2``, with its own q/k norms) and an adaLN-Zero (``norm1``) that produces nine
  modulation chunks instead of six: ``shift, scale, gate`` of attn, of the MLP and of attn2, in that order.
  attn2 runs on ``LayerNorm(x) * (1 + scale_msa2) + shift_msa2`` and is added, gated by ``gate_msa2``,
  after attn's residual and before the MLP.

:class:`SD35Transformer2DModel` is ``SD3Transformer2DModel`` with those two config keys and the
published weight names, so a diffusers-layout SD3.5 folder loads into it. Nobody needs to name it:
``paddle_compat`` makes ``SD3Transformer2DModel.from_pretrained`` (the trainer, the pipeline of the seed
snippet, ``scripts/infer.py``) build this class whenever ``transformer/config.json`` asks for an SD3.5
feature, via :func:`transformer_class`, which also rejects what is still unsupported with one clear error.
"""
from __future__ import annotations

import inspect
import json

import paddle_compat  # noqa: F401  (before ppdiffusers)
import paddle
import paddle.nn as nn
from ppdiffusers.configuration_utils import register_to_config
from ppdiffusers.models.attention import JointTransformerBlock
from ppdiffusers.models.attention_processor import Attention, JointAttnProcessor2_5
from ppdiffusers.models.transformer_sd3 import SD3Transformer2DModel

from frozen_ops import gated_residual, modulate, norm_modulate

QK_NORM_EPS = 1e-6
SUPPORTED_QK_NORMS = ("rms_norm",)


class RMSNorm(nn.Layer):
    """``x / sqrt(mean(x^2, last axis) + eps) * weight``, computed in fp32, returned in the input's dtype.

    (ppdiffusers 0.29's own ``RMSNorm`` returns nothing and normalises from axis 2, so it is not usable.)"""

    def __init__(self, dim: int, eps: float = QK_NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = self.create_parameter([dim], default_initializer=nn.initializer.Constant(1.0))

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        x32 = x.astype("float32")
        normed = x32 * paddle.rsqrt(x32.pow(2).mean(axis=-1, keepdim=True) + self.eps)
        return (normed * self.weight.astype("float32")).astype(x.dtype)


class SD35AdaLayerNormZeroX(nn.Layer):
    """adaLN-Zero with nine modulation chunks (MMDiT-X): the first attention's, the MLP's and attn2's."""

    def __init__(self, dim: int):
        super().__init__()
        self.silu = nn.Silu()
        self.linear = nn.Linear(dim, 9 * dim)
        self.norm = nn.LayerNorm(dim, epsilon=1e-6, weight_attr=False, bias_attr=False)

    def forward(self, x: paddle.Tensor, emb: paddle.Tensor):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2, gate_msa2 = (
            self.linear(self.silu(emb)).chunk(9, axis=1)
        )
        normed = self.norm(x)
        return (modulate(normed, scale_msa, shift_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp,
                modulate(normed, scale_msa2, shift_msa2), gate_msa2)


class SD35AttnProcessor(JointAttnProcessor2_5):
    """ppdiffusers' ``JointAttnProcessor2_5`` as ``paddle_compat`` runs it (shim 14): with the SD3.5 per-head q/k norms
    where the attention has them, and without a context stream for attn2 (``encoder_hidden_states=None``: image
    tokens only)."""


def _add_qk_norms(attn: Attention, head_dim: int, context: bool) -> None:
    attn.norm_q, attn.norm_k = RMSNorm(head_dim), RMSNorm(head_dim)
    if context:
        attn.norm_added_q, attn.norm_added_k = RMSNorm(head_dim), RMSNorm(head_dim)


class SD35JointTransformerBlock(JointTransformerBlock):
    """ppdiffusers' SD3 ``JointTransformerBlock`` plus, from the config, q/k RMSNorms and (MMDiT-X) ``attn2``.
    Its AdaLN products go through ``frozen_ops`` (only the frozen factor kept for backward, once installed)."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, context_pre_only: bool = False,
                 qk_norm: str | None = None, use_dual_attention: bool = False):
        # ppdiffusers' block takes the full width as "attention_head_dim" and divides it by the head count.
        super().__init__(dim, num_attention_heads, num_attention_heads * attention_head_dim, context_pre_only)
        processor = SD35AttnProcessor()
        self.attn.set_processor(processor)
        if qk_norm:
            _add_qk_norms(self.attn, attention_head_dim, context=True)
        self.attn2 = None
        if use_dual_attention:
            self.norm1 = SD35AdaLayerNormZeroX(dim)
            self.attn2 = Attention(query_dim=dim, dim_head=attention_head_dim, heads=num_attention_heads, out_dim=dim,
                                   bias=True, processor=processor)
            if qk_norm:
                _add_qk_norms(self.attn2, attention_head_dim, context=False)

    def forward(self, hidden_states, encoder_hidden_states, temb):
        if self.attn2 is None:
            return super().forward(hidden_states, encoder_hidden_states, temb)
        # MMDiT-X: the SD3 block's equations with attn2 between attn's residual and the MLP.
        norm_x, gate_msa, shift_mlp, scale_mlp, gate_mlp, norm_x2, gate_msa2 = self.norm1(hidden_states, emb=temb)
        if self.context_pre_only:
            norm_context = self.norm1_context(encoder_hidden_states, temb)
        else:
            norm_context, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(encoder_hidden_states, emb=temb)
        attn_output, context_attn_output = self.attn(hidden_states=norm_x, encoder_hidden_states=norm_context)
        hidden_states = gated_residual(hidden_states, gate_msa, attn_output)
        hidden_states = gated_residual(hidden_states, gate_msa2, self.attn2(hidden_states=norm_x2))
        norm_x = norm_modulate(self.norm2, hidden_states, scale_mlp, shift_mlp)
        hidden_states = gated_residual(hidden_states, gate_mlp, self.ff(norm_x))
        if self.context_pre_only:
            return None, hidden_states
        encoder_hidden_states = gated_residual(encoder_hidden_states, c_gate_msa, context_attn_output)
        norm_context = norm_modulate(self.norm2_context, encoder_hidden_states, c_scale_mlp, c_shift_mlp)
        encoder_hidden_states = gated_residual(encoder_hidden_states, c_gate_mlp, self.ff_context(norm_context))
        return encoder_hidden_states, hidden_states


class SD35Transformer2DModel(SD3Transformer2DModel):
    """``SD3Transformer2DModel`` with diffusers' SD3.5 config keys ``qk_norm`` and ``dual_attention_layers``."""

    @register_to_config
    def __init__(self, sample_size: int = 128, patch_size: int = 2, in_channels: int = 16, num_layers: int = 18,
                 attention_head_dim: int = 64, num_attention_heads: int = 18, joint_attention_dim: int = 4096,
                 caption_projection_dim: int = 1152, pooled_projection_dim: int = 2048, out_channels: int = 16,
                 pos_embed_max_size: int = 96, dual_attention_layers: tuple = (), qk_norm: str | None = None):
        check_supported({"qk_norm": qk_norm, "dual_attention_layers": dual_attention_layers})
        # The parent builds everything but the blocks (num_layers=0: no SD3 blocks built only to be
        # thrown away, which would cost a second copy of SD3.5-large); its config decorator then
        # records num_layers=0, so the real count is recorded again.
        super().__init__(sample_size, patch_size, in_channels, 0, attention_head_dim, num_attention_heads,
                         joint_attention_dim, caption_projection_dim, pooled_projection_dim, out_channels,
                         pos_embed_max_size)
        self.register_to_config(num_layers=num_layers)
        if self.inference_optimize:
            raise ValueError("INFERENCE_OPTIMIZE=True (ppdiffusers' fused SD3 blocks) does not support SD3.5 "
                             "transformers: unset INFERENCE_OPTIMIZE")
        self.transformer_blocks = nn.LayerList([
            SD35JointTransformerBlock(self.inner_dim, num_attention_heads, attention_head_dim,
                                      context_pre_only=i == num_layers - 1, qk_norm=qk_norm,
                                      use_dual_attention=i in dual_attention_layers)
            for i in range(num_layers)
        ])

    def to_json_string(self, *args, **kwargs) -> str:
        """The saved config names the published class (``SD3Transformer2DModel``), as diffusers' SD3.5 folders do."""
        config = json.loads(super().to_json_string(*args, **kwargs))
        config["_class_name"] = SD3Transformer2DModel.__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"


_SD35_KEYS = ("qk_norm", "dual_attention_layers")


def check_supported(config: dict, source: str = "transformer/config.json") -> None:
    """One clear error for an SD3-family transformer config this port cannot build yet."""
    known = set(inspect.signature(SD35Transformer2DModel.__init__).parameters) - {"self"}
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(f"{source}: {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not supported by this "
                         f"port (it builds SD3 and SD3.5 transformers: {', '.join(sorted(known))}); "
                         "use an SD3 / SD3.5 medium or large teacher")
    qk_norm = config.get("qk_norm")
    if qk_norm is not None and qk_norm not in SUPPORTED_QK_NORMS:
        raise ValueError(f"{source}: qk_norm {qk_norm!r} is not supported (supported: {', '.join(SUPPORTED_QK_NORMS)} "
                         "or none, as in SD3 / SD3.5)")


def transformer_class(config: dict, source: str = "transformer/config.json"):
    """The class that builds the transformer a ``transformer/config.json`` describes: SD3 or SD3.5."""
    check_supported(config, source)
    return SD35Transformer2DModel if any(config.get(k) for k in _SD35_KEYS) else SD3Transformer2DModel


def load_transformer(path: str, **kwargs):
    """``SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", **kwargs)``, SD3 or SD3.5 by its config."""
    return SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", **kwargs)
