#!/usr/bin/env python
"""Whole-trainer CPU speed, side by side: this port's trainer and the PyTorch reference trainer
(``code/text_to_image_sd3/train_pcm_lora_sd3_adv.py`` of G-U-N/Phased-Consistency-Model) on the same weights,
the same images and the seed command's flags, in interleaved process pairs; median of the pairs' ratios.

    python scripts/compare_reference_trainer.py --config tiny --lora_rank 4 --reference_dir /work/pcm_reference
    python scripts/compare_reference_trainer.py --config small --lora_rank 4 --reference_dir /work/pcm_reference

``--reference_dir`` is a checkout of the reference repository (or its ``code/text_to_image_sd3`` folder). Steps:

1. The teacher: ``scripts/make_tiny_sd3.py`` (``tiny``: its defaults, 128 px; ``small``: 6 blocks, 8 heads x 32,
   256 px), converted in the torch venv to the diffusers/transformers layout the reference loads with
   ``from_pretrained`` (transformer, VAE, CLIP-L/G with projection, T5, the three tokenizers, scheduler: Linear
   weights transposed, Paddle's zero AdaLayerNormContinuous biases dropped, the T5 tokenizer as transformers' fast
   one built from the same sentencepiece model); both cached under ``--work_dir``. Checked every run on fixed
   inputs: prompt embeddings (the reference's own ``encode_prompt`` against this port's encoder, on the dataset's
   captions and the empty one), VAE latent means and the transformer output must agree within ``--tolerance``.
2. The data: ``scripts/make_tiny_cc3m.py`` writes the same square images (one seed) twice, as a folder of
   ``.jpg`` + ``.txt`` (what the reference's ``CustomImageDataset`` reads) and as webdataset shards (this port).
3. The reference's three files are copied to a temporary folder and changed there only where they cannot run
   here; the diff is printed: the hard-coded dataset path; ``check_min_version("0.30.0.dev0")`` (a development
   build of diffusers; the venv has the release 0.29.2, which has everything the files use); the heads' Adam
   ``betas=(0, 0.999)`` written ``(0.0, 0.999)`` (current torch rejects an int beta beside a float); the
   discriminator's SD3-medium wiring (24 heads of width 1536 on a 64x64 token grid, i.e. 1024 px) set to the
   teacher's blocks, width and token grid. Nothing is changed for the CPU: ``torch.autocast("cuda")`` only warns
   and is off.
4. ``--pairs`` pairs of processes, order alternating. The reference runs as a script (``runpy``) under a runner
   that wraps tqdm's ``update`` (the reference calls ``progress_bar.update(1)`` once per step) to record
   ``time.perf_counter()``, and library methods (text encoders, VAE encode, transformer forward, discriminator,
   ``accelerator.backward``, optimizer step, DataLoader) to split the time by phase; it ends the process after
   the last timed step (after its loop the reference saves the LoRA, loads the pipeline twice and then stops
   with an AttributeError: it reads ``args.validation_prompt``, which its parser does not define). This port
   runs ``scripts/benchmark.py`` (its trainer in process, timed per step, with its phase split). Both:
   ``--warmup_steps`` untimed steps (even, so D and G steps alternate alike; torch needs a few steps to reach
   its steady speed on CPU), then ``--steps`` timed; s/step = their mean. OMP_NUM_THREADS, MKL_NUM_THREADS and
   torch's threads = ``--threads``.

Measure on an idle machine: each pair prints the 1-minute load. When other jobs take a core, torch's OpenMP
threads lose far more than Paddle's (seen here with 2 threads: the reference up to 30x slower, Paddle 2-3x), and
the ratio then says more about the contention than about the two trainers.

Flags on both sides: the seed command's (README "Training on GPUs"): huber loss, lr 5e-6, weight decay 1e-3,
w 4-5, batch 2, seed 453645634, 100 Euler steps, 4 phases, adversarial weight 0.1 and lr 1e-5, no-op xformers
flag, resume "latest" (fresh folders), with ``--mixed_precision no`` (fp32), ``--dataloader_num_workers 0`` (2
cores), no validation or checkpoint inside the timed run, and without ``--use_8bit_adam`` (bitsandbytes needs CUDA;
this port ignores the flag) and wandb (the reference logs to tensorboard, which the venv lacks, so accelerate drops
the tracker; this port writes its metrics.jsonl).

The torch venv is not part of requirements.txt (the reference's stack; torch's CPU build)::

    python3.11 -m venv /work/torchvenv
    /work/torchvenv/bin/pip install torch==2.13.0 diffusers==0.29.2 transformers==4.44.2 peft==0.12.0 \\
        accelerate==0.33.0 torchvision==0.28.0 huggingface_hub==0.25.2 numpy==1.26.4 safetensors sentencepiece protobuf

(PyPI's torchvision is built for CUDA torch; ``compare_reference_speed.allow_torchvision_without_ops`` lets it
import with the CPU torch.) Prints a per-pair table, the phase split and, as its last line, one JSON object.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")
sys.path.insert(0, SCRIPTS)

from compare_reference_speed import _inputs, allow_torchvision_without_ops, convert_to_torch  # noqa: E402

CONFIGS = {  # make_tiny_sd3.py flags, training resolution
    "tiny": ([], 128),
    "small": (["--num_layers", "6", "--num_attention_heads", "8", "--attention_head_dim", "32"], 256),
}
SEED_FLAGS = ["--learning_rate", "5e-6", "--loss_type", "huber", "--adam_weight_decay", "1e-3", "--w_min", "4",
              "--w_max", "5", "--train_batch_size", "2", "--gradient_accumulation_steps", "1", "--seed", "453645634",
              "--num_euler_timesteps", "100", "--multiphase", "4", "--adv_weight", "0.1", "--adv_lr", "1e-5",
              "--enable_xformers_memory_efficient_attention", "--resume_from_checkpoint", "latest",
              "--mixed_precision", "no", "--dataloader_num_workers", "0"]
REFERENCE_FILES = ("train_pcm_lora_sd3_adv.py", "discriminator_sd3.py", "pcm_fm_deterministic_scheduler.py")
PHASES = ["data", "text_encoding", "vae", "student_forward", "teacher_forward", "target_forward", "discriminator",
          "backward", "optimizer"]
PADDLE_ONLY_CONFIG_KEYS = ("paddlenlp_version", "tensor_parallel_output")
TRANSFORMER_INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
NEVER = "1000000"  # --validation_steps / --checkpointing_steps beyond the run


# ----------------------------------------------------------------------------------------------
# Preparation (this venv; models and data are built in subprocesses, so that this process never imports Paddle
# and the torch processes inherit no Paddle settings)
# ----------------------------------------------------------------------------------------------
def run(command: list, env=None) -> str:
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(command)}\n{proc.stderr[-4000:]}")
    return proc.stdout


def build_once(target: str, command: list) -> str:
    """Run ``command`` + ``--output_dir TARGET.partial`` unless ``target`` exists; rename when done."""
    if not os.path.isdir(target):
        partial = target + ".partial"
        shutil.rmtree(partial, ignore_errors=True)
        run([*command, "--output_dir", partial])
        os.replace(partial, target)
    return target


def reference_changes(train: str, discriminator: str, images: str, teacher_config: dict, resolution: int) -> list:
    """``(file, old, new)`` replacements in the reference copy (see the module docstring for why)."""
    width = teacher_config["num_attention_heads"] * teacher_config["attention_head_dim"]
    grid = resolution // 8 // teacher_config["patch_size"]
    return [
        (train, '"/mnt/wangfuyun/cc3m"', repr(images)),
        (train, 'check_min_version("0.30.0.dev0")', 'pass  # check_min_version("0.30.0.dev0")'),
        (train, "betas=(0, 0.999)", "betas=(0.0, 0.999)"),
        (discriminator, "adapter_channel_dims=[1536] * 24", f"adapter_channel_dims=[{width}] * {teacher_config['num_layers']}"),
        (discriminator, "x.view(b, c, 64, 64)", f"x.view(b, c, {grid}, {grid})"),
    ]


def copy_reference(reference_dir: str, target: str, images: str, teacher_config: dict, resolution: int) -> str:
    """The reference's files in ``target`` with :func:`reference_changes` applied; returns the unified diff."""
    source = os.path.join(reference_dir, "code", "text_to_image_sd3")
    source = source if os.path.isdir(source) else reference_dir
    for name in REFERENCE_FILES:
        shutil.copy(os.path.join(source, name), os.path.join(target, name))
    train, disc = (os.path.join(target, name) for name in REFERENCE_FILES[:2])
    before = {path: open(path, encoding="utf-8").read() for path in (train, disc)}
    after = dict(before)
    for path, old, new in reference_changes(train, disc, images, teacher_config, resolution):
        if after[path].count(old) != 1:
            raise SystemExit(f"{os.path.basename(path)}: expected exactly one {old!r} (another reference version?)")
        after[path] = after[path].replace(old, new)
    diff = []
    for path in (train, disc):
        with open(path, "w", encoding="utf-8") as f:
            f.write(after[path])
        name = os.path.basename(path)
        diff += difflib.unified_diff(before[path].splitlines(), after[path].splitlines(), f"reference/{name}",
                                     f"run copy/{name}", n=0, lineterm="")
    return "\n".join(diff)


