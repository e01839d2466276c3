#!/usr/bin/env python
"""Write a random, tiny SD3 teacher in the folder layout of
``stabilityai/stable-diffusion-3-medium-diffusers``.

It is the real model's structure in miniature: 16 latent channels, a VAE that
downsamples by 8, a patch-2 MM-DiT transformer, CLIP-L and CLIP-G text encoders
with projections (pooled width = sum of both), a T5 encoder, their tokenizers,
and a FlowMatchEulerDiscreteScheduler with shift 3.0. Deterministic for a seed,
a few MB, built in seconds; the project's embedded default teacher.

    python scripts/make_tiny_sd3.py --output_dir tiny-sd3 [--seed 0] [--num_layers 2] [--variant sd3]

``--variant sd3.5-medium`` / ``sd3.5-large`` write the SD3.5 transformer instead, with the config keys of
``stabilityai/stable-diffusion-3.5-medium`` / ``-large`` (``qk_norm: "rms_norm"``; medium's MMDiT-X
``dual_attention_layers`` are its first ``num_layers // 2 + 1`` blocks, 0-12 of 24, never the last one here;
``pos_embed_max_size`` half the published value, as for sd3: 96, 192 for medium, 96 for large).

Loadable with ``StableDiffusion3Pipeline.from_pretrained(DIR)`` and
``SD3Transformer2DModel.from_pretrained(DIR, subfolder="transformer")``.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import paddle_compat  # noqa: E402,F401  (must precede ppdiffusers)
import paddle  # noqa: E402

from validation import SEED_PROMPT  # noqa: E402

# Words the tokenizers know as whole tokens: simple caption words and the seed's portrait prompt,
# so that prompts stay within CLIP's and T5's 77 tokens (ppdiffusers' SD3 pipeline fails on longer ones).
TINY_WORDS = sorted(set(
    "a photo of the red green blue yellow white black small large round square circle triangle dog cat "
    "car tree house sky sea mountain person girl boy portrait on in with and at golden hour light dark "
    "street city field flower bird picture image".split()
    + SEED_PROMPT.lower().replace(",", " ").split()
))


def _bytes_to_unicode() -> dict:
    """GPT-2/CLIP byte-to-unicode table (a printable character for each of the 256 bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer(folder: str) -> int:
    """A byte-level BPE vocabulary: every byte alone and word-final, plus merge chains that make each
    tiny word one token (c a t</w> -> ca t</w> -> cat</w>). Returns the vocabulary size."""
    os.makedirs(folder, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    merges = []
    for word in TINY_WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
            symbols = ["".join(pair)] + symbols[2:]
            vocab.setdefault(symbols[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    from ppdiffusers.transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer(
        os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), pad_token="<|endoftext|>"
    )
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(folder)
    return len(vocab)


def write_t5_tokenizer(folder: str, vocab_size: int = 256) -> int:
    """A sentencepiece unigram model (the type of SD3's real T5 tokenizer, so Hugging Face's T5 tokenizers segment it alike)
    trained (single thread, so deterministic) on the tiny words."""
    import sentencepiece as spm
    from ppdiffusers.transformers import T5Tokenizer

    os.makedirs(folder, exist_ok=True)
    sentences = [" ".join(TINY_WORDS[i:] + TINY_WORDS[:i]) for i in range(len(TINY_WORDS))]
    model = io.BytesIO()  # trained from memory so that no temporary path ends up in the model
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, num_threads=1, hard_vocab_limit=False,
        character_coverage=1.0, minloglevel=2,
    )
    model_file = os.path.join(folder, "spiece.model")
    with open(model_file, "wb") as f:
        f.write(model.getvalue())
    tokenizer = T5Tokenizer(model_file, extra_ids=0)
    tokenizer.model_max_length = 77
    tokenizer.save_pretrained(folder)
    return len(tokenizer)


def make_tiny_sd3(
    output_dir: str,
    seed: int = 0,
    num_layers: int = 2,
    num_attention_heads: int = 4,
    attention_head_dim: int = 8,
    text_width: int = 32,
    sample_size: int = 32,
    variant: str = "sd3",
    vae_channels: int = 8,
) -> str:
    """Build and save the tiny teacher; returns ``output_dir``.

    The transformer width (heads x head dim) must be a multiple of 32, since the
    discriminator heads use GroupNorm(32) on it.
    """
    width = num_attention_heads * attention_head_dim
    if width % 32:
        raise ValueError(f"num_attention_heads x attention_head_dim = {width} must be a multiple of 32 (GroupNorm(32) heads)")
    os.makedirs(output_dir, exist_ok=True)
    # Tokenizers copy their resource files on save, so the temporary folder lives until the end.
    with tempfile.TemporaryDirectory() as tmp:
        pipe = _build_pipeline(tmp, seed, num_layers, num_attention_heads, attention_head_dim, text_width, sample_size,
                               variant, vae_channels)
        pipe.save_pretrained(output_dir)
    if variant != "sd3":  # the published model_index.json names the SD3 class for SD3.5 too
        _set_json(os.path.join(output_dir, "model_index.json"), "transformer", ["ppdiffusers", "SD3Transformer2DModel"])
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):  # drop the temporary path paddlenlp records
        config_file = os.path.join(output_dir, name, "tokenizer_config.json")
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        config.pop("special_tokens_map_file", None)
        with open(config_file, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    return output_dir


def _set_json(path: str, key: str, value) -> None:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    data[key] = value
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


VARIANTS = ("sd3", "sd3.5-medium", "sd3.5-large")


def transformer_variant_config(variant: str, num_layers: int) -> dict:
    """The config keys by which the SD3.5 transformers differ from SD3 (tiny-sized ``pos_embed_max_size``)."""
    if variant == "sd3":
        return {"pos_embed_max_size": 96}
    if variant == "sd3.5-medium":
        return {"pos_embed_max_size": 192, "qk_norm": "rms_norm",
                "dual_attention_layers": list(range(min(num_layers // 2 + 1, num_layers - 1)))}
    if variant == "sd3.5-large":
        return {"pos_embed_max_size": 96, "qk_norm": "rms_norm"}
    raise ValueError(f"--variant {variant!r}: choose one of {', '.join(VARIANTS)}")


def _build_pipeline(tmp, seed, num_layers, num_attention_heads, attention_head_dim, text_width, sample_size, variant,
                    vae_channels):
    from ppdiffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from ppdiffusers.transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config
    from ppdiffusers.transformers import T5EncoderModel, T5Tokenizer
    from sd35_transformer import SD35Transformer2DModel

    width = num_attention_heads * attention_head_dim
    clip_vocab = write_clip_tokenizer(os.path.join(tmp, "tokenizer"))
    write_clip_tokenizer(os.path.join(tmp, "tokenizer_2"))
    t5_vocab = write_t5_tokenizer(os.path.join(tmp, "tokenizer_3"))
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(tmp, "tokenizer"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(os.path.join(tmp, "tokenizer_2"))
    tokenizer_3 = T5Tokenizer.from_pretrained(os.path.join(tmp, "tokenizer_3"))

    def clip(hidden: int, component_seed: int):
        paddle.seed(component_seed)
        config = CLIPTextConfig(
            vocab_size=clip_vocab, hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=hidden,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
            bos_token_id=clip_vocab - 2, eos_token_id=clip_vocab - 1, pad_token_id=clip_vocab - 1,
        )
        return CLIPTextModelWithProjection(config)

    # CLIP-L and CLIP-G (pooled width 2 * text_width), T5 at least as wide as both CLIP sequences.
    text_encoder = clip(text_width, seed + 1)
    text_encoder_2 = clip(text_width, seed + 2)
    t5_width = 2 * text_width
    paddle.seed(seed + 3)
    text_encoder_3 = T5EncoderModel(
        T5Config(vocab_size=t5_vocab, d_model=t5_width, d_kv=8, d_ff=2 * t5_width, num_layers=2,
                 num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                 pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    )
    paddle.seed(seed + 4)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(vae_channels,) * 4, layers_per_block=1, latent_channels=16, norm_num_groups=4,
        sample_size=8 * sample_size, scaling_factor=1.5305, shift_factor=0.0609,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    paddle.seed(seed + 5)
    variant_config = transformer_variant_config(variant, num_layers)
    transformer_cls = SD35Transformer2DModel if variant != "sd3" else SD3Transformer2DModel
    transformer = transformer_cls(
        sample_size=sample_size, patch_size=2, in_channels=16, num_layers=num_layers,
        attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
        joint_attention_dim=t5_width, caption_projection_dim=width, pooled_projection_dim=2 * text_width,
        out_channels=16, **variant_config,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="folder to write the teacher into")
    parser.add_argument("--seed", type=int, default=0, help="weights are a function of this seed")
    parser.add_argument("--num_layers", type=int, default=2, help="transformer blocks")
    parser.add_argument("--num_attention_heads", type=int, default=4)
    parser.add_argument("--attention_head_dim", type=int, default=8, help="heads x head dim must be a multiple of 32")
    parser.add_argument("--text_width", type=int, default=32, help="CLIP hidden width (T5 is twice as wide)")
    parser.add_argument("--sample_size", type=int, default=32, help="default latent size (pixels / 8)")
    parser.add_argument("--variant", choices=VARIANTS, default="sd3", help="transformer family (SD3.5: qk-norm, MMDiT-X)")
    parser.add_argument("--vae_channels", type=int, default=8, help="VAE block width (a multiple of 4)")
    args = parser.parse_args(argv)
    make_tiny_sd3(**vars(args))
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(args.output_dir) for f in fs)
    print(json.dumps({"output_dir": args.output_dir, "bytes": size, "seed": args.seed, "num_layers": args.num_layers}))


if __name__ == "__main__":
    main()
