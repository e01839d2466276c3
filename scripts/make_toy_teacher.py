#!/usr/bin/env python
"""Build a toy SD3 teacher that really generates: coloured shapes on coloured backgrounds.

    python scripts/make_toy_teacher.py --output_dir toy [--seed 0] [--verify]

The toy world: 32 px images of one shape (circle, square, triangle) in one colour on a background of
another (red, green, blue, yellow), anywhere in the middle three quarters of the image and of random size, captioned
"a red circle on a blue background" (36 captions). The caption determines what is visible, and
:func:`classify` reads colour and shape back from pixels, so caption adherence is measurable.

Writes ``DIR/data/`` (webdataset shards of png + txt + json, the trainer's ``--data_path``),
``DIR/teacher/`` (the diffusers SD3 layout of ``scripts/make_tiny_sd3.py``, built by it, then its VAE
and transformer trained here: the VAE for reconstruction, the transformer with SD3's rectified-flow
objective and 10 % caption dropout so that classifier-free guidance works, then the VAE decoder alone on
the frozen encoder's latents for sharper images in the same latent space; the text encoders stay random) and ``DIR/toy_teacher.json`` (the arguments and the sha256 of every file written).

Deterministic for a seed (single-threaded CPU): two builds are byte-identical. A re-run with the
same arguments whose files still match their sha256 reuses them; ``--verify`` rebuilds in a temporary
folder and checks the result against ``DIR/toy_teacher.json`` (exit 1 on any difference).
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import paddle_compat  # noqa: E402,F401  (must precede ppdiffusers)
import numpy as np  # noqa: E402
import paddle  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from make_tiny_cc3m import COLORS, write_tar  # noqa: E402
from make_tiny_sd3 import make_tiny_sd3  # noqa: E402

TOY_COLOURS = ("red", "green", "blue", "yellow")
TOY_SHAPES = ("circle", "square", "triangle")
IMAGE_SIZE = 32
POSITION_JITTER = 0.25  # the shape's centre: the image centre +- this fraction of the image, uniform in x and y
RADIUS_RANGE = (0.16, 0.24)  # its half-width, as a fraction of the image, uniform
MANIFEST = "toy_teacher.json"


# ----------------------------------------------------------------------------------------------
# The toy world: captions, rendering, and reading colour and shape back from pixels
# ----------------------------------------------------------------------------------------------
def caption(fg: str, shape: str, bg: str) -> str:
    return f"a {fg} {shape} on a {bg} background"


def toy_attributes() -> list:
    """Every (foreground colour, shape, background colour) of the world, foreground != background."""
    return [(fg, shape, bg) for fg in TOY_COLOURS for shape in TOY_SHAPES for bg in TOY_COLOURS if fg != bg]


def render(fg: str, shape: str, bg: str, rng: np.random.Generator, size: int = IMAGE_SIZE,
           jitter: float = POSITION_JITTER, radius: tuple = RADIUS_RANGE) -> Image.Image:
    """One image of the caption: the shape's centre uniform within ``jitter`` of the middle, its half-width
    uniform in ``radius`` (both fractions of the image). The position is what makes the world's flow curved:
    at high noise the posterior mean is a blur over positions, and the sampler must commit to one."""
    image = Image.new("RGB", (size, size), COLORS[bg])
    draw = ImageDraw.Draw(image)
    r = size * rng.uniform(*radius)
    cx, cy = size / 2 + rng.uniform(-jitter, jitter) * size, size / 2 + rng.uniform(-jitter, jitter) * size
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS[fg])
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=COLORS[fg])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[fg])
    return image


def classify(image) -> tuple:
    """(foreground colour, shape, background colour) read from pixels: the background is the palette
    colour nearest the border's median; the foreground the palette colour nearest the median of the
    pixels far from the background; the shape from how much of its bounding box it fills (square ~1,
    circle ~0.79, triangle ~0.5). None for a part that cannot be read."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    palette = np.array([COLORS[c] for c in TOY_COLOURS], dtype=np.float32)

    def nearest(rgb):
        return TOY_COLOURS[int(np.argmin(((palette - rgb) ** 2).sum(-1)))]

    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    bg = nearest(np.median(border, axis=0))
    mask = np.sqrt(((pixels - np.array(COLORS[bg], dtype=np.float32)) ** 2).sum(-1)) > 80
    if mask.sum() < 0.02 * mask.size:
        return None, None, bg
    fg = nearest(np.median(pixels[mask], axis=0))
    ys, xs = np.nonzero(mask)
    fill = mask.sum() / float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
    return (fg if fg != bg else None), shape, bg