# ----------------------------------------------------------------------------------------------
# Torch side (run with --torch_python)
# ----------------------------------------------------------------------------------------------
def convert_teacher(source: str, target: str) -> None:
    """A make_tiny_sd3.py folder (ppdiffusers + its transformers port, safetensors) -> diffusers/transformers."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from safetensors.numpy import load_file
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel
    from transformers import T5TokenizerFast

    def config(sub):
        with open(os.path.join(source, sub, "config.json"), encoding="utf-8") as f:
            return {k: v for k, v in json.load(f).items() if k not in PADDLE_ONLY_CONFIG_KEYS}

    def with_weights(model, sub):
        (name,) = [f for f in os.listdir(os.path.join(source, sub)) if f.endswith(".safetensors")]
        missing, _ = model.load_state_dict(convert_to_torch(load_file(os.path.join(source, sub, name)), model), strict=False)
        if missing:
            raise SystemExit(f"{sub}: no Paddle weight for {missing}")
        return model

    def clip_tokenizer(sub):
        folder = os.path.join(source, sub)
        return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                             pad_token="<|endoftext|>", model_max_length=77)

    with open(os.path.join(source, "scheduler", "scheduler_config.json"), encoding="utf-8") as f:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(json.load(f))
    pipe = StableDiffusion3Pipeline(
        transformer=with_weights(SD3Transformer2DModel.from_config(config("transformer")), "transformer"),
        vae=with_weights(AutoencoderKL.from_config(config("vae")), "vae"),
        text_encoder=with_weights(CLIPTextModelWithProjection(CLIPTextConfig(**config("text_encoder"))), "text_encoder"),
        text_encoder_2=with_weights(CLIPTextModelWithProjection(CLIPTextConfig(**config("text_encoder_2"))), "text_encoder_2"),
        text_encoder_3=with_weights(T5EncoderModel(T5Config(**config("text_encoder_3"))), "text_encoder_3"),
        tokenizer=clip_tokenizer("tokenizer"), tokenizer_2=clip_tokenizer("tokenizer_2"),
        tokenizer_3=T5TokenizerFast(vocab_file=os.path.join(source, "tokenizer_3", "spiece.model"), extra_ids=0,
                                    model_max_length=77),
        scheduler=scheduler)
    partial = target + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    pipe.save_pretrained(partial)
    os.replace(partial, target)


def worker_convert(spec: dict) -> None:
    """Convert (once), then the reference stack's outputs on the check inputs, loaded as the reference loads them."""
    import numpy as np
    import torch

    torch.set_num_threads(spec["threads"])
    allow_torchvision_without_ops()
    if not os.path.isdir(spec["converted"]):
        convert_teacher(spec["teacher"], spec["converted"])
    sys.path.insert(0, spec["reference_copy"])
    import train_pcm_lora_sd3_adv as reference  # the copy: its encode_prompt
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    path = spec["converted"]
    tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
                  CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"),
                  T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_3")]
    encoders = [CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder"),
                CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"),
                T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3")]
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer")
    inputs = dict(np.load(spec["inputs"]))
    with torch.no_grad():
        embeds, pooled = reference.encode_prompt(encoders, tokenizers, [str(c) for c in inputs["captions"]])
        latents = vae.encode(torch.from_numpy(inputs["images"])).latent_dist.mean
        sample = transformer(**{k: torch.from_numpy(inputs[k]) for k in TRANSFORMER_INPUTS}).sample
    np.savez(spec["outputs"], prompt_embeds=embeds.numpy(), pooled=pooled.numpy(), latents=latents.numpy(),
             transformer=sample.numpy())


class StepClock:
    """Ticked at the end of every step: resets the phase totals after the warm-up and, after the last timed step,
    prints the result as one JSON line and ends the process (the reference's post-loop code is not timed)."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps, self.ticks = warmup, steps, []
        self.phases = dict.fromkeys(PHASES, 0.0)

    def tick(self) -> None:
        self.ticks.append(time.perf_counter())
        if len(self.ticks) == self.warmup:
            self.phases = dict.fromkeys(PHASES, 0.0)
        elif len(self.ticks) == self.warmup + self.steps:
            step_time = (self.ticks[-1] - self.ticks[self.warmup - 1]) / self.steps
            print(json.dumps({"step_time_s": step_time, "phases_s": {k: v / self.steps for k, v in self.phases.items()}}))
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    def wrap(self, owner, name: str, phase_of) -> None:
        """Add the time of ``owner.name`` calls to the phase ``phase_of(self_of_the_call)``."""
        original = getattr(owner, name)
        phases = self

        def timed(obj, *args, **kwargs):
            start = time.perf_counter()
            try:
                return original(obj, *args, **kwargs)
            finally:
                phase = phase_of(obj)
                phases.phases[phase] += time.perf_counter() - start

        setattr(owner, name, timed)


def worker_reference(spec: dict) -> None:
    """Run the reference copy as ``python train_pcm_lora_sd3_adv.py ARGS``, timed by a :class:`StepClock`."""
    import runpy

    import torch

    torch.set_num_threads(spec["threads"])
    allow_torchvision_without_ops()
    sys.path.insert(0, spec["reference_copy"])
    import accelerate.optimizer
    import discriminator_sd3
    import torch.utils.data.dataloader as dataloader
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from tqdm.auto import tqdm
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    clock = StepClock(spec["warmup_steps"], spec["steps"])
    update = tqdm.update

    def counted_update(bar, n=1):
        result = update(bar, n)
        if bar.desc == "Steps":  # the training progress bar (not a loading bar)
            clock.tick()
        return result

    tqdm.update = counted_update

    def transformer_phase(model):  # the student carries the LoRA adapter; its target pass runs without gradients
        if not getattr(model, "_hf_peft_config_loaded", False):
            return "teacher_forward"
        return "student_forward" if torch.is_grad_enabled() else "target_forward"

    clock.wrap(dataloader._BaseDataLoaderIter, "__next__", lambda _: "data")
    for encoder in (CLIPTextModelWithProjection, T5EncoderModel):
        clock.wrap(encoder, "forward", lambda _: "text_encoding")
    clock.wrap(AutoencoderKL, "encode", lambda _: "vae")
    clock.wrap(SD3Transformer2DModel, "forward", transformer_phase)
    clock.wrap(discriminator_sd3.Discriminator, "forward", lambda _: "discriminator")
    clock.wrap(Accelerator, "backward", lambda _: "backward")
    clock.wrap(accelerate.optimizer.AcceleratedOptimizer, "step", lambda _: "optimizer")

    script = os.path.join(spec["reference_copy"], REFERENCE_FILES[0])
    sys.argv = [script, *spec["argv"]]
    runpy.run_path(script, run_name="__main__")
    raise SystemExit(f"the reference ended after {len(clock.ticks)} steps, before the last timed one")


# ----------------------------------------------------------------------------------------------
# Paddle side of the check (this venv)
# ----------------------------------------------------------------------------------------------
def worker_paddle_check(spec: dict) -> None:
    sys.path.insert(0, REPO)
    import paddle_compat  # noqa: F401  (before ppdiffusers)
    import numpy as np
    import paddle
    from ppdiffusers import AutoencoderKL

    from sd35_transformer import load_transformer
    from sd3_text_encoding import SD3PromptEncoder, load_tokenizers_and_text_encoders

    path = spec["teacher"]
    encode = SD3PromptEncoder(*load_tokenizers_and_text_encoders(path))
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    transformer = load_transformer(path)
    inputs = dict(np.load(spec["inputs"]))
    with paddle.no_grad():
        embeds, pooled = encode.encode([str(c) for c in inputs["captions"]])
        latents = vae.encode(paddle.to_tensor(inputs["images"])).latent_dist.mean
        sample = transformer(**{k: paddle.to_tensor(inputs[k]) for k in TRANSFORMER_INPUTS}).sample
    np.savez(spec["outputs"], prompt_embeds=embeds.numpy(), pooled=pooled.numpy(), latents=latents.numpy(),
             transformer=sample.numpy())


WORKERS = {"convert": worker_convert, "reference": worker_reference, "paddle_check": worker_paddle_check}


# ----------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------
def check_inputs(images: str, teacher_config: dict, resolution: int, path: str) -> None:
    """Two of the dataset's images and captions (and the empty caption), and random transformer inputs."""
    import numpy as np
    from PIL import Image

    names = sorted(f for f in os.listdir(images) if f.endswith(".jpg"))[:2]
    pixels = [np.asarray(Image.open(os.path.join(images, n)).convert("RGB"), dtype="float32") / 127.5 - 1 for n in names]
    captions = [open(os.path.join(images, n[:-4] + ".txt"), encoding="utf-8").read().strip() for n in names] + [""]
    np.savez(path, images=np.stack(pixels).transpose(0, 3, 1, 2).copy(), captions=np.array(captions),
             **_inputs(teacher_config, resolution, 2))


def check_conversion(paddle_out: str, torch_out: str, tolerance: float) -> dict:
    import numpy as np

    ours, theirs = np.load(paddle_out), np.load(torch_out)
    differences = {}
    for key in ("prompt_embeds", "pooled", "latents", "transformer"):
        differences[key] = float(np.abs(ours[key] - theirs[key]).max())
        print(f"  {key:<14} max |port - reference| {differences[key]:.2e}  (max |value| {np.abs(ours[key]).max():.2f})")
    if max(differences.values()) > tolerance:
        raise SystemExit(f"the converted teacher does not reproduce ours within {tolerance} (see above)")
    return differences


def worker_command(python: str, name: str, spec: dict, folder: str) -> list:
    path = os.path.join(folder, f"{name}-spec.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    return [python, os.path.abspath(__file__), "--worker", name, "--spec", path]


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)"
        return action.help if action.default is None else super()._get_help_string(action)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpWithDefaults)
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny", help="teacher size (module docstring)")
    p.add_argument("--resolution", type=int, default=None, help="training resolution (default: tiny 128, small 256)")
    p.add_argument("--lora_rank", type=int, default=4, help="LoRA rank on both sides")
    p.add_argument("--reference_dir", help="checkout of G-U-N/Phased-Consistency-Model (or its code/text_to_image_sd3)")
    p.add_argument("--torch_python", default="/work/torchvenv/bin/python", help="python of the torch venv")
    p.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "compare_reference_trainer"),
                   help="cache of teachers (both layouts) and data")
    p.add_argument("--pairs", type=int, default=5, help="interleaved port/reference process pairs")
    p.add_argument("--warmup_steps", type=int, default=6, help="untimed steps first (even: D and G alternate)")
    p.add_argument("--steps", type=int, default=6, help="timed steps (even: as many D as G steps)")
    p.add_argument("--threads", type=int, default=2, help="OMP/MKL/torch threads on both sides")
    p.add_argument("--samples", type=int, default=32, help="images in the dataset")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted output difference of the check")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        with open(args.spec, encoding="utf-8") as f:
            WORKERS[args.worker](json.load(f))
        return {}
    if not args.reference_dir:
        p.error("--reference_dir is required")
    if args.warmup_steps < 2 or args.warmup_steps % 2 or args.steps < 2 or args.steps % 2:
        p.error("--warmup_steps and --steps must be even and >= 2")

    teacher_flags, default_resolution = CONFIGS[args.config]
    resolution = args.resolution or default_resolution
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    python = sys.executable
    teacher = build_once(os.path.join(args.work_dir, args.config, "paddle"),
                         [python, os.path.join(SCRIPTS, "make_tiny_sd3.py"), *teacher_flags])
    with open(os.path.join(teacher, "transformer", "config.json"), encoding="utf-8") as f:
        teacher_config = json.load(f)
    data = os.path.join(args.work_dir, f"data-{resolution}px-{args.samples}")
    cc3m = [python, os.path.join(SCRIPTS, "make_tiny_cc3m.py"), "--image_size", str(resolution),
            "--num_shards", "2", "--samples_per_shard", str(args.samples // 2)]
    images = build_once(os.path.join(data, "images"), [*cc3m, "--format", "folder"])
    shards = build_once(os.path.join(data, "shards"), [*cc3m, "--format", "wds"])

    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "reference")
        os.makedirs(copy)
        print(f"changes to the reference (in {copy} only):")
        print(copy_reference(args.reference_dir, copy, images, teacher_config, resolution))

        converted = os.path.join(args.work_dir, args.config, "diffusers")
        inputs = os.path.join(tmp, "check-inputs.npz")
        check_inputs(images, teacher_config, resolution, inputs)
        common = {"teacher": teacher, "converted": converted, "reference_copy": copy, "inputs": inputs,
                  "threads": args.threads}
        run(worker_command(args.torch_python, "convert", {**common, "outputs": os.path.join(tmp, "torch.npz")}, tmp), env)
        run(worker_command(python, "paddle_check", {**common, "outputs": os.path.join(tmp, "paddle.npz")}, tmp), env)
        print(f"same weights ({teacher} -> {converted}), same inputs:")
        differences = check_conversion(os.path.join(tmp, "paddle.npz"), os.path.join(tmp, "torch.npz"), args.tolerance)

        total = str(args.warmup_steps + args.steps)
        reference_argv = ["--pretrained_teacher_model", converted, "--resolution", str(resolution), "--lora_rank",
                          str(args.lora_rank), "--max_train_steps", total, "--validation_steps", NEVER,
                          "--checkpointing_steps", NEVER, "--report_to", "tensorboard", *SEED_FLAGS]
        port_command = [python, os.path.join(SCRIPTS, "benchmark.py"), "--pretrained_teacher_model", teacher,
                        "--data_path", shards, "--resolution", str(resolution), "--lora_rank", str(args.lora_rank),
                        "--warmup_steps", str(args.warmup_steps), "--steps", str(args.steps),
                        "--validation_steps", NEVER, *SEED_FLAGS]
        runs = {"port": [], "reference": []}
        loads = []
        for pair in range(args.pairs):
            order = ("port", "reference") if pair % 2 == 0 else ("reference", "port")
            for side in order:
                if side == "port":
                    command = port_command
                else:
                    spec = {"reference_copy": copy, "threads": args.threads, "warmup_steps": args.warmup_steps,
                            "steps": args.steps, "argv": [*reference_argv, "--output_dir", os.path.join(tmp, f"out-{pair}")]}
                    command = worker_command(args.torch_python, "reference", spec, tmp)
                loads.append(os.getloadavg()[0])
                runs[side].append(last_json(run(command, env)))
            port, ref = runs["port"][-1]["step_time_s"], runs["reference"][-1]["step_time_s"]
            print(f"pair {pair + 1} ({order[0]} first): port {port:.3f} s/step, reference {ref:.3f} s/step, "
                  f"ratio {port / ref:.2f}, 1-min load {loads[-2]:.2f} / {loads[-1]:.2f}", flush=True)
    loads.append(os.getloadavg()[0])
    return report(args, resolution, runs, differences, loads)


def report(args, resolution: int, runs: dict, differences: dict, loads: list) -> dict:
    port = [r["step_time_s"] for r in runs["port"]]
    reference = [r["step_time_s"] for r in runs["reference"]]
    ratios = [a / b for a, b in zip(port, reference)]
    phases = {side: {ph: statistics.median(r["phases_s"].get(ph, 0.0) for r in runs[side]) for ph in PHASES}
              for side in runs}
    print(f"\n{args.config} teacher, {resolution} px, LoRA rank {args.lora_rank}: {args.pairs} pairs of "
          f"{args.warmup_steps} warm-up + {args.steps} timed steps, {args.threads} threads")
    print(f"{'':<22}{'port s/step':>14}{'reference s/step':>18}{'ratio':>8}")
    for i, (a, b, r) in enumerate(zip(port, reference, ratios)):
        print(f"{f'pair {i + 1}':<22}{a:>14.3f}{b:>18.3f}{r:>8.2f}")
    print(f"{'median':<22}{statistics.median(port):>14.3f}{statistics.median(reference):>18.3f}"
          f"{statistics.median(ratios):>8.2f}  (range {min(ratios):.2f}-{max(ratios):.2f})")
    print(f"\nphase split, median over pairs (s/step){'port':>10}{'reference':>12}")
    for phase in PHASES:
        print(f"  {phase:<38}{phases['port'][phase]:>10.4f}{phases['reference'][phase]:>12.4f}")
    others = {side: statistics.median(r["step_time_s"] - sum(r["phases_s"].get(ph, 0.0) for ph in PHASES)
                                      for r in runs[side]) for side in runs}
    print(f"  {'other':<38}{others['port']:>10.4f}{others['reference']:>12.4f}")
    summary = {
        "config": args.config, "resolution": resolution, "lora_rank": args.lora_rank, "pairs": args.pairs,
        "warmup_steps": args.warmup_steps, "steps": args.steps, "threads": args.threads,
        "port_s_per_step": port, "reference_s_per_step": reference,
        "ratio_median": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
        "port_phases_s": phases["port"], "reference_phases_s": phases["reference"],
        "check_max_abs_difference": differences, "load_average_1min": loads,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
