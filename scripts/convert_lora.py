#!/usr/bin/env python
"""Convert PCM SD3 LoRA files between this project's Paddle format and the diffusers (PyTorch) format.

    python scripts/convert_lora.py --to diffusers outputs/run/paddle_lora_weights.safetensors pytorch_lora_weights.safetensors
    python scripts/convert_lora.py --to paddle pcm_deterministic_4step_shift3.safetensors paddle_lora_weights.safetensors

numpy and safetensors only (no torch, no paddle). Keys are ``transformer.<module>.lora_A/B.weight`` in
both formats; Linear weights are transposed (Paddle ``[in, out]`` <-> PyTorch ``[out, in]``), Conv2d
weights are the same in both.

The LoRA scale: our file is used with ``joint_attention_kwargs={"scale": alpha/rank}`` (0.25 for rank 32),
as the seed snippet does. ``--to diffusers`` folds that scale into ``lora_B`` and records it in the file's
metadata (``pcm_lora_scale``), so a diffusers user gets the trained student at the default scale 1.0;
``--to paddle`` unfolds a recorded scale again (the round trip is bit-exact when alpha/rank is a power of
two, i.e. for ranks 1, 2, 4, ..., 64). Official PyTorch PCM SD3 LoRAs carry no such record and are used
with scale 0.25, as published: they convert as they are. ``--halved`` undoes the reference's ``convert.py``
(every tensor halved and cast to fp16; scale 1.0 in diffusers): tensors are doubled, so the seed snippet's
0.25 applies.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from safe_pdparams import UnsafeFileError, is_safetensors, load_pdparams  # noqa: E402  (numpy only)

SCALE_KEY = "pcm_lora_scale"


def read(path: str):
    """Tensors (as numpy) and metadata of a .safetensors file (or a folder holding exactly one), or of a
    Paddle .pdparams state dict (read by the allow-list loader; Paddle layout, metadata format "pd")."""
    if os.path.isdir(path):
        files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
        if len(files) != 1:
            raise SystemExit(f"error: {path} holds {len(files)} .safetensors files; name the file")
        path = os.path.join(path, files[0])
    if not is_safetensors(path):
        return load_pdparams(path), {"format": "pd"}
    with safe_open(path, framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _check_lora(tensors: dict, path: str) -> None:
    bad = [k for k in tensors if not (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight"))]
    if bad or not tensors:
        raise SystemExit(f"error: {path} is not a LoRA file (unexpected keys such as {bad[:3]})")


def _swap_layout(name: str, weight: np.ndarray) -> np.ndarray:
    return weight.T.copy() if weight.ndim == 2 else weight


def _with_prefix(name: str) -> str:
    return name if name.startswith("transformer.") else f"transformer.{name}"


def to_diffusers(tensors: dict, scale: float) -> dict:
    out = {}
    for name, weight in tensors.items():
        weight = _swap_layout(name, weight)
        if ".lora_B." in name and scale != 1.0:
            weight = (weight * np.asarray(scale, dtype=weight.dtype)).astype(weight.dtype)
        out[_with_prefix(name)] = weight
    return out


def to_paddle(tensors: dict, scale: float, halved: bool) -> dict:
    out = {}
    for name, weight in tensors.items():
        if halved:
            weight = weight.astype(np.float32) * np.float32(2.0)
        if ".lora_B." in name and scale != 1.0:
            weight = (weight / np.asarray(scale, dtype=weight.dtype)).astype(weight.dtype)
        out[_with_prefix(name)] = _swap_layout(name, weight)
    return out


def lora_scale_of_run(path: str) -> float | None:
    """alpha/rank from the training run's training_args.json beside a LoRA file (or in its folder), else None.

    alpha is PEFT's default 8 (``pcm_lora.PEFT_DEFAULT_LORA_ALPHA``; not imported: this script needs no paddle)."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    args_file = os.path.join(folder, "training_args.json")
    if os.path.isfile(args_file):
        with open(args_file, encoding="utf-8") as f:
            return 8.0 / int(json.load(f)["lora_rank"])
    return None


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--to", required=True, choices=["diffusers", "paddle"])
    p.add_argument("input", help="LoRA .safetensors or .pdparams file (or a folder holding one .safetensors)")
    p.add_argument("output", help="output .safetensors file")
    p.add_argument("--lora_scale", type=float, default=None,
                   help="--to diffusers: the training scale alpha/rank to fold in (default: from training_args.json, else 0.25)")
    p.add_argument("--halved", action="store_true", help="--to paddle: the input is the reference convert.py's halved fp16 form")
    args = p.parse_args(argv)

    try:
        tensors, metadata = read(args.input)
    except UnsafeFileError as error:
        raise SystemExit(f"error: {error}") from None
    _check_lora(tensors, args.input)
    if args.to == "diffusers":
        if metadata.get("format") == "pt":
            raise SystemExit(f"error: {args.input} is already in PyTorch format")
        scale = args.lora_scale if args.lora_scale is not None else (lora_scale_of_run(args.input) or 0.25)
        out, meta = to_diffusers(tensors, scale), {"format": "pt", SCALE_KEY: repr(scale)}
    else:
        if metadata.get("format") not in (None, "pt"):
            raise SystemExit(f"error: {args.input} is not in PyTorch format (metadata format={metadata.get('format')})")
        scale = float(metadata.get(SCALE_KEY, 1.0))
        out, meta = to_paddle(tensors, scale, args.halved), {"format": "pd"}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_file(out, args.output, metadata=meta)
    print(json.dumps({"output": args.output, "to": args.to, "tensors": len(out), "folded_scale": scale if args.to == "diffusers" else None,
                      "unfolded_scale": scale if args.to == "paddle" else None, "halved": args.halved}))


if __name__ == "__main__":
    main()
