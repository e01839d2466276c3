#!/usr/bin/env python
"""Measure how well a PCM LoRA turns the toy teacher into a few-step generator.

    python scripts/evaluate_pcm.py --teacher DIR/teacher [--lora FILE_OR_RUN_DIR] [--steps 1 2 4] --output GRID.png

For a fixed set of toy-world prompts and initial noises (``scripts/make_toy_teacher.py``) the reference is
the teacher's 50-step classifier-free-guided sample from the same noise (its own scheduler). Against it, for
the teacher's own n-step samples (same scheduler and guidance) and, with ``--lora``, the student's n-step
samples (``PCMFMDeterministicScheduler`` with the run's ``--num_euler_timesteps`` grid, the run's LoRA scale
alpha/rank, guidance 1: the teacher's guidance is distilled into the LoRA), it reports the latent MSE, the
pixel PSNR and the caption adherence (share of colour, shape and background read back from pixels by
``make_toy_teacher.classify``). The guidance scale of the teacher is 1 + w (the trainer's w is
``v_c + w (v_c - v_u)``), by default the middle of the run's ``[--w_min, --w_max]``.

The grid has one row per prompt (first noise): teacher 50 steps | teacher n | PCM n ... for n in
descending ``--steps`` (without ``--lora``: the teacher's columns only). The last printed line is JSON:
``{"reference_steps", "reference_adherence", "teacher": {"n": {"mse", "psnr", "adherence"}}, "student": ...}``.
With ``--lora`` it also reports two baselines sampled on the student's grid (the PCM scheduler): ``teacher_pcm_grid``
(the teacher with its guidance) and ``student_at_init`` (the teacher without guidance, i.e. the student before
training, whose LoRA adds zero), so that what the training added is visible apart from the grid.

``--per_phase`` (with ``--lora``) adds where the few-step error comes from, phase by phase on the PCM grid of
``--multiphase`` phases (the run's): from a start point at a phase's first sigma, one jump to the phase's end by
the teacher (one guided Euler step) and by the student, each against the guided ODE from that start point
(``PHASE_ODE_STEPS`` Euler steps per phase). Two kinds of start points: ``on_trajectory`` -- where the sampler
really is, the guided ODE's own path from the fixed noises (so the jumps are what a 4-step sampler does with a
perfect past); ``on_noised_data`` -- what PCM trains on, ``(1 - sigma) x0 + sigma eps`` for toy-world images x0 of
the prompts, rendered with the world options in the teacher's ``toy_teacher.json`` (the defaults without one).
Key ``per_phase``: ``{"sigmas", "on_trajectory": {"teacher_euler", "student"}, "on_noised_data": {...}}``, latent MSE per phase.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import paddle_compat  # noqa: E402,F401  (before ppdiffusers)
import numpy as np  # noqa: E402
import paddle  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from convert_lora import lora_file_scale  # noqa: E402  (the scale infer.py uses: from the weights' rank and metadata)
from make_toy_teacher import adherence, caption, read_manifest, toy_attributes  # noqa: E402
from pcm_fm_deterministic_scheduler import PCMFMDeterministicScheduler  # noqa: E402
from tracking import quiet_library_logging  # noqa: E402

REFERENCE_STEPS = 50
PHASE_ODE_STEPS = 50  # guided Euler steps per phase for the per-phase ground truth


def run_args(lora: str) -> dict:
    """The training run's training_args.json beside a LoRA file or in its folder ({} if there is none)."""
    folder = lora if os.path.isdir(lora) else os.path.dirname(os.path.abspath(lora))
    path = os.path.join(folder, "training_args.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class Sampler:
    """One SD3 pipeline on the teacher; ``sample(steps, guidance)`` -> final latents and PIL images for the fixed
    prompts and noises."""

    def __init__(self, teacher: str, prompts: list, noises: paddle.Tensor):
        from ppdiffusers import StableDiffusion3Pipeline

        self.pipe = StableDiffusion3Pipeline.from_pretrained(teacher, map_location="cpu", paddle_dtype=paddle.float32)
        self.pipe.set_progress_bar_config(disable=True)
        self.prompts, self.noises = prompts, noises
        self.height = noises.shape[2] * self.pipe.vae_scale_factor

    @paddle.no_grad()
    def sample(self, steps: int, guidance: float, **kwargs):
        latents = self.pipe(prompt=self.prompts, negative_prompt=[""] * len(self.prompts), num_inference_steps=steps,
                            guidance_scale=guidance, height=self.height, width=self.height, latents=self.noises,
                            output_type="latent", **kwargs).images
        vae = self.pipe.vae
        decoded = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
        return latents.numpy(), self.pipe.image_processor.postprocess(decoded, output_type="pil")


def metrics(latents, images, reference_latents, reference_images, attributes) -> dict:
    mse = ((latents - reference_latents) ** 2).reshape(len(latents), -1).mean(1)
    psnr = []
    for image, reference in zip(images, reference_images):
        error = ((np.asarray(image, np.float64) - np.asarray(reference, np.float64)) / 255.0) ** 2
        psnr.append(10 * np.log10(1.0 / max(error.mean(), 1e-10)))
    return {"mse": round(float(mse.mean()), 5), "psnr": round(float(np.mean(psnr)), 2),
            "adherence": round(float(np.mean([adherence(i, a) for i, a in zip(images, attributes)])), 4)}


class PhaseProbe:
    """The per-phase jumps of ``--per_phase``: start points, their guided-ODE ends and the teacher's one-step jumps
    are computed on the teacher (before the LoRA is loaded); ``student`` then measures the LoRA's jumps."""

    def __init__(self, sampler: Sampler, attributes: list, guidance: float, sigmas: np.ndarray, seed: int,
                 world: dict):
        from make_toy_teacher import POSITION_JITTER, RADIUS_RANGE, render

        pipe, self.sampler, self.sigmas = sampler.pipe, sampler, [float(x) for x in sigmas]
        self.embeds, negative, self.pooled, negative_pooled = pipe.encode_prompt(
            prompt=sampler.prompts, prompt_2=None, prompt_3=None, negative_prompt=[""] * len(sampler.prompts),
            do_classifier_free_guidance=True)
        self.cfg = (paddle.concat([negative, self.embeds]), paddle.concat([negative_pooled, self.pooled]), guidance)
        rng = np.random.default_rng(seed)
        jitter, radius = world.get("position_jitter", POSITION_JITTER), tuple(world.get("radius_range", RADIUS_RANGE))
        pixels = np.stack([np.asarray(render(*a, rng, jitter=jitter, radius=radius), np.float32)
                           for a in attributes]) / 127.5 - 1.0
        vae = pipe.vae
        x0 = vae.encode(paddle.to_tensor(pixels.transpose(0, 3, 1, 2))).latent_dist.mean
        x0 = (x0 - vae.config.shift_factor) * vae.config.scaling_factor
        eps = paddle.to_tensor(rng.standard_normal(x0.shape).astype("float32"))
        phases = range(len(self.sigmas) - 1)
        trajectory = [sampler.noises]
        for j in phases:  # the guided ODE's own path through the phase boundaries
            trajectory.append(self._ode(trajectory[-1], j))
        noised = [(1.0 - self.sigmas[j]) * x0 + self.sigmas[j] * eps for j in phases]
        self.starts = {"on_trajectory": trajectory[:-1], "on_noised_data": noised}
        self.ends = {"on_trajectory": trajectory[1:], "on_noised_data": [self._ode(x, j) for j, x in zip(phases, noised)]}
        self.teacher = {kind: self._errors(kind, self._guided) for kind in self.starts}

    def _velocity(self, x, sigma, embeds, pooled, **kwargs):
        timestep = paddle.full([embeds.shape[0]], sigma * 1000.0, dtype="float32")
        return self.sampler.pipe.transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=embeds,
                                             pooled_projections=pooled, return_dict=False, **kwargs)[0]

    def _guided(self, x, sigma):
        embeds, pooled, guidance = self.cfg
        uncond, cond = self._velocity(paddle.concat([x, x]), sigma, embeds, pooled).chunk(2)
        return uncond + guidance * (cond - uncond)

    def _ode(self, x, phase: int):
        """The guided ODE from ``x`` at the phase's first sigma to its end: PHASE_ODE_STEPS Euler steps, uniform in
        the unshifted time (the shifted sigmas' preimage) as the training grid is."""
        shift = float(self.sampler.pipe.scheduler.config.shift)
        unshift = [s / (shift - (shift - 1.0) * s) for s in self.sigmas[phase: phase + 2]]
        sigmas = [shift * u / (1.0 + (shift - 1.0) * u) for u in np.linspace(unshift[0], unshift[1], PHASE_ODE_STEPS + 1)]
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            x = x + (sigma_next - sigma) * self._guided(x, sigma)
        return x

    def _errors(self, kind: str, velocity) -> list:
        errors = []
        for j, (start, end) in enumerate(zip(self.starts[kind], self.ends[kind])):
            jump = start + (self.sigmas[j + 1] - self.sigmas[j]) * velocity(start, self.sigmas[j])
            errors.append(round(float(((jump - end) ** 2).mean()), 5))
        return errors

    def student(self, scale: float) -> dict:
        def velocity(x, sigma):
            return self._velocity(x, sigma, self.embeds, self.pooled, joint_attention_kwargs={"scale": scale})

        return {"sigmas": [round(x, 5) for x in self.sigmas],
                **{kind: {"teacher_euler": self.teacher[kind], "student": self._errors(kind, velocity)} for kind in self.starts}}


