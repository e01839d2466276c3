#!/usr/bin/env python
"""Phased Consistency Model (PCM) LoRA distillation of Stable Diffusion 3, with an adversarial loss.

One command, single process or under ``python -m paddle.distributed.launch``:

    python -u -m paddle.distributed.launch --gpus "0,1,2,3,4,5,6,7" train_pcm_lora_sd3_adv.py \\
        --data_path ./cc3m --pretrained_teacher_model stabilityai/stable-diffusion-3-medium-diffusers \\
        --mixed_precision fp16 --resolution 1024 --lora_rank 32 ...

The algorithm, its defaults and the reference's defects we avoid are in PCM_SPEC.md; every
deviation from the reference is listed in the README. Sections: arguments, checks made before
any model is loaded, model set-up, the training step, the loop.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from contextlib import nullcontext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import paddle_compat  # noqa: E402,F401  (before ppdiffusers)
import numpy as np  # noqa: E402
import paddle  # noqa: E402
import paddle.distributed as dist  # noqa: E402

import checkpointing  # noqa: E402
from data import DEFAULT_MAX_MEMBER_BYTES  # noqa: E402
import frozen_linear  # noqa: E402
from hub_teacher import HUB_ID, HubTeacherUnavailable, check_hub_teacher  # noqa: E402
import pcm_lora  # noqa: E402
import run_control  # noqa: E402
from tracking import Trackers, quiet_library_logging, recordable_args, resolve_trackers  # noqa: E402
from validation import SEED_PROMPT, generate_validation_images  # noqa: E402
from pcm_solver import EulerSolver, cfg_velocity, consistency_loss  # noqa: E402
from sd35_transformer import check_supported, load_transformer  # noqa: E402

LR_SCHEDULERS = ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"]
# Reference flags that have no meaning in this Paddle port: accepted, warned about, ignored.
IGNORED_REFERENCE_FLAGS = {
    "use_8bit_adam": "bitsandbytes 8-bit Adam has no Paddle equivalent; using AdamW",
    "allow_tf32": "Paddle decides TF32 use itself (FLAGS_cudnn/cublas settings)",
    "push_to_hub": "pushing to a model hub is not supported; the LoRA is written to --output_dir",
    "hub_token": "pushing to a model hub is not supported",
    "hub_model_id": "pushing to a model hub is not supported",
    "scale_lr": "the reference does not use it either in effect; set --learning_rate directly",
    "prior_generation_precision": "not used by PCM distillation",
    "text_encoder_lr": "text encoders are frozen in PCM distillation",
    "weighting_scheme": "the reference's PCM loss uses weighting 1.0",
}
MAX_CONSECUTIVE_NONFINITE = 20


class ArgumentError(ValueError):
    """A bad flag value, reported as one line before any model is loaded."""


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------
class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each flag's default, unless it is unset (None/False) or the help text already says it."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="PCM LoRA distillation of SD3 with an adversarial loss (PaddlePaddle).",
                                formatter_class=HelpWithDefaults)
    add = p.add_argument
    # Model and data
    add("--pretrained_teacher_model", required=True, help="SD3 diffusers-layout folder or hub id (e.g. stabilityai/stable-diffusion-3-medium-diffusers)")
    add("--revision", default=None, help="model revision (hub ids only)")
    add("--variant", default=None, help="weight variant, e.g. fp16")
    add("--data_path", required=True, help="folder of .tar shards, a brace pattern (cc3m-train-{0000..0575}.tar), one .tar, or a folder of images with .txt captions")
    add("--resolution", type=int, default=1024, help="training resolution (square); must be divisible by VAE factor x patch size")
    add("--center_crop", action="store_true", help="center crop after resizing (default: random crop)")
    add("--random_flip", action="store_true", help="random horizontal flip")
    add("--min_image_size", type=int, default=0, help="skip images whose shorter side is below this (0: keep all)")
    add("--max_member_bytes", type=int, default=DEFAULT_MAX_MEMBER_BYTES,
        help="skip samples with a tar member or file larger than this, without reading it (default 64 MiB)")
    add("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes per rank")
    add("--dataloader_timeout", type=float, default=600,
        help="seconds to wait for one batch before stopping with an error (exit code 4): a stuck or "
             "starved DataLoader worker becomes an error instead of a hang (0: wait forever)")
    add("--output_dir", default="sd3-dreambooth", help="where the LoRA, checkpoints and logs go")
    add("--seed", type=int, default=None, help="base seed; rank r uses seed + r")
    # PCM
    add("--num_euler_timesteps", type=int, default=50, help="N: Euler solver points on the teacher schedule")
    add("--multiphase", type=int, default=8, help="P: number of phases")
    add("--w_min", type=float, default=3.0, help="guidance scale w ~ U[w_min, w_max] per sample (reference: fixed 3)")
    add("--w_max", type=float, default=3.0, help="see --w_min")
    add("--not_apply_cfg_solver", action="store_true", help="teacher without classifier-free guidance")
    add("--loss_type", default="l2", choices=["l2", "huber"], help="consistency loss")
    add("--huber_c", type=float, default=0.001, help="Huber constant c")
    add("--adv_weight", type=float, default=0.1, help="weight of the generator's adversarial loss")
    add("--adv_lr", type=float, default=1e-5, help="discriminator heads' learning rate")
    add("--lora_rank", type=int, default=4, help="LoRA rank; lora_alpha stays 8 (PEFT's), so inference uses scale 8/rank")
    # Optimisation
    add("--train_batch_size", type=int, default=4, help="batch size per device")
    add("--num_train_epochs", type=int, default=1, help="passes over the data (when --max_train_steps is not set)")
    add("--max_train_steps", type=int, default=None, help="total optimizer steps (D and G steps alternate); overrides epochs")
    add("--gradient_accumulation_steps", type=int, default=1, help="micro-batches per optimizer step")
    add("--gradient_checkpointing", action="store_true", help="recompute transformer activations in backward")
    add("--text_embedding_cache_size", type=int, default=0,
        help="keep the prompt embeddings of the N most recent captions in host memory (0: off); pays off when "
             "captions repeat, e.g. small datasets over many epochs (about 1.3 MB per caption for SD3-medium in fp16)")
    add("--offload_text_encoders", action="store_true",
        help="keep the text encoders in host memory, on the accelerator only while encoding (saves ~10 GiB on "
             "SD3-medium; costs copies per step unless --text_embedding_cache_size serves the captions)")
    add("--share_teacher_weights", action="store_true",
        help="use the student's frozen base (LoRA off) as teacher and discriminator backbone instead of a second, "
             "fp32 copy of the transformer: saves that copy's memory; with fp16/bf16 the teacher then runs on "
             "low-precision weights (see README)")
    add("--learning_rate", type=float, default=1e-4, help="LoRA learning rate")
    add("--lr_scheduler", default="constant", choices=LR_SCHEDULERS, help="LoRA LR schedule, stepped on G steps")
    add("--lr_warmup_steps", type=int, default=500, help="warm-up length in G steps")
    add("--lr_num_cycles", type=int, default=1, help="cycles of cosine_with_restarts")
    add("--lr_power", type=float, default=1.0, help="power of the polynomial schedule")
    add("--optimizer", default="AdamW", help="AdamW (prodigy is not available in Paddle: warned, AdamW used)")
    add("--adam_beta1", type=float, default=0.9, help="LoRA AdamW beta1 (the heads use 0)")
    add("--adam_beta2", type=float, default=0.999, help="LoRA AdamW beta2")
    add("--adam_weight_decay", type=float, default=1e-4, help="AdamW weight decay (LoRA and heads)")
    add("--adam_epsilon", type=float, default=1e-8, help="LoRA AdamW epsilon")
    add("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm (LoRA and heads)")
    add("--mixed_precision", default=None, choices=["no", "fp16", "bf16"], help="fp16/bf16 need a GPU; default no")
    add("--enable_xformers_memory_efficient_attention", action="store_true",
        help="use Paddle's fused memory-efficient attention where the device has it (GPU, fp16/bf16)")
    # Checkpoints, validation, logging
    add("--checkpointing_steps", type=int, default=500, help="save a checkpoint every N global steps and at the end")
    add("--checkpoints_total_limit", type=int, default=None, help="keep at most N checkpoints (default: all)")
    add("--resume_from_checkpoint", default=None, help="a checkpoint-N folder or 'latest'")
    add("--validation_prompt", action="append", default=None, help="repeatable; default: the seed's portrait prompt")
    add("--num_validation_images", type=int, default=4, help="images per validation prompt (0: no validation)")
    add("--validation_steps", type=int, default=50, help="validate every N global steps and at the end")
    add("--num_inference_steps", type=int, default=4, help="PCM sampling steps of the validation images")
    add("--validation_shift", type=float, default=None, help="validation scheduler shift (default: the teacher's)")
    add("--validation_pcm_timesteps", type=int, default=None, help="validation PCM grid (default: --num_euler_timesteps)")
    add("--report_to", default="tensorboard",
        help="wandb, visualdl, tensorboard (= VisualDL, Paddle's equivalent), all or none; metrics.jsonl is always written")
    add("--tracker_project_name", default="text2image-fine-tune", help="wandb project name")
    add("--logging_dir", default="logs", help="log folder inside --output_dir")
    add("--local_rank", type=int, default=-1, help="set by launchers; ignored (Paddle reads its environment)")
    ignored = p.add_argument_group("accepted for compatibility with the reference, ignored",
                                   "setting one of the first nine prints a one-line warning; the rest are options of "
                                   "features PCM does not use (SD3 loss weighting, prodigy, DreamBooth)")
    for name, flag_type in [("use_8bit_adam", bool), ("allow_tf32", bool), ("push_to_hub", bool), ("hub_token", str),
                            ("hub_model_id", str), ("scale_lr", bool), ("prior_generation_precision", str),
                            ("text_encoder_lr", float), ("weighting_scheme", str)]:
        kind = {"action": "store_true"} if flag_type is bool else {"type": flag_type, "default": None}
        ignored.add_argument(f"--{name}", help=IGNORED_REFERENCE_FLAGS[name], **kind)
    for name in ("logit_mean", "logit_std", "mode_scale", "prodigy_beta3", "adam_weight_decay_text_encoder"):
        ignored.add_argument(f"--{name}", type=float, default=None)
    for name in ("prodigy_decouple", "prodigy_use_bias_correction", "prodigy_safeguard_warmup"):
        ignored.add_argument(f"--{name}", default=None)
    ignored.add_argument("--sample_batch_size", type=int, default=None)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.validation_prompt is None:
        args.validation_prompt = [SEED_PROMPT]
    return args


def warn_ignored_flags(args, log) -> None:
    for name, why in IGNORED_REFERENCE_FLAGS.items():
        if getattr(args, name) not in (None, False):
            log(f"warning: --{name} is ignored: {why}")
    if args.optimizer.lower() != "adamw":
        log(f"warning: --optimizer {args.optimizer} is not available in Paddle; using AdamW")


# ----------------------------------------------------------------------------------------------
# Checks made before any model is loaded
# ----------------------------------------------------------------------------------------------
def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def teacher_geometry(path: str) -> dict:
    """Numbers the checks need from a local teacher folder (defaults of SD3-medium for a hub id)."""
    if not os.path.exists(path):
        if HUB_ID.match(path):
            try:
                check_hub_teacher(path)
            except HubTeacherUnavailable as error:
                raise ArgumentError(str(error)) from None
            return {"vae_factor": 8, "patch_size": 2, "num_train_timesteps": 1000}
        raise ArgumentError(f"--pretrained_teacher_model: {path} does not exist (give an SD3 folder in diffusers layout or a hub id)")
    needed = ["model_index.json", "transformer/config.json", "vae/config.json", "scheduler/scheduler_config.json"]
    missing = [f for f in needed if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise ArgumentError(f"--pretrained_teacher_model: {path} is not an SD3 diffusers folder (missing {', '.join(missing)})")
    try:
        vae = _read_json(os.path.join(path, "vae/config.json"))
        transformer = _read_json(os.path.join(path, "transformer/config.json"))
        scheduler = _read_json(os.path.join(path, "scheduler/scheduler_config.json"))
    except ValueError as error:
        raise ArgumentError(f"--pretrained_teacher_model: unreadable config in {path} ({error})") from None
    try:
        check_supported(transformer, os.path.join(path, "transformer", "config.json"))  # SD3 / SD3.5 features
    except ValueError as error:
        raise ArgumentError(f"--pretrained_teacher_model: {error}") from None
    return {
        "vae_factor": 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1),
        "patch_size": int(transformer.get("patch_size", 2)),
        "num_train_timesteps": int(scheduler.get("num_train_timesteps", 1000)),
        "transformer_layers": int(transformer.get("num_layers", 0)),
        "transformer_width": int(transformer.get("num_attention_heads", 0)) * int(transformer.get("attention_head_dim", 0)),
    }


def wandb_ready() -> bool:
    """wandb can log without prompting: offline/disabled mode, or credentials present (never read out)."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    try:
        return netrc.netrc().authenticators(os.environ.get("WANDB_BASE_URL", "api.wandb.ai").split("//")[-1]) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def check_precision(mixed_precision: str) -> None:
    """fp16/bf16 need matmul and conv kernels in that dtype on this device."""
    if mixed_precision in (None, "no"):
        return
    dtype = {"fp16": "float16", "bf16": "bfloat16"}[mixed_precision]
    device = paddle.get_device()
    try:
        x = paddle.ones([2, 8, 4, 4], dtype=dtype)
        paddle.nn.functional.conv2d(x, paddle.ones([8, 8, 1, 1], dtype=dtype))
        paddle.matmul(x, x, transpose_y=True)
    except Exception:
        raise ArgumentError(
            f"--mixed_precision {mixed_precision}: this device ({device}) has no {dtype} kernels; "
            f"use --mixed_precision no{'' if device.startswith('gpu') else ' (fp16/bf16 training needs a GPU)'}"
        ) from None


