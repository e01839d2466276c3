"""SD3 prompt encoding for training (PCM_SPEC §3.1).

CLIP-L and CLIP-G (max length 77): penultimate hidden state and projected pooled
output; T5 (max length 77): last hidden state. The two CLIP sequences are joined on
the feature axis, zero-padded to the T5 width and joined with T5 on the sequence
axis (77 + 77 tokens); pooled = concat(pooled_L, pooled_G).

Unlike ``StableDiffusion3Pipeline.encode_prompt`` this never compares truncated and
untruncated token ids, which fails on Paddle 3 for captions over 77 tokens.
"""
from __future__ import annotations

import paddle

MAX_LENGTH = 77


def _token_ids(tokenizer, prompts: list) -> paddle.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pd").input_ids


class SD3PromptEncoder:
    """Callable: ``encode(prompts) -> (prompt_embeds [B, 154, D_t5], pooled [B, D_L + D_G])``."""

    def __init__(self, tokenizers, text_encoders):
        self.clip_tokenizers, self.t5_tokenizer = tokenizers[:2], tokenizers[2]
        self.clip_encoders, self.t5_encoder = text_encoders[:2], text_encoders[2]

    @paddle.no_grad()
    def __call__(self, prompts: list):
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
