#!/usr/bin/env python
"""Each CPU fast path switched on and off in one process, on the trainer's workloads: time and result difference.

    python scripts/benchmark_cpu_paths.py                            # a tiny teacher built on the fly, 128 px
    python scripts/benchmark_cpu_paths.py --teacher /tmp/med-sd3 --resolution 256 --reps 7

The fast paths (all on in every entry point; each is switched off alone, the others staying on):

- ``cpu_kernels``: every compiled kernel (``cpu_kernels``: attention, softmax, the blocks' LayerNorms and GELU, the
  frozen linear layers' in-place bias, the VAE's convolutions, GroupNorms and SiLUs) instead of Paddle's ops;
- ``fused_attention``: ``cpu_kernels``' fused attention alone (the transformer's and, through ``paddle_compat``'s
  shim 11, the VAE's) instead of ``paddle_compat.math_attention`` (two matmuls around the compiled softmax) and
  ppdiffusers' ``AttnProcessor``;
- ``direct_conv``: ``cpu_kernels``' direct convolution alone (no-grad, at most 128 input channels x 3 x 3) instead
  of Paddle's;
- ``conv_bias_and_pad``: ``paddle_compat``'s ``Conv2D`` (bias added expanded) and ``Downsample2D`` (padding inside
  the convolution) instead of upstream's forwards;
- ``linear_bias``: ``frozen_ops.linear`` (a frozen bias added in place, or expanded where a graph records the
  product) instead of ``F.linear``;
- ``trainable_factor``: the student's AdaLN products on the expanded factor (``frozen_ops.FactorMultiply``)
  instead of Paddle's broadcast multiply and add;
- ``factor_kernel``: ``cpu_kernels.factor_multiply`` for the blocks' ``[B, 1, D]`` AdaLN factors (trainable,
  frozen and no-grad) instead of expanding them first;
- ``gated_residual``: ``cpu_kernels.gated_residual`` (the blocks' ``x + gate * y`` as one op, without gradients)
  instead of the multiply and the add;
- ``no_grad_linear``: ``cpu_kernels.linear`` (a no-grad Linear or LoRA Linear as one op) instead of its ops;
- ``norm_modulate``: ``cpu_kernels.layer_norm_modulate`` (the blocks' LayerNorm and adaLN modulation as one op,
  without gradients) instead of the LayerNorm kernel and three ops;
- ``fused_lora_with_grad``: ``frozen_linear.LoraLinear`` (a LoRA Linear with gradients as one graph node) instead
  of the layers' own ops;
- ``plain_heads``: the discriminator heads without recomputation in backward (the CPU default) instead of
  ``discriminator.RecomputedHead``;
- ``text_attention``: the text encoders' attention through ``cpu_kernels.attention_with_bias`` instead of
  ppdiffusers' CLIP and T5 attention;
- ``joint_attention``: the SD3 blocks' image and context q, k, v through ``cpu_kernels.joint_attention`` as separate
  parts instead of concatenated before the fused attention and its output split after;
- ``head_norm``: the discriminator heads' conv bias, GroupNorm and LeakyReLU as ``cpu_kernels.head_norm`` (one op
  each way) instead of the three ops;
- ``compiled_linear``: frozen Linear layers and LoRA layers with gradients as ``cpu_kernels.frozen_linear`` and
  ``cpu_kernels.lora_linear`` (one compiled op each way) instead of ``frozen_linear``'s Python nodes.

Workloads (fp32, no autocast): ``text_encode`` (the three text encoders on two captions), ``vae_encode`` (the VAE
encoder, batch 2), ``teacher_cfg`` (the transformer forward without gradients, batch 4: the teacher's cond +
uncond pass) and ``g_step`` (a rank-4 LoRA student's forward, the discriminator's ``g_loss`` through the frozen
teacher and backward: the G step's graph). Each pair
alternates on/off ``--reps`` times (2 calls each, after one untimed call); medians. ``equal`` says whether the
outputs (and, for ``g_step``, the loss and LoRA gradients) are the same bits; otherwise the largest difference.
A path that a workload does not touch shows about 1.0x. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "scripts"))

import paddle_compat  # noqa: E402  (before ppdiffusers)
import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.nn.functional as F  # noqa: E402

import cpu_kernels  # noqa: E402
import frozen_linear  # noqa: E402
import frozen_ops  # noqa: E402
import pcm_lora  # noqa: E402
from discriminator import Discriminator  # noqa: E402
from sd35_transformer import load_transformer  # noqa: E402


@contextlib.contextmanager
def switched_off(path: str):
    """The fast path ``path`` replaced by what runs without it, for the duration of the block."""
    from ppdiffusers.models.resnet import Downsample2D

    saved = []

    def set_attr(owner, name, value):
        saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    if path == "cpu_kernels":
        set_attr(cpu_kernels, "kernels", lambda: None)
    elif path == "fused_attention":
        set_attr(cpu_kernels, "has_fused_attention", lambda: False)
    elif path == "direct_conv":
        set_attr(cpu_kernels, "conv2d_runs", lambda x, weight, bias: False)
    elif path == "conv_bias_and_pad":
        set_attr(paddle.nn.Conv2D, "forward", paddle_compat._UPSTREAM_CONV2D_FORWARD)
        set_attr(Downsample2D, "forward", paddle_compat._UPSTREAM_DOWNSAMPLE2D_FORWARD)
    elif path == "linear_bias":
        set_attr(frozen_ops, "linear", lambda x, weight, bias=None: F.linear(x, weight, bias))
    elif path == "trainable_factor":
        set_attr(frozen_ops, "_trainable_factor", lambda small, big: False)
        set_attr(frozen_ops, "_over_one_axis", lambda small, big: False)
    elif path == "factor_kernel":
        set_attr(cpu_kernels, "factor_multiply_runs", lambda x, factor: False)
    elif path == "norm_modulate":
        set_attr(cpu_kernels, "layer_norm_modulate_runs", lambda x, scale, shift: False)
    elif path == "gated_residual":
        set_attr(cpu_kernels, "gated_residual_runs", lambda x, gate, y: False)
    elif path == "no_grad_linear":
        set_attr(cpu_kernels, "linear_runs", lambda x, weight, *others: False)
    elif path == "fused_lora_with_grad":
        set_attr(frozen_linear, "FUSE_LORA_WITH_GRAD", False)
    elif path == "plain_heads":
        set_attr(Discriminator, "recompute_heads", True)
    elif path == "text_attention":
        set_attr(paddle_compat, "_fused_text_attention", lambda *args: None)
    elif path == "joint_attention":
        set_attr(cpu_kernels, "joint_attention_runs", lambda *parts: False)
    elif path == "head_norm":
        set_attr(cpu_kernels, "head_norm_runs", lambda *args: False)
    elif path == "compiled_linear":
        set_attr(cpu_kernels, "frozen_linear_runs", lambda *args: False)
    else:
        raise ValueError(f"unknown fast path {path!r}")
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


PATHS = ["cpu_kernels", "fused_attention", "direct_conv", "conv_bias_and_pad", "linear_bias", "trainable_factor",
         "factor_kernel", "norm_modulate", "gated_residual", "no_grad_linear", "fused_lora_with_grad", "plain_heads",
         "text_attention", "joint_attention", "head_norm", "compiled_linear"]


def frozen_transformer(path):
    """The SD3 or SD3.5 transformer at ``path`` as the trainer prepares a teacher: every parameter frozen, eval."""
    transformer = load_transformer(path)
    for param in transformer.parameters():
        param.stop_gradient = True
    transformer.eval()
    return transformer


def workloads(teacher_dir: str, resolution: int) -> dict:
    """name -> a function running it once and returning the arrays to compare."""
    from ppdiffusers import AutoencoderKL

    from sd3_text_encoding import SD3PromptEncoder, load_tokenizers_and_text_encoders

    tokenizers, text_encoders = load_tokenizers_and_text_encoders(teacher_dir)
    for encoder in text_encoders:
        encoder.eval()
        for param in encoder.parameters():
            param.stop_gradient = True
    prompt_encoder = SD3PromptEncoder(tokenizers, text_encoders)
    vae = AutoencoderKL.from_pretrained(teacher_dir, subfolder="vae")
    vae.eval()
    teacher, student = frozen_transformer(teacher_dir), frozen_transformer(teacher_dir)
    pcm_lora.add_pcm_lora(student, rank=4)
    paddle.seed(0)
    for name, param in student.named_parameters():
        if "lora_B" in name:  # non-zero, as after some training (PEFT starts it at zero)
            param.set_value(paddle.randn(param.shape) * 0.05)
    discriminator = Discriminator(teacher)
    lora = [p for p in student.parameters() if not p.stop_gradient]
    config, factor = teacher.config, 2 ** (len(vae.config.block_out_channels) - 1)
    latent = resolution // factor
    pixels = paddle.rand([2, 3, resolution, resolution]) * 2 - 1
    sample = paddle.randn([4, config.in_channels, latent, latent])
    t = paddle.full([4], 500.0)
    embeds = paddle.randn([4, 154, config.joint_attention_dim])
    pooled = paddle.randn([4, config.pooled_projection_dim])

    def text_encode():
        return [t.numpy() for t in prompt_encoder.encode(["a red cube on a wooden table", "two dogs in the snow"])]

    def vae_encode():
        with paddle.no_grad():
            return [vae.encode(pixels).latent_dist.mean.numpy()]

    def teacher_cfg():
        with paddle.no_grad():
            return [teacher(hidden_states=sample, timestep=t, encoder_hidden_states=embeds,
                            pooled_projections=pooled).sample.numpy()]

    def g_step():
        student.clear_gradients()
        fake = student(hidden_states=sample[:2], timestep=t[:2], encoder_hidden_states=embeds[:2],
                       pooled_projections=pooled[:2]).sample
        loss = discriminator("g_loss", fake, t[:2], embeds[:2], pooled[:2]) + (fake * fake).mean()
        loss.backward()
        return [loss.numpy()] + [p.grad.numpy() for p in lora]

    return {"text_encode": text_encode, "vae_encode": vae_encode, "teacher_cfg": teacher_cfg, "g_step": g_step}


def compare(run, path: str, reps: int) -> dict:
    times = {True: [], False: []}
    outputs = {}
    for _ in range(reps):
        for on in (True, False):
            with contextlib.nullcontext() if on else switched_off(path):
                outputs[on] = run()
                start = time.perf_counter()
                run()
                run()
                times[on].append((time.perf_counter() - start) / 2 * 1000)
    difference = max(float(np.abs(a.astype("float64") - b.astype("float64")).max())
                     for a, b in zip(outputs[True], outputs[False]))
    on_ms, off_ms = (float(np.median(times[key])) for key in (True, False))
    return {"on_ms": on_ms, "off_ms": off_ms, "speedup": off_ms / on_ms, "max_difference": difference,
            "equal": all(np.array_equal(a, b) for a, b in zip(outputs[True], outputs[False]))}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=None, help="SD3 folder (default: a tiny one built by make_tiny_sd3)")
    p.add_argument("--resolution", type=int, default=128, help="image size (a multiple of 16)")
    p.add_argument("--reps", type=int, default=5, help="on/off alternations per path and workload")
    p.add_argument("--paths", nargs="+", default=PATHS, choices=PATHS, help="fast paths to switch")
    args = p.parse_args(argv)

    frozen_linear.install()  # as the trainer runs: frozen linears, the blocks' AdaLN forwards
    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir = args.teacher
        if teacher_dir is None:
            from make_tiny_sd3 import make_tiny_sd3

            teacher_dir = make_tiny_sd3(os.path.join(tmp, "tiny-sd3"))
        runs = workloads(teacher_dir, args.resolution)
        results = {}
        print(f"{'fast path':20s} {'workload':12s} {'on ms':>9s} {'off ms':>9s} {'off/on':>7s}  results")
        for path in args.paths:
            for name, run in runs.items():
                r = results.setdefault(path, {})[name] = compare(run, path, args.reps)
                same = "same bits" if r["equal"] else f"max difference {r['max_difference']:.2e}"
                print(f"{path:20s} {name:12s} {r['on_ms']:9.1f} {r['off_ms']:9.1f} {r['speedup']:7.2f}  {same}",
                      flush=True)
    summary = {"teacher": args.teacher or "tiny", "resolution": args.resolution, "reps": args.reps,
               "threads": os.environ.get("OMP_NUM_THREADS"), "results": results}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
