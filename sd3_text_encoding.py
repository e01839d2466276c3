"""SD3 prompt encoding for training (PCM_SPEC §3.1).

CLIP-L and CLIP-G (max length 77): penultimate hidden state and projected pooled
output; T5 (max length 77): last hidden state. The two CLIP sequences are joined on
the feature axis, zero-padded to the T5 width and joined with T5 on the sequence
axis (77 + 77 tokens); pooled = concat(pooled_L, pooled_G).

Unlike ``StableDiffusion3Pipeline.encode_prompt`` this never compares truncated and
untruncated token ids, which fails on Paddle 3 for captions over 77 tokens.

With ``cache_size > 0`` the embeddings of the most recently seen captions are kept in host
memory (least recently used out first), so datasets whose captions repeat every epoch skip
the text encoders for them (`--text_embedding_cache_size`). With ``offload=True`` the encoders
live in host memory and visit the accelerator only to encode (`--offload_text_encoders`: about
10 GiB of GPU memory for SD3-medium's fp16 encoders, paid for with host-device copies on every
cache miss).
"""
from __future__ import annotations

from collections import OrderedDict

import paddle

MAX_LENGTH = 77


def _token_ids(tokenizer, prompts: list) -> paddle.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pd").input_ids


def load_tokenizers_and_text_encoders(path: str) -> tuple:
    """SD3's three tokenizers and text encoders (CLIP-L, CLIP-G, T5) from a diffusers-layout folder or hub id."""
    from ppdiffusers.transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

    tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer"),
                  CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2"),
                  T5Tokenizer.from_pretrained(path, subfolder="tokenizer_3")]
    text_encoders = [CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder"),
                     CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2"),
                     T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3")]
    return tokenizers, text_encoders


class SD3PromptEncoder:
    """Callable: ``encode(prompts) -> (prompt_embeds [B, 154, D_t5], pooled [B, D_L + D_G])``."""

    def __init__(self, tokenizers, text_encoders, cache_size: int = 0, offload: bool = False):
        self.clip_tokenizers, self.t5_tokenizer = tokenizers[:2], tokenizers[2]
        self.clip_encoders, self.t5_encoder = text_encoders[:2], text_encoders[2]
        self.cache_size = cache_size
        self.offload = offload and not paddle.get_device().startswith("cpu")
        if self.offload:
            self._move_encoders("cpu")
        self._cache: OrderedDict = OrderedDict()
        self.hits = self.misses = 0

    def _move_encoders(self, device: str) -> None:
        for encoder in (*self.clip_encoders, self.t5_encoder):
            encoder.to(device=device)

    @paddle.no_grad()
    def encode(self, prompts: list):
        """The embeddings of ``prompts``, computed by the three encoders (no cache)."""
        if not self.offload:
            return self._encode(prompts)
        self._move_encoders(paddle.get_device())
        try:
            return self._encode(prompts)
        finally:
            self._move_encoders("cpu")

    def _encode(self, prompts: list):
        clip_embeds, pooled = [], []
        for tokenizer, encoder in zip(self.clip_tokenizers, self.clip_encoders):
            out = encoder(_token_ids(tokenizer, prompts), output_hidden_states=True)
            pooled.append(out[0])
            clip_embeds.append(out.hidden_states[-2])
        clip = paddle.concat(clip_embeds, axis=-1)
        t5 = self.t5_encoder(_token_ids(self.t5_tokenizer, prompts))[0]
        pad = t5.shape[-1] - clip.shape[-1]
        if pad < 0:
            raise ValueError(f"T5 width {t5.shape[-1]} is smaller than the joined CLIP width {clip.shape[-1]}")
        clip = paddle.concat([clip, paddle.zeros(clip.shape[:-1] + [pad], dtype=clip.dtype)], axis=-1)
        prompt_embeds = paddle.concat([clip.astype(t5.dtype), t5], axis=-2)
        return prompt_embeds, paddle.concat(pooled, axis=-1)

    def __call__(self, prompts: list):
        if self.cache_size <= 0:
            return self.encode(prompts)
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        self.misses += len(missing)
        self.hits += len(prompts) - len(missing)
        if missing:
            embeds, pooled = self.encode(missing)
            for i, prompt in enumerate(missing):
                self._cache[prompt] = (embeds[i].cpu(), pooled[i].cpu())
        for prompt in prompts:
            self._cache.move_to_end(prompt)
        entries = [self._cache[p] for p in prompts]
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        device = paddle.get_device()
        embeds = paddle.stack([e for e, _ in entries]).to(device)
        pooled = paddle.stack([p for _, p in entries]).to(device)
        return embeds, pooled