def write_grid(path: str, columns: list, captions: list, every: int, zoom: int = 4) -> None:
    """Rows: prompts (first noise of each); columns: ``(label, images)``; labels on top, captions on the left."""
    tile = columns[0][1][0].width * zoom
    label_width, header = 200, 16
    grid = Image.new("RGB", (label_width + tile * len(columns), header + tile * len(captions)), "white")
    draw = ImageDraw.Draw(grid)
    for c, (label, images) in enumerate(columns):
        draw.text((label_width + c * tile + 4, 2), label, fill="black")
        for r in range(len(captions)):
            grid.paste(images[r * every].resize((tile, tile), Image.NEAREST), (label_width + c * tile, header + r * tile))
    for r, text in enumerate(captions):
        draw.text((4, header + r * tile + tile // 2 - 6), text, fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="the toy teacher's SD3 folder (DIR/teacher)")
    p.add_argument("--lora", default=None, help="the PCM LoRA file, or the run's --output_dir (reads training_args.json)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4], help="few-step counts to measure")
    p.add_argument("--output", required=True, help="grid PNG")
    p.add_argument("--num_prompts", type=int, default=12, help="prompts spread over the 36 toy captions")
    p.add_argument("--noises_per_prompt", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234, help="seed of the initial noises")
    p.add_argument("--guidance_scale", type=float, default=None,
                   help="teacher CFG scale (1 + w); default 1 + the middle of the run's [w_min, w_max], else 4")
    p.add_argument("--pcm_timesteps", type=int, default=None, help="default: the run's --num_euler_timesteps, else 50")
    p.add_argument("--lora_scale", type=float, default=None, help="default: what scripts/infer.py uses (alpha / the weights' rank, or the scale recorded in the file)")
    p.add_argument("--multiphase", type=int, default=None, help="phases of --per_phase; default: the run's --multiphase, else 4")
    p.add_argument("--per_phase", action="store_true",
                   help="also measure each phase's one-step jump, teacher vs student, on the sampler's path and on noised data")
    args = p.parse_args(argv)
    if args.per_phase and not args.lora:
        p.error("--per_phase needs --lora")
    for name in ("teacher", "lora"):
        path = getattr(args, name)
        if path is not None and not os.path.exists(path):
            print(f"evaluate_pcm.py: error: --{name} {path} does not exist", file=sys.stderr)
            return 2
    if not os.path.isfile(os.path.join(args.teacher, "model_index.json")):
        print(f"evaluate_pcm.py: error: --teacher {args.teacher} is not an SD3 folder (no model_index.json)", file=sys.stderr)
        return 2
    quiet_library_logging()
    trained = run_args(args.lora) if args.lora else {}
    guidance = args.guidance_scale
    if guidance is None:
        guidance = 1.0 + (trained["w_min"] + trained["w_max"]) / 2 if trained else 4.0

    every = args.noises_per_prompt
    attributes = [a for a in toy_attributes()[:: max(1, len(toy_attributes()) // args.num_prompts)][: args.num_prompts]
                  for _ in range(every)]
    prompts = [caption(*a) for a in attributes]
    with open(os.path.join(args.teacher, "transformer", "config.json"), encoding="utf-8") as f:
        size = json.load(f)["sample_size"]
    noises = paddle.to_tensor(np.random.default_rng(args.seed).standard_normal((len(prompts), 16, size, size)).astype("float32"))
    sampler = Sampler(args.teacher, prompts, noises)
    reference_latents, reference_images = sampler.sample(REFERENCE_STEPS, guidance)
    result = {"reference_steps": REFERENCE_STEPS, "reference_adherence": metrics(
        reference_latents, reference_images, reference_latents, reference_images, attributes)["adherence"],
        "teacher": {}, "guidance_scale": guidance, "samples": len(prompts)}
    steps = sorted(set(args.steps), reverse=True)
    columns = [(f"teacher {REFERENCE_STEPS}", reference_images)]
    for n in steps:
        latents, images = sampler.sample(n, guidance)
        result["teacher"][str(n)] = metrics(latents, images, reference_latents, reference_images, attributes)
        if n == max(steps) or not args.lora:
            columns.append((f"teacher {n}", images))
    if args.lora:
        pcm_timesteps = args.pcm_timesteps or trained.get("num_euler_timesteps", 50)
        scale = args.lora_scale if args.lora_scale is not None else lora_file_scale(args.lora)
        shift = float(sampler.pipe.scheduler.config.shift)
        sampler.pipe.scheduler = PCMFMDeterministicScheduler(1000, shift, pcm_timesteps)
        probe = None
        if args.per_phase:
            sampler.pipe.scheduler.set_timesteps(args.multiphase or trained.get("multiphase", 4))
            with paddle.no_grad():
                manifest = read_manifest(os.path.dirname(os.path.abspath(args.teacher))) or {}  # the teacher's world
                probe = PhaseProbe(sampler, attributes, guidance, sampler.pipe.scheduler.sigmas.numpy(), args.seed + 1,
                                   manifest.get("options", {}))
        # Two baselines on the student's own grid, before the LoRA is loaded: the teacher with its guidance, and the
        # student's starting point (the teacher without guidance: a LoRA whose B is zero)
        for key, baseline_guidance in (("teacher_pcm_grid", guidance), ("student_at_init", 1.0)):
            result[key] = {str(n): metrics(*sampler.sample(n, baseline_guidance), reference_latents, reference_images,
                                           attributes) for n in steps}
        sampler.pipe.load_lora_weights(args.lora)
        result.update(student={}, lora_scale=scale, pcm_timesteps=pcm_timesteps)
        for n in steps:
            latents, images = sampler.sample(n, 1.0, joint_attention_kwargs={"scale": scale})
            result["student"][str(n)] = metrics(latents, images, reference_latents, reference_images, attributes)
            columns.append((f"PCM {n}", images))
        if probe is not None:
            with paddle.no_grad():
                result["per_phase"] = probe.student(scale)
    write_grid(args.output, columns, prompts[::every], every)
    print(f"grid: {args.output}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