def adherence(image, attributes: tuple) -> float:
    """Fraction of the caption's three attributes (colour, shape, background) that the image shows."""
    return sum(a == b for a, b in zip(classify(image), attributes)) / 3.0


def toy_dataset(seed: int, per_caption: int, jitter: float = POSITION_JITTER, radius: tuple = RADIUS_RANGE) -> list:
    """``[(image, caption, attributes)]``: ``per_caption`` images of every caption, a function of ``seed``."""
    rng = np.random.default_rng(seed)
    return [(render(*attrs, rng, jitter=jitter, radius=radius), caption(*attrs), attrs)
            for _ in range(per_caption) for attrs in toy_attributes()]


def write_shards(folder: str, samples: list, num_shards: int) -> None:
    """Webdataset shards ``toy-0000.tar`` ...: ``png`` + ``txt`` + ``json`` per sample."""
    os.makedirs(folder, exist_ok=True)
    per_shard = math.ceil(len(samples) / num_shards)
    for shard in range(num_shards):
        members = []
        for index in range(shard * per_shard, min(len(samples), (shard + 1) * per_shard)):
            image, text, (fg, shape, bg) = samples[index]
            png = io.BytesIO()
            image.save(png, format="PNG")
            meta = {"caption": text, "key": f"{index:09d}", "colour": fg, "shape": shape, "background": bg,
                    "width": image.width, "height": image.height}
            members.append((f"{index:09d}", {"png": png.getvalue(), "txt": text.encode(),
                                             "json": json.dumps(meta, sort_keys=True).encode()}))
        write_tar(os.path.join(folder, f"toy-{shard:04d}.tar"), members)


# ----------------------------------------------------------------------------------------------
# Training the VAE and the transformer
# ----------------------------------------------------------------------------------------------
def _pixels(samples: list) -> paddle.Tensor:
    array = np.stack([np.asarray(image, dtype=np.float32) for image, _, _ in samples]) / 127.5 - 1.0
    return paddle.to_tensor(array.transpose(0, 3, 1, 2))


def _schedule(lr: float, steps: int):
    warmup = max(1, min(100, steps // 10))
    return paddle.optimizer.lr.LinearWarmup(paddle.optimizer.lr.CosineAnnealingDecay(lr, max(1, steps - warmup)),
                                            warmup, 0.0, lr)


def train_vae(vae, pixels: paddle.Tensor, steps: int, batch_size: int, lr: float, log) -> None:
    """Reconstruction (MSE) with a small KL term; then shift/scale factors that give unit-variance latents."""
    for param in vae.parameters():
        param.stop_gradient = False
    vae.train()
    schedule = _schedule(lr, steps)
    optimizer = paddle.optimizer.AdamW(learning_rate=schedule, parameters=vae.parameters(), weight_decay=0.0)
    rng = np.random.default_rng(1)
    for step in range(steps):
        batch = pixels[paddle.to_tensor(rng.choice(pixels.shape[0], batch_size, replace=False))]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        mse = ((reconstruction - batch) ** 2).mean()
        loss = mse + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}: reconstruction mse {float(mse):.4f}")
    vae.eval()
    for param in vae.parameters():
        param.stop_gradient = True
    with paddle.no_grad():
        means = paddle.concat([vae.encode(pixels[i:i + 64]).latent_dist.mean for i in range(0, pixels.shape[0], 64)])
    shift = float(means.mean())
    vae.register_to_config(shift_factor=round(shift, 6), scaling_factor=round(1.0 / float((means - shift).std()), 6))


def train_decoder(vae, pixels: paddle.Tensor, steps: int, batch_size: int, lr: float, log) -> None:
    """Fine-tune the VAE decoder alone on the frozen encoder's latents: sharper images, the same latent space
    (so the transformer trained on it stays valid)."""
    with paddle.no_grad():
        posteriors = [vae.encode(pixels[i:i + 64]).latent_dist for i in range(0, pixels.shape[0], 64)]
    mean = paddle.concat([p.mean for p in posteriors])
    std = paddle.concat([p.std for p in posteriors])
    parameters = list(vae.decoder.parameters())
    for param in parameters:
        param.stop_gradient = False
    vae.decoder.train()
    schedule = _schedule(lr, steps)
    optimizer = paddle.optimizer.AdamW(learning_rate=schedule, parameters=parameters, weight_decay=0.0)
    rng = np.random.default_rng(3)
    for step in range(steps):
        index = paddle.to_tensor(rng.choice(pixels.shape[0], batch_size, replace=False))
        latents = mean[index] + std[index] * paddle.randn(mean[index].shape)
        mse = ((vae.decode(latents).sample - pixels[index]) ** 2).mean()
        mse.backward()
        optimizer.step()
        optimizer.clear_grad()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"decoder step {step}: reconstruction mse {float(mse):.4f}")
    vae.eval()
    for param in parameters:
        param.stop_gradient = True


