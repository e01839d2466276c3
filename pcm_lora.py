"""The LoRA of PCM_SPEC §4: which modules of the SD3 transformer get adapters, and how they are saved.

The reference lists 22 target patterns. PEFT matches a pattern when a module's
name equals it or ends with ``"." + pattern``, so the three entries that start
with a dot (``.add_q_proj`` …) never match: the context q/k/v projections get
no LoRA. We keep exactly that effective set (what the published weights
contain). On SD3.5-medium's MMDiT-X blocks the suffixes ``to_q/to_k/to_v/to_out.0``
also match ``attn2`` (as under PyTorch PEFT with the same list), so its projections
are wrapped too; the SD3.5 q/k RMSNorms are not Linear and stay frozen (README
"Works with"). ``lora_alpha`` stays at PEFT's default (8), so the training-time scale
is ``8 / rank`` and a reload with ``joint_attention_kwargs={"scale": 8 / rank}``
reproduces the trained student.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager

import paddle_compat  # noqa: F401  (before ppdiffusers)
import paddle
from ppdiffusers import StableDiffusion3Pipeline
from ppdiffusers.peft import LoraConfig
from ppdiffusers.peft.utils import get_peft_model_state_dict

REFERENCE_TARGET_MODULES = [
    "to_k", "to_q", "to_v", ".add_q_proj", ".add_k_proj", ".add_v_proj", "to_add_out", "to_out.0",
    "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "norm1.linear", "norm1_context.linear", "context_embedder", "text_embedder.linear_1",
    "text_embedder.linear_2", "timestep_embedder.linear_1", "timestep_embedder.linear_2", "pos_embed.proj",
]
PEFT_DEFAULT_LORA_ALPHA = 8
LORA_WEIGHT_NAME = "paddle_lora_weights.safetensors"


def add_pcm_lora(transformer, rank: int) -> LoraConfig:
    """Wrap the reference's target modules of ``transformer`` with rank-``rank`` LoRA adapters."""
    config = LoraConfig(r=rank, target_modules=list(REFERENCE_TARGET_MODULES))
    transformer.add_adapter(config)
    return config


@contextmanager
def adapters_disabled(transformer):
    """Run ``transformer`` as its frozen base model (LoRA branches skipped) inside the block.

    Only the layers' ``disable_adapters`` switch flips; unlike ``ModelMixin.disable_adapters`` it leaves
    the LoRA parameters' ``stop_gradient`` alone, so a graph built before (the student's forward) still
    back-propagates into them."""
    from ppdiffusers.peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for _, m in transformer.named_sublayers(include_self=True) if isinstance(m, BaseTunerLayer)]
    previous = [m._disable_adapters for m in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield transformer
    finally:
        for layer, value in zip(layers, previous):
            layer._disable_adapters = value


class FrozenBaseView:
    """The student's frozen base weights seen as a separate model: the teacher and the discriminator
    backbone of ``--share_teacher_weights`` (no second copy of the transformer)."""

    def __init__(self, student):
        self.student = student
        self.config = student.config
        self.inner_dim = student.inner_dim

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.student):
            return self.student(*args, **kwargs)

    @staticmethod
    def wrap(module):
        """``module`` as a callable that runs with its adapters off."""

        def run(*args, **kwargs):
            with adapters_disabled(module):
                return module(*args, **kwargs)

        return run

    def __getattr__(self, name):  # pos_embed, transformer_blocks, ... for the discriminator's feature taps
        return getattr(self.student, name)


def lora_module_names(transformer) -> list:
    """Names of the modules that carry a LoRA adapter, sorted."""
    return sorted({name.rsplit(".lora_", 1)[0] for name, _ in transformer.named_parameters() if ".lora_" in name})


def inference_lora_scale(rank: int, lora_alpha: float = PEFT_DEFAULT_LORA_ALPHA) -> float:
    """The ``joint_attention_kwargs["scale"]`` that reproduces the trained student after ``load_lora_weights``."""
    return lora_alpha / rank


def save_lora(transformer, output_dir: str, pdparams_copy: bool = True) -> str:
    """Write the transformer's LoRA weights as ``paddle_lora_weights.safetensors`` (fp32), the file
    ``pipe.load_lora_weights`` reads, and optionally a ``.pdparams`` copy with the same keys
    (the format the seed distributes). Each file is written under a temporary name and renamed into place,
    so a kill during the write leaves the previous file or none, never a partial one. Returns the
    safetensors path."""
    state = {k: v.astype("float32") for k, v in get_peft_model_state_dict(transformer).items()}
    with tempfile.TemporaryDirectory(dir=output_dir, prefix=".writing-lora-") as tmp:
        StableDiffusion3Pipeline.save_lora_weights(tmp, transformer_lora_layers=state, weight_name=LORA_WEIGHT_NAME)
        names = [LORA_WEIGHT_NAME]
        if pdparams_copy:
            names.append(LORA_WEIGHT_NAME.replace(".safetensors", ".pdparams"))
            paddle.save({f"transformer.{k}": v for k, v in state.items()}, os.path.join(tmp, names[-1]))
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
    return os.path.join(output_dir, LORA_WEIGHT_NAME)
