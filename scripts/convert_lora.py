#!/usr/bin/env python
"""Convert PCM SD3 LoRA files between this project's Paddle format and the diffusers (PyTorch) format.

    python scripts/convert_lora.py --to diffusers outputs/run/paddle_lora_weights.safetensors pytorch_lora_weights.safetensors
    python scripts/convert_lora.py --to paddle pcm_deterministic_4step_shift3.safetensors paddle_lora_weights.safetensors

numpy and safetensors only (no torch, no paddle). Keys are ``transformer.<module>.lora_A/B.weight`` in
both formats; Linear weights are transposed (Paddle ``[in, out]`` <-> PyTorch ``[out, in]``), Conv2d
weights are the same in both.

The LoRA scale. A Paddle file is used with ``joint_attention_kwargs={"scale": s}``; ppdiffusers' loader
applies nothing else. For the trainer's output s = alpha/rank with PEFT's default alpha 8 and the rank
read from the weights (``lora_A`` is ``[in, r]``), 0.25 for rank 32; a file this script wrote records s in
its metadata. Diffusers applies alpha/rank from the file's ``lora_adapter_metadata`` when it has one, else
1.0 (alpha = rank), times the user's scale (default 1.0).
``--to diffusers`` folds s into ``lora_B``, so diffusers' default scale gives the trained student.
``--to paddle`` keeps the weights (unfolding a scale this script folded in, bit-exact for power-of-two
ranks) and records the s that reproduces diffusers at its default scale: alpha/rank from
``lora_adapter_metadata``, else 1.0. The published PCM SD3 LoRAs are the reference ``convert.py``'s output
(every tensor halved and cast to fp16, so their product is 1/4 of the trained one) and are used at 1.0 in
diffusers: converted as they are, s = 1.0; with ``--halved`` the tensors are doubled back and s = 0.25,
the seed snippet's value. Any metadata that contradicts the weights' rank stops with a one-line error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from safe_pdparams import UnsafeFileError, is_safetensors, load_pdparams  # noqa: E402  (numpy only)

SCALE_KEY = "pcm_lora_scale"  # Paddle files: the scale to use; diffusers files: the scale folded into lora_B
RANK_KEY = "pcm_lora_rank"
DIFFUSERS_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' PEFT config, keys "transformer.r", ...
PEFT_DEFAULT_LORA_ALPHA = 8  # = pcm_lora.PEFT_DEFAULT_LORA_ALPHA (not imported: this script needs no paddle)
HALVED_PRODUCT_FACTOR = 0.25  # the reference convert.py halves lora_A and lora_B


def read(path: str, source: str = "input"):
    """Tensors (as numpy) and metadata of a LoRA .safetensors file (or a folder holding exactly one), or of a
    Paddle .pdparams state dict (read by the allow-list loader; Paddle layout, metadata format "pd")."""
    if not os.path.exists(path):
        raise SystemExit(f"error: {source} {path} does not exist (give a LoRA .safetensors or .pdparams file, or a folder holding one .safetensors)")
    if os.path.isdir(path):
        files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
        if len(files) != 1:
            raise SystemExit(f"error: {source} {path} holds {len(files)} .safetensors files; name the file")
        path = os.path.join(path, files[0])
    if not is_safetensors(path):
        try:
            return load_pdparams(path), {"format": "pd"}
        except UnsafeFileError as error:
            raise SystemExit(f"error: {error}") from None
    try:
        with safe_open(path, framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except SafetensorError as error:
        raise SystemExit(f"error: {source} {path} is not a readable .safetensors file ({error})") from None


def layout_of(metadata: dict) -> str:
    """'pytorch' for files diffusers (or ``--to diffusers``) wrote, 'paddle' otherwise (ppdiffusers' rule)."""
    return "pytorch" if metadata.get("format") == "pt" else "paddle"


def _check_lora(tensors: dict, path: str) -> None:
    bad = [k for k in tensors if not (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight"))]
    if bad or not tensors:
        raise SystemExit(f"error: {path} is not a LoRA file (unexpected keys such as {bad[:3]})")


def lora_ranks(tensors: dict, layout: str, path: str) -> set:
    """The adapters' ranks, read from the weights: ``lora_A`` is ``[in, r]`` (Paddle Linear), ``[r, in]``
    (PyTorch Linear) or ``[r, in, kh, kw]`` (Conv2d in both); every ``lora_B`` must agree."""

    def rank(name: str, weight: np.ndarray) -> int:
        is_a = ".lora_A." in name
        if weight.ndim == 2 and layout == "paddle":  # A [in, r], B [r, out]
            return int(weight.shape[1] if is_a else weight.shape[0])
        return int(weight.shape[0] if is_a else weight.shape[1])  # A [r, in(, kh, kw)], B [out, r(, 1, 1)]

    ranks = {name.split(".lora_")[0]: rank(name, w) for name, w in tensors.items() if ".lora_A." in name}
    for name, weight in tensors.items():
        if ".lora_B." in name and ranks.get(name.split(".lora_")[0]) != rank(name, weight):
            raise SystemExit(f"error: {path}: {name} {list(weight.shape)} does not fit its lora_A in {layout} layout "
                             f"(metadata format={'pt' if layout == 'pytorch' else 'pd or none'}; is the file in the other format?)")
    return set(ranks.values())


def _single_rank(ranks: set, path: str) -> int:
    if len(ranks) != 1:
        raise SystemExit(f"error: {path} has adapters of ranks {sorted(ranks)}, so no single scale fits; pass --lora_scale")
    return next(iter(ranks))


def _check_recorded_rank(metadata: dict, rank: int, path: str) -> None:
    if RANK_KEY in metadata and int(metadata[RANK_KEY]) != rank:
        raise SystemExit(f"error: {path}: its metadata says rank {metadata[RANK_KEY]} but the weights have rank {rank}; pass --lora_scale")


def _run_rank(path: str):
    """``--lora_rank`` from the training run's training_args.json beside the file (or in its folder), else None."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    args_file = os.path.join(folder, "training_args.json")
    if not os.path.isfile(args_file):
        return None, args_file
    with open(args_file, encoding="utf-8") as f:
        return int(json.load(f)["lora_rank"]), args_file


def paddle_file_scale(path: str, tensors: dict, metadata: dict) -> tuple:
    """(s, where it came from) for a Paddle-layout file: the scale this script recorded, else alpha/rank
    with the trainer's alpha 8 and the weights' rank. training_args.json and recorded ranks must agree."""
    rank = _single_rank(lora_ranks(tensors, "paddle", path), path)
    _check_recorded_rank(metadata, rank, path)
    run_rank, args_file = _run_rank(path)
    if run_rank is not None and run_rank != rank:
        raise SystemExit(f"error: {args_file} says --lora_rank {run_rank} but {path} has rank-{rank} weights "
                         "(not this file's run?); pass --lora_scale")
    if SCALE_KEY in metadata:
        return float(metadata[SCALE_KEY]), f"file metadata {SCALE_KEY}"
    return PEFT_DEFAULT_LORA_ALPHA / rank, f"rank {rank} in the weights, alpha {PEFT_DEFAULT_LORA_ALPHA}"


def diffusers_default_scale(path: str, tensors: dict, metadata: dict) -> tuple:
    """(multiplier diffusers applies at its default scale 1.0, where it came from) for a PyTorch-layout file."""
    ranks = lora_ranks(tensors, "pytorch", path)
    if DIFFUSERS_ADAPTER_METADATA_KEY not in metadata:
        if SCALE_KEY in metadata:
            _check_recorded_rank(metadata, _single_rank(ranks, path), path)
        return 1.0, "no alpha metadata: diffusers' alpha = rank"
    try:
        config = json.loads(metadata[DIFFUSERS_ADAPTER_METADATA_KEY])
        r, alpha = int(config["transformer.r"]), float(config["transformer.lora_alpha"])
    except (ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"error: {path}: unreadable {DIFFUSERS_ADAPTER_METADATA_KEY} ({error!r})") from None
    if config.get("transformer.rank_pattern") or config.get("transformer.alpha_pattern"):
        raise SystemExit(f"error: {path}: per-module rank/alpha patterns in {DIFFUSERS_ADAPTER_METADATA_KEY} are not supported; pass --lora_scale")
    if ranks != {r}:
        raise SystemExit(f"error: {path}: {DIFFUSERS_ADAPTER_METADATA_KEY} says r={r} but the weights have rank {sorted(ranks)}")
    return alpha / r, f"{DIFFUSERS_ADAPTER_METADATA_KEY}: lora_alpha {alpha:g} / r {r}"


def lora_file_scale(path: str) -> float:
    """The ``joint_attention_kwargs`` scale for a Paddle-format LoRA file (see ``paddle_file_scale``).
    ppdiffusers 0.29 fails on diffusers-format SD3 LoRAs (matmul shape error), so those are refused."""
    tensors, metadata = read(path, source="--lora")
    _check_lora(tensors, path)
    if layout_of(metadata) == "pytorch":
        raise SystemExit(f"error: --lora {path} is in diffusers (PyTorch) format, which ppdiffusers 0.29 cannot load "
                         "for SD3; convert it first: python scripts/convert_lora.py --to paddle IN OUT")
    return paddle_file_scale(path, tensors, metadata)[0]


def _swap_layout(weight: np.ndarray) -> np.ndarray:
    return weight.T.copy() if weight.ndim == 2 else weight


def _with_prefix(name: str) -> str:
    return name if name.startswith("transformer.") else f"transformer.{name}"


def _scaled_b(name: str, weight: np.ndarray, factor: float) -> np.ndarray:
    if ".lora_B." not in name or factor == 1.0:
        return weight
    return (weight * np.asarray(factor, dtype=weight.dtype)).astype(weight.dtype)


def to_diffusers(tensors: dict, scale: float) -> dict:
    return {_with_prefix(name): _scaled_b(name, _swap_layout(weight), scale) for name, weight in tensors.items()}


def to_paddle(tensors: dict, folded_scale: float, halved: bool) -> dict:
    out = {}
    for name, weight in tensors.items():
        if halved:
            weight = weight.astype(np.float32) * np.float32(2.0)
        if ".lora_B." in name and folded_scale != 1.0:
            weight = (weight / np.asarray(folded_scale, dtype=weight.dtype)).astype(weight.dtype)
        out[_with_prefix(name)] = _swap_layout(weight)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--to", required=True, choices=["diffusers", "paddle"])
    p.add_argument("input", help="LoRA .safetensors or .pdparams file (or a folder holding one .safetensors)")
    p.add_argument("output", help="output .safetensors file")
    p.add_argument("--lora_scale", type=float, default=None,
                   help="--to diffusers: the scale s the Paddle file is used with, folded into lora_B (default: recorded "
                        "in the file, else 8 / the weights' rank); --to paddle: the scale the input needs in diffusers "
                        "(default: lora_alpha/r of its lora_adapter_metadata, else 1.0; 0.25 for the reference "
                        "trainer's own un-halved rank-32 output)")
    p.add_argument("--halved", action="store_true",
                   help="--to paddle: the input is the reference convert.py's halved fp16 form (the published PCM SD3 "
                        "LoRAs): double the tensors, record scale 0.25 x the diffusers scale")
    args = p.parse_args(argv)

    try:
        tensors, metadata = read(args.input)
    except UnsafeFileError as error:
        raise SystemExit(f"error: {error}") from None
    _check_lora(tensors, args.input)
    if args.to == "diffusers":
        if layout_of(metadata) == "pytorch":
            raise SystemExit(f"error: {args.input} is already in PyTorch format")
        scale, source = (args.lora_scale, "--lora_scale") if args.lora_scale is not None else paddle_file_scale(args.input, tensors, metadata)
        out, folded = to_diffusers(tensors, scale), scale
        meta = {"format": "pt", SCALE_KEY: repr(scale)}
    else:
        if metadata.get("format") not in (None, "pt"):
            raise SystemExit(f"error: {args.input} is not in PyTorch format (metadata format={metadata.get('format')})")
        if args.lora_scale is not None:
            diffusers_scale, source = args.lora_scale, "--lora_scale"
        else:
            diffusers_scale, source = diffusers_default_scale(args.input, tensors, metadata)
        folded = float(metadata.get(SCALE_KEY, 1.0))
        scale = diffusers_scale * folded * (HALVED_PRODUCT_FACTOR if args.halved else 1.0)
        out = to_paddle(tensors, folded, args.halved)
        meta = {"format": "pd", SCALE_KEY: repr(scale)}
    ranks = lora_ranks(out, layout_of(meta), args.output)
    if len(ranks) == 1:
        meta[RANK_KEY] = str(next(iter(ranks)))
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_file(out, args.output, metadata=meta)
    print(json.dumps({"output": args.output, "to": args.to, "tensors": len(out), "rank": sorted(ranks),
                      "folded_scale": folded if args.to == "diffusers" else None,
                      "unfolded_scale": folded if args.to == "paddle" else None,
                      "lora_scale": scale if args.to == "paddle" else 1.0, "scale_from": source, "halved": args.halved}))


if __name__ == "__main__":
    main()