def train_transformer(transformer, vae, pixels, embeds, pooled, uncond, caption_index, steps, batch_size, lr,
                      shift, log) -> None:
    """SD3's rectified flow: ``x_t = sigma*noise + (1-sigma)*x0``, predict ``noise - x0``, sigma from the
    logit-normal density with the scheduler's shift; 10 % of captions dropped to the empty prompt."""
    with paddle.no_grad():
        posteriors = [vae.encode(pixels[i:i + 64]).latent_dist for i in range(0, pixels.shape[0], 64)]
    mean = paddle.concat([p.mean for p in posteriors])
    std = paddle.concat([p.std for p in posteriors])
    shift_factor, scaling_factor = vae.config.shift_factor, vae.config.scaling_factor
    for param in transformer.parameters():
        param.stop_gradient = False
    transformer.train()
    schedule = _schedule(lr, steps)
    optimizer = paddle.optimizer.AdamW(learning_rate=schedule, parameters=transformer.parameters(), weight_decay=0.0,
                                       grad_clip=paddle.nn.ClipGradByGlobalNorm(1.0))
    rng = np.random.default_rng(2)
    for step in range(steps):
        index = paddle.to_tensor(rng.choice(mean.shape[0], batch_size, replace=False))
        x0 = (mean[index] + std[index] * paddle.randn(mean[index].shape) - shift_factor) * scaling_factor
        captions = caption_index[index]
        drop = paddle.rand([batch_size]) < 0.1
        batch_embeds = paddle.where(drop.reshape([-1, 1, 1]), uncond[0].expand([batch_size, -1, -1]), embeds[captions])
        batch_pooled = paddle.where(drop.reshape([-1, 1]), uncond[1].expand([batch_size, -1]), pooled[captions])
        u = paddle.nn.functional.sigmoid(paddle.randn([batch_size]))
        sigma = (shift * u / (1 + (shift - 1) * u)).reshape([-1, 1, 1, 1])
        noise = paddle.randn(x0.shape)
        noisy = sigma * noise + (1 - sigma) * x0
        velocity = transformer(hidden_states=noisy, timestep=sigma.flatten() * 1000, encoder_hidden_states=batch_embeds,
                               pooled_projections=batch_pooled).sample
        loss = ((velocity - (noise - x0)) ** 2).mean()
        loss.backward()
        optimizer.step()
        optimizer.clear_grad()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"transformer step {step}: flow-matching loss {float(loss):.4f}")
    transformer.eval()


# ----------------------------------------------------------------------------------------------
# Build, manifest, reuse, verify
# ----------------------------------------------------------------------------------------------
def file_hashes(folder: str) -> dict:
    """sha256 of every file under ``folder`` (relative paths), except the manifest."""
    hashes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel != MANIFEST:
                with open(path, "rb") as f:
                    hashes[rel] = hashlib.sha256(f.read()).hexdigest()
    return dict(sorted(hashes.items()))


def save_trained(model, teacher: str, name: str) -> None:
    """Save into ``teacher/name``; the config records ``name`` instead of the folder it was loaded from, so that
    the files do not depend on where the build ran."""
    model.register_to_config(_name_or_path=name)
    model.save_pretrained(os.path.join(teacher, name))


