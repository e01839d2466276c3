"""Validation images during training: the in-training student with the PCM scheduler.

The pipeline shares the trainer's modules (no transformer reload, nothing copied): the student as
transformer, with the LoRA at its training scale, the frozen VAE and text encoders, and a
``PCMFMDeterministicScheduler`` with the teacher's shift and ``--num_euler_timesteps`` PCM timesteps.
Images go to ``output_dir/validation/step-N.png`` (rows: prompts, columns: images) and to the trackers.
"""
from __future__ import annotations

import gc
import os
from contextlib import nullcontext

import paddle
from PIL import Image

from pcm_fm_deterministic_scheduler import PCMFMDeterministicScheduler

# The seed's portrait prompt: the default validation and inference prompt (and words of the tiny tokenizers).
SEED_PROMPT = (
    "portrait photo of a girl, photograph, highly detailed face, depth of field, moody light, golden hour, "
    "style by Dan Winters, Russell James, Steve McCurry, centered, extremely detailed, Nikon D850, "
    "award winning photography"
)


def image_grid(rows: list) -> Image.Image:
    """Paste a list of rows of equally sized PIL images into one image."""
    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * max(len(r) for r in rows), height * len(rows)))
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image, (x * width, y * height))
    return grid


def generate_validation_images(args, step: int, student, vae, text_encoders, tokenizers, shift: float,
                               weight_dtype: str, trackers=None) -> str:
    """Generate ``--num_validation_images`` per ``--validation_prompt`` and save the grid; returns its path."""
    from ppdiffusers import StableDiffusion3Pipeline

    scheduler = PCMFMDeterministicScheduler(1000, shift, args.validation_pcm_timesteps or args.num_euler_timesteps)
    pipe = StableDiffusion3Pipeline(
        transformer=student, scheduler=scheduler, vae=vae,
        text_encoder=text_encoders[0], tokenizer=tokenizers[0], text_encoder_2=text_encoders[1],
        tokenizer_2=tokenizers[1], text_encoder_3=text_encoders[2], tokenizer_3=tokenizers[2],
    )
    pipe.set_progress_bar_config(disable=True)
    was_training = student.training
    student.eval()  # no recomputation bookkeeping under no_grad
    amp = paddle.amp.auto_cast(enable=True, dtype=weight_dtype, level="O1") if weight_dtype != "float32" else nullcontext()
    rows, flat, captions = [], [], []
    try:
        with paddle.no_grad(), amp:
            for prompt in args.validation_prompt:
                generator = paddle.Generator().manual_seed(args.seed if args.seed is not None else 0)
                row = [
                    pipe(prompt=prompt, num_inference_steps=args.num_inference_steps, guidance_scale=1.0,
                         height=args.resolution, width=args.resolution, generator=generator).images[0]
                    for _ in range(args.num_validation_images)
                ]
                rows.append(row)
                flat += row
                captions += [f"{i}: {prompt}" for i in range(len(row))]
    finally:
        student.train(was_training)
        del pipe
        gc.collect()
        if paddle.device.is_compiled_with_cuda() and paddle.get_device().startswith("gpu"):
            paddle.device.cuda.empty_cache()
    folder = os.path.join(args.output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step-{step}.png")
    image_grid(rows).save(path)
    if trackers is not None:
        trackers.log_images("validation", flat, captions, step)
    return path
