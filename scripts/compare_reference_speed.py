#!/usr/bin/env python
"""Side-by-side CPU speed of this port (Paddle) and the PyTorch stack the reference trainer runs on
(diffusers' SD3 transformer), on the same weights and inputs, interleaved, median of N pairs.

    python scripts/compare_reference_speed.py --teacher /tmp/med-sd3 --resolution 256 --pairs 5

What is timed, in each framework, in its own process (OMP_NUM_THREADS and the framework's thread count set to
``--threads`` on both sides):

* ``teacher_forward``: the SD3 transformer without gradients on ``2 x --batch`` samples (the CFG pass);
* ``disc_forward_backward``: the frozen transformer forward with gradients to its input, and backward
  (the G step's pass through the teacher as discriminator backbone);
* single operators with the shapes of the small teacher at 256 px: a [820,256]x[256,256] matmul, softmax on
  [2,8,410,410], transpose+reshape of [2,410,8,32], a 3x3 conv2d (VAE-like, [2,128,128,128]).

The Paddle side is this repository's stack (``paddle_compat`` first, so with its CPU settings); the torch side
is diffusers' ``SD3Transformer2DModel`` with the Paddle weights converted (Linear weights transposed). The two
forwards are checked to agree (max abs difference printed). The torch side needs a separate venv that is not
part of requirements.txt: the same venv as ``scripts/compare_reference_trainer.py`` (its docstring has the
command; torch 2.13.0's CPU build, diffusers 0.29.2), with which the README's numbers were measured.

This is not the whole reference trainer (its data path, discriminator and accelerate loop are hard-wired to
1024 px SD3-medium on GPUs); it times the pieces that take >90 % of a step. Last line: one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("matmul", "softmax", "transpose_reshape", "conv2d")
ITEMS = ("teacher_forward", "disc_forward_backward") + OPS


def _median_ms(fn, repeats: int) -> float:
    fn()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _inputs(config: dict, resolution: int, batch: int):
    import numpy as np

    rng = np.random.default_rng(0)
    latent = resolution // 8
    return {
        "hidden_states": rng.standard_normal((batch, int(config["in_channels"]), latent, latent)).astype("float32"),
        "encoder_hidden_states": rng.standard_normal((batch, 154, int(config["joint_attention_dim"]))).astype("float32"),
        "pooled_projections": rng.standard_normal((batch, int(config["pooled_projection_dim"]))).astype("float32"),
        "timestep": np.full((batch,), 500.0, dtype="float32"),
    }


def worker_paddle(args, config, inputs) -> dict:
    sys.path.insert(0, REPO)
    import paddle_compat  # noqa: F401  (CPU settings, before paddle)
    import paddle
    import paddle.nn.functional as F
    from ppdiffusers import SD3Transformer2DModel

    import frozen_linear

    frozen_linear.install()
    model = SD3Transformer2DModel.from_pretrained(args.teacher, subfolder="transformer")
    for param in model.parameters():
        param.stop_gradient = True
    model.eval()
    x = {k: paddle.to_tensor(v) for k, v in inputs.items()}
    double = {k: paddle.concat([v, v]) for k, v in x.items()}

    def teacher():
        with paddle.no_grad():
            return model(**double).sample

    def disc():
        sample = x["hidden_states"].clone()
        sample.stop_gradient = False
        out = model(**{**x, "hidden_states": sample}).sample
        out.mean().backward()

    a, w = paddle.randn([820, 256]), paddle.randn([256, 256])
    s = paddle.randn([2, 8, 410, 410])
    t = paddle.randn([2, 410, 8, 32])
    img, kernel = paddle.randn([2, 128, 128, 128]), paddle.randn([128, 128, 3, 3])
    result = {
        "teacher_forward": _median_ms(teacher, args.repeats),
        "disc_forward_backward": _median_ms(disc, args.repeats),
        "matmul": _median_ms(lambda: paddle.matmul(a, w), 20 * args.repeats),
        "softmax": _median_ms(lambda: F.softmax(s, axis=-1), 5 * args.repeats),
        "transpose_reshape": _median_ms(lambda: t.transpose([0, 2, 1, 3]).reshape([2, 8, 410 * 32]), 20 * args.repeats),
        "conv2d": _median_ms(lambda: F.conv2d(img, kernel, padding=1), args.repeats),
    }
    with paddle.no_grad():
        result["output"] = model(**x).sample.numpy().tolist()
    return result


def to_torch_layout(paddle_state: dict, torch_keys, linear_weights) -> dict:
    """Paddle weights (numpy) -> the names and layouts of a torch model with the state-dict keys ``torch_keys``.
    Linear weights (``linear_weights``: their names) are [in, out] in Paddle and [out, in] in torch; everything
    else (embeddings, convolutions, norms) is stored alike. A Paddle weight the torch model has no place for is an
    error, except a zero LayerNorm bias (Paddle's AdaLayerNormContinuous has one, diffusers' has none)."""
    import numpy as np

    extra = sorted(set(paddle_state) - set(torch_keys))
    nonzero = [k for k in extra if not (k.endswith("norm.bias") and not np.any(paddle_state[k]))]
    if nonzero:
        raise ValueError(f"weights the torch model has no place for: {nonzero}")
    return {k: np.ascontiguousarray(v.T) if k in linear_weights else v for k, v in paddle_state.items() if k not in extra}


def convert_to_torch(paddle_state: dict, model) -> dict:
    """``to_torch_layout`` for the torch module ``model``, as torch tensors (its Linear layers found by type)."""
    import torch

    linear = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    converted = to_torch_layout(paddle_state, model.state_dict().keys(), linear)
    return {k: torch.from_numpy(v) for k, v in converted.items()}


def allow_torchvision_without_ops() -> None:
    """PyPI's torchvision wheels are built for CUDA torch: with the CPU torch their C++ ops do not load, and then
    ``import torchvision`` (which transformers and diffusers do when it is installed) fails registering fake kernels
    for ``nms``/``qnms``. Declaring those two ops first lets it import; its PIL transforms work, the detection ops
    stay unavailable. Does nothing when torchvision is absent or its ops load."""
    import importlib.util

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None:
        return
    try:
        torch.ops.load_library(os.path.join(spec.submodule_search_locations[0], "_C.so"))
    except OSError:
        for op in ("nms", "qnms"):
            torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def worker_torch(args, config, inputs) -> dict:
    import torch
    import torch.nn.functional as F

    allow_torchvision_without_ops()
    from diffusers import SD3Transformer2DModel
    from safetensors.numpy import load_file

    torch.set_num_threads(args.threads)
    model = SD3Transformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    state = load_file(os.path.join(args.teacher, "transformer", "diffusion_paddle_model.safetensors"))
    missing, _ = model.load_state_dict(convert_to_torch(state, model), strict=False)
    if [k for k in missing if not k.endswith("pos_embed.pos_embed")]:  # the sin-cos table is computed, not loaded
        raise SystemExit(f"weight conversion: missing {missing}")
    model.requires_grad_(False).eval()
    x = {k: torch.from_numpy(v) for k, v in inputs.items()}
    double = {k: torch.cat([v, v]) for k, v in x.items()}

    def teacher():
        with torch.no_grad():
            return model(**double).sample

    def disc():
        sample = x["hidden_states"].clone().requires_grad_(True)
        out = model(**{**x, "hidden_states": sample}).sample
        out.mean().backward()

    a, w = torch.randn(820, 256), torch.randn(256, 256)
    s = torch.randn(2, 8, 410, 410)
    t = torch.randn(2, 410, 8, 32)
    img, kernel = torch.randn(2, 128, 128, 128), torch.randn(128, 128, 3, 3)
    result = {
        "teacher_forward": _median_ms(teacher, args.repeats),
        "disc_forward_backward": _median_ms(disc, args.repeats),
        "matmul": _median_ms(lambda: a @ w, 20 * args.repeats),
        "softmax": _median_ms(lambda: F.softmax(s, dim=-1), 5 * args.repeats),
        "transpose_reshape": _median_ms(lambda: t.transpose(1, 2).reshape(2, 8, 410 * 32), 20 * args.repeats),
        "conv2d": _median_ms(lambda: F.conv2d(img, kernel, padding=1), args.repeats),
    }
    with torch.no_grad():
        result["output"] = model(**x).sample.numpy().tolist()
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="a teacher folder written by scripts/make_tiny_sd3.py")
    p.add_argument("--torch_python", default="/work/torchvenv/bin/python", help="python of the torch venv")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--pairs", type=int, default=5, help="interleaved Paddle/torch process pairs")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats of each item inside a process (median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", choices=["paddle", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--inputs", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    with open(os.path.join(args.teacher, "transformer", "config.json"), encoding="utf-8") as f:
        config = json.load(f)

    if args.worker:
        import numpy as np

        inputs = dict(np.load(args.inputs))
        result = (worker_paddle if args.worker == "paddle" else worker_torch)(args, config, inputs)
        print(json.dumps(result))
        return result

    import numpy as np

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    runs = {"paddle": [], "torch": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "inputs.npz")
        np.savez(path, **_inputs(config, args.resolution, args.batch))
        common = [os.path.abspath(__file__), "--teacher", args.teacher, "--repeats", str(args.repeats),
                  "--threads", str(args.threads), "--inputs", path]
        for pair in range(args.pairs):
            order = ("paddle", "torch") if pair % 2 == 0 else ("torch", "paddle")
            for side in order:
                python = sys.executable if side == "paddle" else args.torch_python
                proc = subprocess.run([python, *common, "--worker", side], env=env, capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(f"{side} worker failed:\n{proc.stderr[-3000:]}")
                runs[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    difference = float(np.abs(np.array(runs["paddle"][0]["output"]) - np.array(runs["torch"][0]["output"])).max())
    print(f"same weights and inputs: max |paddle - torch| of the transformer output = {difference:.2e}")
    print(f"{'item':<24}{'paddle ms':>22}{'torch ms':>22}{'ratio':>8}")
    summary = {"pairs": args.pairs, "max_abs_output_difference": difference, "items": {}}
    for item in ITEMS:
        pv, tv = [r[item] for r in runs["paddle"]], [r[item] for r in runs["torch"]]
        ratios = [a / b for a, b in zip(pv, tv)]
        row = {"paddle_ms": statistics.median(pv), "torch_ms": statistics.median(tv),
               "ratio_median": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)]}
        summary["items"][item] = row
        print(f"{item:<24}{row['paddle_ms']:>10.2f} ({min(pv):.2f}-{max(pv):.2f}){row['torch_ms']:>10.2f} "
              f"({min(tv):.2f}-{max(tv):.2f}){row['ratio_median']:>7.2f}x")
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