def build(output_dir: str, options: dict, log=print) -> dict:
    """Write data/ and teacher/ into ``output_dir``; returns the manifest (also written as toy_teacher.json)."""
    from ppdiffusers import AutoencoderKL, SD3Transformer2DModel

    from sd3_text_encoding import SD3PromptEncoder, load_tokenizers_and_text_encoders

    paddle.base.core.set_num_threads(1)  # one thread: the same bits on every build
    paddle.set_device("cpu")
    started = time.time()
    seed = options["seed"]
    samples = toy_dataset(seed, options["images_per_caption"], options["position_jitter"], tuple(options["radius_range"]))
    write_shards(os.path.join(output_dir, "data"), samples, num_shards=4)
    teacher = os.path.join(output_dir, "teacher")
    make_tiny_sd3(teacher, seed=seed, num_layers=options["num_layers"], num_attention_heads=options["num_attention_heads"],
                  attention_head_dim=options["attention_head_dim"], sample_size=IMAGE_SIZE // 8,
                  vae_channels=options["vae_channels"])
    pixels = _pixels(samples)
    paddle.seed(seed + 10)
    vae = AutoencoderKL.from_pretrained(teacher, subfolder="vae")
    train_vae(vae, pixels, options["vae_steps"], options["batch_size"], options["vae_lr"], log)
    save_trained(vae, teacher, "vae")

    tokenizers, encoders = load_tokenizers_and_text_encoders(teacher)
    for encoder in encoders:
        encoder.eval()
    encode = SD3PromptEncoder(tokenizers, encoders)
    captions = sorted({text for _, text, _ in samples})
    embeds, pooled = encode.encode(captions)
    uncond = encode.encode([""])
    caption_index = paddle.to_tensor([captions.index(text) for _, text, _ in samples])
    scheduler_config = json.load(open(os.path.join(teacher, "scheduler", "scheduler_config.json")))
    paddle.seed(seed + 20)
    transformer = SD3Transformer2DModel.from_pretrained(teacher, subfolder="transformer")
    train_transformer(transformer, vae, pixels, embeds, pooled, uncond, caption_index, options["transformer_steps"],
                      options["batch_size"], options["transformer_lr"], float(scheduler_config["shift"]), log)
    save_trained(transformer, teacher, "transformer")
    paddle.seed(seed + 30)
    train_decoder(vae, pixels, options["decoder_steps"], options["batch_size"], options["decoder_lr"], log)
    save_trained(vae, teacher, "vae")
    manifest = {"options": options, "build_seconds": round(time.time() - started, 1), "sha256": file_hashes(output_dir)}
    with open(os.path.join(output_dir, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def read_manifest(output_dir: str):
    path = os.path.join(output_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", required=True, help="writes DIR/teacher, DIR/data and DIR/toy_teacher.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images_per_caption", type=int, default=16, help="training images per caption (36 captions)")
    p.add_argument("--position_jitter", type=float, default=POSITION_JITTER,
                   help="the shapes' centres: image centre +- this fraction of the image (0.1: the first, near-straight world)")
    p.add_argument("--radius_range", type=float, nargs=2, default=list(RADIUS_RANGE), metavar=("MIN", "MAX"),
                   help="the shapes' half-widths, fractions of the image (0.22 0.30: the first world)")
    p.add_argument("--num_layers", type=int, default=4, help="transformer blocks")
    p.add_argument("--num_attention_heads", type=int, default=2)
    p.add_argument("--attention_head_dim", type=int, default=16, help="heads x head dim must be a multiple of 32")
    p.add_argument("--vae_channels", type=int, default=8)
    p.add_argument("--vae_steps", type=int, default=300)
    p.add_argument("--vae_lr", type=float, default=2e-3)
    p.add_argument("--transformer_steps", type=int, default=1000)
    p.add_argument("--decoder_steps", type=int, default=600, help="VAE decoder fine-tuning after the transformer")
    p.add_argument("--decoder_lr", type=float, default=3e-3)
    p.add_argument("--transformer_lr", type=float, default=1e-3)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--verify", action="store_true",
                   help="rebuild in a temporary folder and compare with DIR/toy_teacher.json's sha256 list")
    args = p.parse_args(argv)
    options = {k: v for k, v in vars(args).items() if k not in ("output_dir", "verify")}
    existing = read_manifest(args.output_dir)
    if args.verify:
        if existing is None:
            print(f"make_toy_teacher.py: error: --verify: no {MANIFEST} in {args.output_dir}", file=sys.stderr)
            return 2
        with tempfile.TemporaryDirectory() as tmp:
            rebuilt = build(tmp, existing["options"], log=lambda *a: None)
        recorded, on_disk = existing["sha256"], file_hashes(args.output_dir)
        bad = sorted(k for k in set(recorded) | set(rebuilt["sha256"]) | set(on_disk)
                     if not recorded.get(k) == rebuilt["sha256"].get(k) == on_disk.get(k))
        print(json.dumps({"verified": not bad, "files": len(recorded), "differing": bad}))
        return 0 if not bad else 1
    if existing is not None and existing["options"] == options and existing["sha256"] == file_hashes(args.output_dir):
        print(f"reusing the toy teacher in {args.output_dir} (same options, files match their sha256)", file=sys.stderr)
    else:
        if existing is not None or os.path.exists(os.path.join(args.output_dir, "teacher")):
            for name in ("teacher", "data"):
                shutil.rmtree(os.path.join(args.output_dir, name), ignore_errors=True)
        existing = build(args.output_dir, options, log=lambda *a: print(*a, file=sys.stderr, flush=True))
    size = sum(os.path.getsize(os.path.join(args.output_dir, k)) for k in existing["sha256"])
    print(json.dumps({"teacher": os.path.join(args.output_dir, "teacher"), "data": os.path.join(args.output_dir, "data"),
                      "bytes": size, "build_seconds": existing["build_seconds"], "options": options}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