def validate_args(args) -> dict:
    """Every check that needs no model. Raises ArgumentError (one line naming the flag)."""
    from data import DataPathError, validate_data_path

    positive = ["learning_rate", "adv_lr", "train_batch_size", "gradient_accumulation_steps", "num_euler_timesteps",
                "checkpointing_steps", "validation_steps", "lora_rank", "resolution", "num_train_epochs"]
    positive += ["num_inference_steps", "max_member_bytes"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise ArgumentError(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.max_train_steps is not None and args.max_train_steps <= 0:
        raise ArgumentError(f"--max_train_steps must be > 0, got {args.max_train_steps}")
    if args.text_embedding_cache_size < 0:
        raise ArgumentError(f"--text_embedding_cache_size must be >= 0, got {args.text_embedding_cache_size}")
    if args.dataloader_num_workers < 0:
        raise ArgumentError(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}")
    if args.dataloader_timeout < 0:
        raise ArgumentError(f"--dataloader_timeout must be >= 0 (0: wait forever), got {args.dataloader_timeout}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise ArgumentError(f"--checkpoints_total_limit must be >= 1, got {args.checkpoints_total_limit}")
    if args.w_min > args.w_max:
        raise ArgumentError(f"--w_min ({args.w_min}) must not exceed --w_max ({args.w_max})")
    if args.loss_type == "huber" and args.huber_c <= 0:
        raise ArgumentError(f"--huber_c must be > 0 for --loss_type huber, got {args.huber_c}")
    try:
        trackers = resolve_trackers(args.report_to)
    except ValueError as error:
        raise ArgumentError(str(error)) from None
    if args.num_validation_images < 0:
        raise ArgumentError(f"--num_validation_images must be >= 0, got {args.num_validation_images}")
    if "wandb" in trackers and not wandb_ready():
        raise ArgumentError("--report_to wandb: no wandb credentials; run `wandb login`, set WANDB_API_KEY, "
                            "or set WANDB_MODE=offline to log locally")
    if args.hub_token is not None and "wandb" in trackers:
        raise ArgumentError("--hub_token cannot be used with --report_to wandb (it could expose your token); log in with the hub's CLI instead")
    if not 1 <= args.multiphase <= args.num_euler_timesteps:
        raise ArgumentError(f"--multiphase must be between 1 and --num_euler_timesteps ({args.num_euler_timesteps}), got {args.multiphase}")
    geometry = teacher_geometry(args.pretrained_teacher_model)
    if geometry["num_train_timesteps"] % args.num_euler_timesteps:
        raise ArgumentError(f"--num_euler_timesteps ({args.num_euler_timesteps}) must divide the teacher's "
                            f"{geometry['num_train_timesteps']} training timesteps")
    factor = geometry["vae_factor"] * geometry["patch_size"]
    if args.resolution % factor:
        raise ArgumentError(f"--resolution ({args.resolution}) must be divisible by {factor} (VAE factor {geometry['vae_factor']} x patch size {geometry['patch_size']})")
    try:
        geometry["data"] = validate_data_path(args.data_path)
    except DataPathError as error:
        raise ArgumentError(str(error)) from None
    check_precision(args.mixed_precision)
    geometry["resume"] = find_resume(args, run_layout(args, dist.get_world_size(), geometry))
    return geometry


def run_layout(args, world_size: int, model) -> dict:
    """What a checkpoint must share with the run that resumes from it (``model``: the teacher's geometry
    before loading, its config after; a hub id's layout is known only after loading)."""
    layout = {"world_size": world_size, "train_batch_size": args.train_batch_size,
              "gradient_accumulation_steps": args.gradient_accumulation_steps, "lora_rank": args.lora_rank,
              "resolution": args.resolution}
    layout.update({k: model[k] for k in ("transformer_layers", "transformer_width") if model.get(k)})
    return layout


def find_resume(args, layout: dict):
    """``(path, state)`` of the intact checkpoint to resume from, or None; CheckpointError (before any model is
    loaded) if the named one does not exist or is corrupt, or if it was saved with another layout."""
    if not args.resume_from_checkpoint:
        return None
    found = checkpointing.find_resume_checkpoint(args.output_dir, args.resume_from_checkpoint,
                                                 warn=print if dist.get_rank() == 0 else lambda *a: None)
    if found is not None:
        checkpointing.check_compatible(found[1], layout, found[0])
    return found


# ----------------------------------------------------------------------------------------------
# Distributed helpers
# ----------------------------------------------------------------------------------------------
def world() -> tuple:
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    if dist.get_world_size() > 1:
        dist.barrier()


def any_rank(*flags: bool):
    """For each flag: True on every rank if it is true on any rank (one collective for all of them).
    Returns a bool for one flag, a tuple for several."""
    if dist.get_world_size() > 1:
        value = paddle.to_tensor([1.0 if flag else 0.0 for flag in flags])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        flags = tuple(bool(v > 0) for v in value.numpy())
    return flags[0] if len(flags) == 1 else tuple(flags)


def check_ranks_in_sync(params, what: str) -> None:
    """Data parallel ranks must hold identical trainable weights; compare a fingerprint of them."""
    if dist.get_world_size() == 1:
        return
    flat = paddle.concat([p.astype("float64").flatten() for p in params])
    weights = paddle.arange(flat.shape[0], dtype="float64") % 1013 + 1
    fingerprint = paddle.stack([flat.sum(), flat.abs().sum(), (flat * weights).sum()])
    gathered = []
    dist.all_gather(gathered, fingerprint)
    if any(not bool(paddle.equal_all(g, gathered[0]).item()) for g in gathered):
        raise RuntimeError(f"{what} differ between ranks: {[g.numpy().tolist() for g in gathered]}")


def check_shared_output_dir(output_dir: str) -> None:
    """Checkpoints need one ``--output_dir`` that every rank sees (rank 0 writes the shared state, each rank
    its own part). Rank 0 writes a fresh token; a rank that cannot read it back is on another file system."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if world_size == 1:
        return
    token = paddle.to_tensor([random.SystemRandom().randrange(1, 2**31) if rank == 0 else 0], dtype="int64")
    dist.broadcast(token, src=0)
    marker = os.path.join(output_dir, ".shared-output-dir-check")
    if rank == 0:
        with open(marker, "w", encoding="utf-8") as f:
            f.write(str(int(token.item())))
    barrier()
    try:
        with open(marker, encoding="utf-8") as f:
            seen = f.read().strip() == str(int(token.item()))
    except OSError:
        seen = False
    if any_rank(not seen):
        raise checkpointing.CheckpointError(
            f"--output_dir {output_dir} is not shared by all ranks (some cannot see rank 0's files); "
            "put it on a file system every node mounts (NFS, Lustre, ...)")
    barrier()
    if rank == 0:
        os.remove(marker)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    paddle.seed(seed)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
def load_models(args, weight_dtype: str, log):
    """Tokenizers, text encoders, VAE, teacher (fp32, or a view of the student's base with
    --share_teacher_weights) and student (weight dtype + fp32 LoRA)."""
    from ppdiffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from sd3_text_encoding import load_tokenizers_and_text_encoders

    path = args.pretrained_teacher_model
    common = {"revision": args.revision} if args.revision else {}
    tokenizers, text_encoders = load_tokenizers_and_text_encoders(path)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=args.variant, **common)
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
    student = load_transformer(path, variant=args.variant, **common)  # SD3 or SD3.5, by transformer/config.json
    teacher = None
    if not args.share_teacher_weights:
        teacher = load_transformer(path, variant=args.variant, **common)

    for model in filter(None, (*text_encoders, vae, teacher, student)):
        for param in model.parameters():
            param.stop_gradient = True
        model.eval()
    frozen_linear.install()  # frozen Linear layers keep only their weight for backward (same results, less memory)
    for encoder in text_encoders:
        encoder.to(dtype=weight_dtype)
    vae.to(dtype="float32")
    student.to(dtype=weight_dtype)
    set_seed(args.seed if args.seed is not None else 0)  # LoRA (then heads) initialised alike on every rank and setup
    pcm_lora.add_pcm_lora(student, args.lora_rank)
    for name, layer in student.named_sublayers():
        if name.endswith(("lora_A", "lora_B")):
            layer.to(dtype="float32")  # fp32 master weights for the trainable LoRA
    if teacher is None:
        teacher = pcm_lora.FrozenBaseView(student)
    else:
        teacher.to(dtype="float32")
    if args.gradient_checkpointing:
        for model in {id(student): student, id(teacher): getattr(teacher, "student", teacher)}.values():
            model.enable_gradient_checkpointing()
            model.train()  # checkpointing is active in train mode (SD3 has no dropout)
    trainable = [p for p in student.parameters() if not p.stop_gradient]
    log(f"student LoRA: rank {args.lora_rank}, {len(pcm_lora.lora_module_names(student))} modules, "
        f"{sum(int(np.prod(p.shape)) for p in trainable):,} trainable parameters")
    return tokenizers, text_encoders, vae, noise_scheduler, teacher, student


# ----------------------------------------------------------------------------------------------
# The training step
# ----------------------------------------------------------------------------------------------
class PCMStep:
    """Steps 1-7 of PCM_SPEC §3 for one micro-batch, and the D or G loss of step 8."""

    def __init__(self, args, solver, encode, uncond, vae, teacher, student, discriminator, weight_dtype, amp,
                 timer=None):
        self.timer = timer or (lambda phase: nullcontext())  # benchmark hook: timer(phase) -> context manager
        self.args, self.solver, self.encode = args, solver, encode
        self.uncond_embeds, self.uncond_pooled = uncond
        self.vae, self.teacher, self.student, self.discriminator = vae, teacher, student, discriminator
        self.weight_dtype, self.amp = weight_dtype, amp
        self.num_train_timesteps = 1000

    def autocast(self):
        if not self.amp:
            return nullcontext()
        return paddle.amp.auto_cast(enable=True, dtype=self.weight_dtype, level="O1")

    def __call__(self, batch, is_d_step: bool) -> dict:
        args, solver = self.args, self.solver
        T = self.num_train_timesteps
        pixel_values = batch["pixel_values"].astype("float32")
        with self.timer("text_encoding"):
            prompt_embeds, pooled = self.encode(list(batch["captions"]))
        bsz = pixel_values.shape[0]

        # 2. latents, with the VAE's shift and scale (the reference omits the shift)
        with self.timer("vae"), paddle.no_grad():
            latents = self.vae.encode(pixel_values).latent_dist.sample()
            latents = (latents - (self.vae.config.shift_factor or 0.0)) * self.vae.config.scaling_factor
            latents = latents.astype(self.weight_dtype)

        # 3. solver index, noise, noisy input
        noise = paddle.randn(latents.shape, dtype=latents.dtype)
        index = paddle.randint(0, args.num_euler_timesteps, shape=[bsz], dtype="int64")
        sigma = paddle.gather(solver.sigmas, index).reshape([bsz, 1, 1, 1]).astype(latents.dtype)
        sigma_prev = paddle.gather(solver.sigmas_prev, index)
        timesteps = paddle.gather(solver.sigmas, index) * T
        timesteps_prev = sigma_prev * T
        noisy = sigma * noise + (1.0 - sigma) * latents

        # 4. student prediction (no gradient needed on D steps: the D loss sees it detached)
        with self.timer("student_forward"), self.autocast(), (nullcontext() if not is_d_step else paddle.no_grad()):
            velocity = self.student(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=prompt_embeds,
                                    pooled_projections=pooled).sample
        prediction, end = solver.multiphase_jump(noisy, velocity.astype(noisy.dtype), index)

        # 5. teacher with classifier-free guidance, cond and uncond in one batched pass; one Euler step
        with self.timer("teacher_forward"), paddle.no_grad():
            guidance = args.w_min + (args.w_max - args.w_min) * paddle.rand([bsz])
            with self.autocast():
                if args.not_apply_cfg_solver:
                    cond = self.teacher(hidden_states=noisy.astype("float32"), timestep=timesteps,
                                        encoder_hidden_states=prompt_embeds.astype("float32"),
                                        pooled_projections=pooled.astype("float32")).sample
                    uncond = cond
                else:
                    both = self.teacher(
                        hidden_states=paddle.concat([noisy, noisy]).astype("float32"),
                        timestep=paddle.concat([timesteps, timesteps]),
                        encoder_hidden_states=paddle.concat([prompt_embeds, self.uncond_embeds.expand(prompt_embeds.shape)]).astype("float32"),
                        pooled_projections=paddle.concat([pooled, self.uncond_pooled.expand(pooled.shape)]).astype("float32"),
                    ).sample
                    cond, uncond = both[:bsz], both[bsz:]
            teacher_velocity = cfg_velocity(cond.astype("float32"), uncond.astype("float32"), guidance)
            x_prev = solver.euler_step(noisy.astype("float32"), teacher_velocity, index)

        # 6. target: the same student, one solver step lower, jumped to the same phase start
        with self.timer("target_forward"), paddle.no_grad():
            with self.autocast():
                target_velocity = self.student(hidden_states=x_prev.astype(self.weight_dtype), timestep=timesteps_prev,
                                               encoder_hidden_states=prompt_embeds, pooled_projections=pooled).sample
            target, _ = solver.multiphase_jump(x_prev, target_velocity.astype("float32"), index, is_target=True)

        # 7. adversarial re-noising of target (real) and prediction (fake) to a time inside the phase
        adv_index = solver.sample_adversarial_index(end)
        t_adv = paddle.gather(solver.sigmas_prev, adv_index) * T
        real = solver.adversarial_renoise(target, end, adv_index, paddle.randn(target.shape, dtype=target.dtype))
        fake = solver.adversarial_renoise(prediction.astype("float32"), end, adv_index,
                                          paddle.randn(target.shape, dtype="float32"))

        # 8. discriminator (hinge) or generator (consistency + adversarial) loss
        embeds32, pooled32 = prompt_embeds.astype("float32"), pooled.astype("float32")
        with self.timer("discriminator"), self.autocast():
            if is_d_step:
                d_loss = self.discriminator("d_loss", fake, real, t_adv, embeds32, pooled32)
                return {"loss": d_loss.astype("float32"), "d_loss": d_loss}
            g_loss = args.adv_weight * self.discriminator("g_loss", fake, t_adv, embeds32, pooled32)
        loss_cm = consistency_loss(prediction, target, args.loss_type, args.huber_c)
        return {"loss": loss_cm + g_loss.astype("float32"), "loss_cm": loss_cm, "g_loss": g_loss}


# ----------------------------------------------------------------------------------------------
# Checkpoint contents (the atomic write, pruning and discovery are in checkpointing.py)
# ----------------------------------------------------------------------------------------------
def write_checkpoint_files(folder, args, student, discriminator, optimizers, lr_scheduler, scaler) -> list:
    """Rank 0's part of a checkpoint: LoRA (the final output's format), heads, optimizers (``{file stem:
    (optimizer, its parameters)}``), schedule, scaler, args. Safetensors and JSON only."""
    from safetensors.numpy import save_file

    pcm_lora.save_lora(student, folder, pdparams_copy=False)
    save_file({k: v.numpy() for k, v in discriminator.state_dict().items()},
              os.path.join(folder, "discriminator_heads.safetensors"))
    for stem, (optimizer, params) in optimizers.items():
        save_file(checkpointing.optimizer_tensors(optimizer, params), os.path.join(folder, f"{stem}.safetensors"))
    scaler_state = None
    if scaler is not None:
        scaler_state = {k: (np.asarray(v).tolist() if k == "scale" else v) for k, v in scaler.state_dict().items()}
    checkpointing.write_json(os.path.join(folder, "schedule.json"),
                             {"lr_scheduler": lr_scheduler.state_dict(), "grad_scaler": scaler_state})
    checkpointing.write_json(os.path.join(folder, "training_args.json"), recordable_args(args))
    return [pcm_lora.LORA_WEIGHT_NAME, "discriminator_heads.safetensors",
            *(f"{stem}.safetensors" for stem in optimizers), "schedule.json", "training_args.json"]


def read_checkpoint_files(path, rank, student, discriminator, optimizers, lr_scheduler, scaler):
    """Read and check everything a checkpoint holds for this rank against the models, changing nothing.
    Returns a function that applies it, or raises CheckpointError (missing or unexpected keys, wrong shapes
    or types = corrupt)."""
    from ppdiffusers.peft import set_peft_model_state_dict
    from ppdiffusers.peft.utils import get_peft_model_state_dict

    lora_file = os.path.join(path, pcm_lora.LORA_WEIGHT_NAME)
    lora = checkpointing.read_tensors(lora_file)
    checkpointing.check_tensors(lora, {f"transformer.{k}": v.shape for k, v in get_peft_model_state_dict(student).items()},
                                lora_file)
    heads_file = os.path.join(path, "discriminator_heads.safetensors")
    heads = checkpointing.read_tensors(heads_file)
    checkpointing.check_tensors(heads, {k: v.shape for k, v in discriminator.state_dict().items()}, heads_file)
    optimizer_states = {}
    for stem, (optimizer, params) in optimizers.items():
        file = os.path.join(path, f"{stem}.safetensors")
        optimizer_states[stem] = checkpointing.optimizer_state(checkpointing.read_tensors(file), params, file)
    schedule_file = os.path.join(path, "schedule.json")
    schedule = checkpointing.read_json(schedule_file)
    rank_path = os.path.join(path, checkpointing.rank_file(rank))
    rank_state = checkpointing.read_json(rank_path)
    try:
        lr_state = {k: schedule["lr_scheduler"][k] for k in lr_scheduler.state_dict()}
        scaler_state = schedule["grad_scaler"] if scaler is not None else None
        if scaler is not None and set(scaler_state) != set(scaler.state_dict()):
            raise KeyError("grad_scaler")
    except (KeyError, TypeError) as error:
        raise checkpointing.CheckpointError(f"{schedule_file} is corrupt (missing or malformed {error})") from None
    try:
        rng = checkpointing.parse_rng_state(rank_state["rng"])
        data = dict(rank_state["data"])
    except (KeyError, TypeError, ValueError) as error:
        raise checkpointing.CheckpointError(f"{rank_path} is corrupt (malformed random or data state: {error})") from None

    def apply():
        set_peft_model_state_dict(student, {k[len("transformer."):]: paddle.to_tensor(v) for k, v in lora.items()})
        discriminator.set_state_dict({k: paddle.to_tensor(v) for k, v in heads.items()})
        for stem, (optimizer, _) in optimizers.items():
            optimizer.set_state_dict(optimizer_states[stem])
        lr_scheduler.set_state_dict(lr_state)
        if scaler is not None:
            scaler.load_state_dict(scaler_state)
        checkpointing.restore_rng_state(rng)
        return data

    return apply


def resume_training(args, resume, layout, rank, models, log):
    """Restore the newest usable checkpoint: ``resume`` is ``find_resume``'s pick (hashes verified); if its
    contents do not fit the models on any rank, ``latest`` falls back to the next older intact checkpoint
    (an explicitly named one is an error). Returns ``(global_step, non-finite steps, data state)`` or None."""
    while resume is not None:
        path, state = resume
        checkpointing.check_compatible(state, layout, path)
        try:
            apply, problem = read_checkpoint_files(path, rank, *models), None
        except checkpointing.CheckpointError as error:
            apply, problem = None, error
        if not any_rank(problem is not None):
            data = apply()
            log(f"resumed from {path} at step {state['global_step']}")
            return state["global_step"], int(state.get("nonfinite_steps", 0)), data
        if args.resume_from_checkpoint != "latest":
            raise problem or checkpointing.CheckpointError(f"{path} is corrupt on another rank (see its log)")
        log(f"warning: skipping checkpoint: {problem or f'{path} is corrupt on another rank'}")
        resume = checkpointing.find_resume_checkpoint(args.output_dir, "latest", warn=log, below=state["global_step"])
    log(f"no checkpoint in {args.output_dir}: starting fresh")
    return None


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------
def total_train_steps(args, world_size: int, log) -> int:
    """--max_train_steps, else --num_train_epochs passes over the data (as the reference)."""
    if args.max_train_steps is not None:
        return args.max_train_steps
    from data import count_image_samples, resolve_data_source

    samples = count_image_samples(resolve_data_source(args.data_path))
    per_step = args.train_batch_size * world_size * args.gradient_accumulation_steps
    steps = args.num_train_epochs * max(1, math.ceil(samples / per_step))
    log(f"--max_train_steps not given: {args.num_train_epochs} epoch(s) of {samples} samples -> {steps} steps")
    return steps


def main(argv=None) -> int:
    """Parse, check, train. Returns the process exit code (2: bad arguments or checkpoint)."""
    args = parse_args(argv)
    lock = None
    try:
        geometry = validate_args(args)
        if dist.get_rank() == 0:  # one job per --output_dir; the lock lives as long as this process
            lock = run_control.RunLock(args.output_dir)
        return train(args, geometry).exit_code
    except (ArgumentError, checkpointing.CheckpointError, run_control.RunLockError) as error:
        print(f"{os.path.basename(__file__)}: error: {error}", file=sys.stderr)
        return 2
    finally:
        if lock is not None:
            lock.release()


class TrainResult:
    """What a run leaves behind in memory (for tests and tools): the models and the exit code."""

    def __init__(self, exit_code, global_step, student, discriminator, tracker):
        self.exit_code, self.global_step = exit_code, global_step
        self.student, self.discriminator, self.tracker = student, discriminator, tracker


def train(args, geometry: dict, on_step=None, timer=None) -> TrainResult:
    """The training run. ``on_step(global_step, is_d_step, student, discriminator)`` is called
    after every optimizer step (tests use it to watch which weights change); ``timer(phase)`` returns a
    context manager around each phase of a step (scripts/benchmark.py times them)."""
    timer = timer or (lambda phase: nullcontext())
    rank, world_size = world()
    log = print if rank == 0 else (lambda *a, **k: None)
    warn_ignored_flags(args, log)
    quiet_library_logging()
    if world_size > 1:
        dist.init_parallel_env()
    device = paddle.get_device()
    mixed = args.mixed_precision or "no"
    weight_dtype = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}[mixed]
    if args.enable_xformers_memory_efficient_attention and not device.startswith("gpu"):
        log("warning: --enable_xformers_memory_efficient_attention: no fused attention on this device; using plain attention")
    log(f"PCM-LoRA SD3: {world_size} process(es) on {device}, precision {mixed}, data: {geometry['data']}")
    seed = args.seed if args.seed is not None else 0
    stop = run_control.StopRequest(launched=run_control.launched_by_paddle())  # checked once per step
    os.makedirs(args.output_dir, exist_ok=True)
    check_shared_output_dir(args.output_dir)

    # ---- models
    from discriminator import Discriminator
    from sd3_text_encoding import SD3PromptEncoder

    tokenizers, text_encoders, vae, noise_scheduler, teacher, student = load_models(args, weight_dtype, log)
    discriminator = Discriminator(teacher)
    set_seed(seed + rank)  # per-rank noise, timesteps and guidance from here on
    sigmas_ascending = noise_scheduler.sigmas.numpy()[::-1][: noise_scheduler.config.num_train_timesteps]
    solver = EulerSolver(sigmas_ascending.copy(), args.num_euler_timesteps, args.multiphase)
    encode = SD3PromptEncoder(tokenizers, text_encoders, cache_size=args.text_embedding_cache_size,
                              offload=args.offload_text_encoders)
    uncond = encode.encode([""])  # computed once, broadcast to any batch size

    # ---- optimizers, schedule, scaler
    from ppdiffusers.optimization import get_scheduler

    lora_params = [p for p in student.parameters() if not p.stop_gradient]
    head_params = list(discriminator.parameters())
    max_steps = total_train_steps(args, world_size, log)
    lr_scheduler = get_scheduler(args.lr_scheduler, learning_rate=args.learning_rate, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=max_steps, num_cycles=args.lr_num_cycles, power=args.lr_power)
    optimizer = paddle.optimizer.AdamW(
        learning_rate=lr_scheduler, parameters=lora_params, beta1=args.adam_beta1, beta2=args.adam_beta2,
        epsilon=args.adam_epsilon, weight_decay=args.adam_weight_decay,
        grad_clip=paddle.nn.ClipGradByGlobalNorm(args.max_grad_norm))
    adv_optimizer = paddle.optimizer.AdamW(
        learning_rate=args.adv_lr, parameters=head_params, beta1=0.0, beta2=0.999, epsilon=args.adam_epsilon,
        weight_decay=args.adam_weight_decay, grad_clip=paddle.nn.ClipGradByGlobalNorm(args.max_grad_norm))
    scaler = paddle.amp.GradScaler(init_loss_scaling=2.0**16) if weight_dtype == "float16" else None

    # ---- data
    from data import DataTracker, build_train_dataloader

    layout = run_layout(args, world_size, {"transformer_layers": teacher.config.num_layers,
                                           "transformer_width": teacher.inner_dim})
    optimizers = {"optimizer": (optimizer, lora_params), "adv_optimizer": (adv_optimizer, head_params)}
    checkpoint_contents = (student, discriminator, optimizers, lr_scheduler, scaler)
    resumed = args.resume_from_checkpoint and resume_training(args, geometry["resume"], layout, rank, checkpoint_contents, log)
    global_step, nonfinite_total, data_resume = resumed or (0, 0, None)

    loader = build_train_dataloader(
        args.data_path, args.resolution, args.train_batch_size, num_workers=args.dataloader_num_workers, seed=seed,
        center_crop=args.center_crop, random_flip=args.random_flip, min_image_size=args.min_image_size,
        rank=rank, world_size=world_size, resume_state=data_resume, max_member_bytes=args.max_member_bytes,
        worker_init_fn=run_control.data_worker_init)
    tracker = DataTracker(loader.dataset)
    batches = run_control.BatchStream(loader, args.dataloader_timeout, where=f" on rank {rank}" if world_size > 1 else "")

    # ---- data parallel wrappers on what trains
    student_dp, discriminator_dp = student, discriminator
    if world_size > 1:
        student_dp = paddle.DataParallel(student)
        discriminator_dp = paddle.DataParallel(discriminator)
    step_fn = PCMStep(args, solver, encode, uncond, vae, teacher, student_dp, discriminator_dp, weight_dtype,
                      amp=weight_dtype != "float32", timer=timer)

    saved_at = {"step": global_step if resumed else None}

    def save(step: int) -> str:
        saved_at["step"] = step

        def write_shared(folder):
            return write_checkpoint_files(folder, args, student, discriminator, optimizers, lr_scheduler, scaler)

        return checkpointing.save_checkpoint(  # collective: every rank writes its part
            args.output_dir, step, rank, world_size, barrier, write_shared,
            {"rng": checkpointing.capture_rng_state(), "data": tracker.state_dict()},
            {**layout, "nonfinite_steps": nonfinite_total}, args.checkpoints_total_limit, log)

    # ---- loop
    from tqdm.auto import tqdm

    trackers = None

    def finish(exit_code: int) -> TrainResult:
        batches.close()  # the DataLoader's thread and workers end here, not in interpreter teardown
        if trackers is not None:
            trackers.close()
        return TrainResult(exit_code, global_step, student, discriminator, tracker)

    if rank == 0:
        trackers = Trackers(args.report_to, os.path.join(args.output_dir, args.logging_dir),
                            args.tracker_project_name, recordable_args(args))
    shift = args.validation_shift if args.validation_shift is not None else float(noise_scheduler.config.shift)

    def validate(step: int) -> None:
        if args.num_validation_images == 0:
            return
        barrier()
        if rank == 0:
            path = generate_validation_images(args, step, student, vae, text_encoders, tokenizers, shift, weight_dtype, trackers)
            progress.write(f"step {step}: validation images in {path}")
        barrier()

    progress = tqdm(total=max_steps, initial=global_step, desc="steps", disable=rank != 0, dynamic_ncols=True)
    consecutive_nonfinite, postfix, skipped = 0, {}, {}
    accum = args.gradient_accumulation_steps
    while global_step < max_steps:
        started = time.time()
        is_d_step = global_step % 2 == 0
        model_dp = discriminator_dp if is_d_step else student_dp
        opt = adv_optimizer if is_d_step else optimizer
        adv_optimizer.clear_grad(set_to_zero=False)  # heads' gradients from G steps never reach a D update
        optimizer.clear_grad(set_to_zero=False)
        totals = {}  # logged values summed on the device: one host sync per step, not per value
        for micro in range(accum):
            with timer("data"):
                batch = next(batches)
            tracker.update(batch)
            sync = micro == accum - 1 or world_size == 1
            with (nullcontext() if sync else model_dp.no_sync()):
                out = step_fn(batch, is_d_step)
                loss = out["loss"] / accum
                with timer("backward"):
                    (scaler.scale(loss) if scaler is not None else loss).backward()
            for key, value in out.items():
                totals[key] = totals.get(key, 0.0) + value.detach().astype("float32") / accum
        values = paddle.stack(list(totals.values())).numpy()
        logs = {key: float(v) for key, v in zip(totals, values) if key != "loss"}
        finite = bool(np.isfinite(values).all())
        # one collective per step: every rank skips a non-finite update together, and stops together on a signal
        skip_update, stop_now = any_rank(not finite, stop.requested)
        if skip_update:
            consecutive_nonfinite += 1
            nonfinite_total += 1
            log(f"warning: non-finite loss at step {global_step}; update skipped ({consecutive_nonfinite} in a row)")
        else:
            consecutive_nonfinite = 0
            with timer("optimizer"):
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
            if not is_d_step:
                lr_scheduler.step()
        adv_optimizer.clear_grad(set_to_zero=False)
        optimizer.clear_grad(set_to_zero=False)
        global_step += 1
        if on_step is not None:
            on_step(global_step, is_d_step, student, discriminator)

        logs["lr"] = float(optimizer.get_lr())
        postfix.update({k: f"{v:.4g}" for k, v in logs.items()})
        progress.set_postfix(postfix, refresh=False)
        progress.update(1)
        skipped = tracker.skipped_all_ranks()  # collective: summed over every rank's readers
        if rank == 0:
            trackers.log({**logs, "skipped_samples": sum(skipped.values()),
                          "time_per_step": time.time() - started}, global_step)
            if global_step % 100 == 0 and skipped:
                progress.write(f"step {global_step}: skipped samples (all ranks): {skipped}")

        if consecutive_nonfinite >= MAX_CONSECUTIVE_NONFINITE:
            path = save(global_step)
            print(f"error: {consecutive_nonfinite} non-finite losses in a row at step {global_step}; stopped after saving "
                  f"{path}. Lower --learning_rate/--adv_lr or use --mixed_precision bf16/no.", file=sys.stderr)
            return finish(3)
        if stop_now:
            path = save(global_step)
            if rank == 0:
                run_control.console(f"stop requested ({stop.describe() if stop.requested else 'signal on another rank'}): "
                                    f"saved {path}; resume with --resume_from_checkpoint latest")
            return finish(0)
        if global_step % args.checkpointing_steps == 0 and global_step < max_steps:
            save(global_step)
        if global_step % args.validation_steps == 0 and global_step < max_steps:
            validate(global_step)
    progress.close()
    if saved_at["step"] != global_step:
        save(global_step)  # the final state too, so a longer run can continue from it
    validate(global_step)

    # ---- final output
    check_ranks_in_sync(lora_params, "LoRA weights")
    check_ranks_in_sync(head_params, "discriminator heads")
    barrier()
    if rank == 0:  # the arguments first: a LoRA on disk always has the training_args.json that gives its scale
        checkpointing.write_json(os.path.join(args.output_dir, "training_args.json"), recordable_args(args))
        path = pcm_lora.save_lora(student, args.output_dir)
        log(f"saved LoRA to {path}; load it with pipe.load_lora_weights(...) and "
            f"joint_attention_kwargs={{'scale': {pcm_lora.inference_lora_scale(args.lora_rank)}}}")
        if skipped:
            log(f"skipped samples (all ranks): {skipped}")
        if args.text_embedding_cache_size:
            log(f"text embedding cache on rank 0: {encode.hits} hits, {encode.misses} misses")
    barrier()
    return finish(0)


if __name__ == "__main__":
    run_control.exit_process(main())
