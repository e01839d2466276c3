#!/usr/bin/env python
"""Generate images with an SD3 teacher, a PCM LoRA and a PCM scheduler (the seed snippet as a CLI).

    python scripts/infer.py --pretrained_teacher_model stabilityai/stable-diffusion-3-medium-diffusers \\
        --lora outputs/run/paddle_lora_weights.safetensors --num_inference_steps 4 --output out.png

Prints one JSON line with what it wrote. fp16 on GPU, fp32 on CPU (fp16 has no CPU kernels).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import paddle_compat  # noqa: E402,F401  (before ppdiffusers)
import paddle  # noqa: E402

from pcm_fm_deterministic_scheduler import PCMFMDeterministicScheduler  # noqa: E402
from pcm_fm_stochastic_scheduler import PCMFMStochasticScheduler  # noqa: E402
from safe_pdparams import UnsafeFileError, is_safetensors, load_pdparams  # noqa: E402
from tracking import quiet_library_logging  # noqa: E402
from validation import SEED_PROMPT  # noqa: E402
from hub_teacher import HubTeacherUnavailable, check_hub_teacher  # noqa: E402
from convert_lora import lora_file_scale  # noqa: E402  (scripts/ is this script's own folder)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrained_teacher_model", required=True, help="SD3 folder or hub id")
    p.add_argument("--lora", default=None, help="Paddle-format LoRA .safetensors file or a folder with one (none: the "
                   "teacher); diffusers files: convert with scripts/convert_lora.py --to paddle first")
    p.add_argument("--prompt", action="append", default=None, help="repeatable; default: the seed's portrait prompt")
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--num_inference_steps", type=int, default=4)
    p.add_argument("--shift", type=float, default=None, help="default: the teacher scheduler's shift")
    p.add_argument("--pcm_timesteps", type=int, default=50, help="PCM grid size the LoRA was trained with (--num_euler_timesteps)")
    p.add_argument("--scheduler", choices=["deterministic", "stochastic"], default="deterministic")
    p.add_argument("--lora_scale", type=float, default=None,
                   help="default: the scale recorded in the file by convert_lora.py, else 8 / the weights' rank "
                        "(the trainer's alpha/rank: 0.25 for rank 32)")
    p.add_argument("--guidance_scale", type=float, default=1.2)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--dtype", choices=["float16", "float32"], default=None, help="default: float16 on GPU, float32 on CPU")
    p.add_argument("--output", default="pcm.png", help="PNG path; with several prompts, -0, -1 ... are appended")
    args = p.parse_args(argv)
    if args.lora and os.path.isfile(args.lora) and not is_safetensors(args.lora):
        load_pdparams(args.lora)  # a crafted pickle is refused before the pipeline loads (load_lora_weights reads it so too)

    try:
        check_hub_teacher(args.pretrained_teacher_model)
    except HubTeacherUnavailable as error:
        raise SystemExit(f"error: {error}") from None
    lora_scale = None
    if args.lora:
        lora_scale = args.lora_scale if args.lora_scale is not None else lora_file_scale(args.lora)
    from ppdiffusers import StableDiffusion3Pipeline

    quiet_library_logging()
    dtype = args.dtype or ("float16" if paddle.get_device().startswith("gpu") else "float32")
    shift = args.shift
    if shift is None:
        config_file = os.path.join(args.pretrained_teacher_model, "scheduler", "scheduler_config.json")
        shift = json.load(open(config_file))["shift"] if os.path.isfile(config_file) else 3.0
    scheduler_cls = PCMFMDeterministicScheduler if args.scheduler == "deterministic" else PCMFMStochasticScheduler
    pipe = StableDiffusion3Pipeline.from_pretrained(
        args.pretrained_teacher_model, scheduler=scheduler_cls(1000, shift, args.pcm_timesteps),
        map_location="cpu", paddle_dtype=getattr(paddle, dtype))
    kwargs = {}
    if args.lora:
        pipe.load_lora_weights(args.lora)
        kwargs["joint_attention_kwargs"] = {"scale": lora_scale}
    prompts = args.prompt or [SEED_PROMPT]
    written = []
    for i, prompt in enumerate(prompts):
        with paddle.no_grad():
            image = pipe(prompt=prompt, negative_prompt=args.negative_prompt, num_inference_steps=args.num_inference_steps,
                         guidance_scale=args.guidance_scale, height=args.height, width=args.width,
                         generator=paddle.Generator().manual_seed(args.seed), **kwargs).images[0]
        stem, ext = os.path.splitext(args.output)
        path = args.output if len(prompts) == 1 else f"{stem}-{i}{ext or '.png'}"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        image.save(path)
        written.append(path)
    print(json.dumps({"images": written, "steps": args.num_inference_steps, "shift": shift,
                      "lora": args.lora, "lora_scale": lora_scale}))


if __name__ == "__main__":
    try:
        main()
    except UnsafeFileError as error:
        sys.exit(f"error: {error}")
