"""SD3 prompt encoding for training: the pipeline's own embeddings, any batch size, and the caption cache."""
import numpy as np
import paddle
import pytest

import train_pcm_lora_sd3_adv as trainer
from sd3_text_encoding import SD3PromptEncoder


@pytest.fixture(scope="module")
def encoders(tiny_sd3, tmp_path_factory):
    args = trainer.parse_args(["--pretrained_teacher_model", tiny_sd3, "--data_path", str(tmp_path_factory.mktemp("d"))])
    tokenizers, text_encoders, *_ = trainer.load_models(args, "float32", lambda *a: None)
    return tokenizers, text_encoders


def test_matches_the_sd3_pipeline_encode_prompt(tiny_sd3, encoders):
    from ppdiffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
    prompts = ["a photo of a red dog", "a blue car in the city"]
    with paddle.no_grad():
        want, _, want_pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
    got, pooled = SD3PromptEncoder(*encoders)(prompts)
    assert got.shape == [2, 154, 64] and pooled.shape == [2, 64]
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)
    np.testing.assert_allclose(pooled.numpy(), want_pooled.numpy(), atol=1e-5)


def test_empty_prompt_broadcasts_to_any_batch(encoders):
    encode = SD3PromptEncoder(*encoders)
    uncond, uncond_pooled = encode([""])
    for batch in (1, 3):
        many, many_pooled = encode([""] * batch)
        np.testing.assert_allclose(uncond.expand(many.shape).numpy(), many.numpy(), atol=1e-5)
        np.testing.assert_allclose(uncond_pooled.expand(many_pooled.shape).numpy(), many_pooled.numpy(), atol=1e-5)


def test_caption_cache_hits_evicts_and_returns_the_same_embeddings(encoders):
    plain, cached = SD3PromptEncoder(*encoders), SD3PromptEncoder(*encoders, cache_size=3)
    batches = [["a red dog", "a blue car"], ["a blue car", "a green tree"], ["a red dog", "a red dog"], ["a cat", "a blue car"]]
    counts = []
    for batch in batches:
        (want, want_pooled), (got, got_pooled) = plain(batch), cached(batch)
        # a caption's embedding may differ in the last bits with its batch neighbours (GEMM blocking)
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-5)
        np.testing.assert_allclose(got_pooled.numpy(), want_pooled.numpy(), atol=1e-5)
        counts.append((cached.hits, cached.misses, len(cached._cache)))
    # dog, car miss; car hits, tree misses (order dog, car, tree); dog hits twice (car, tree, dog);
    # cat misses and car hits, then the least recently used (tree) is evicted
    assert counts == [(0, 2, 2), (1, 3, 3), (3, 3, 3), (4, 4, 3)]
    assert list(cached._cache) == ["a red dog", "a cat", "a blue car"]  # most recent last, in batch order


def test_offload_flag_trains_and_is_a_no_op_on_cpu(tiny_sd3, tmp_path):
    from make_tiny_cc3m import make_tiny_cc3m

    make_tiny_cc3m(str(tmp_path / "data"), num_shards=1, samples_per_shard=4, seed=2)
    lora = []
    for extra in ([], ["--offload_text_encoders", "--text_embedding_cache_size", "8"]):
        out = tmp_path / f"run{len(lora)}"
        assert trainer.main(["--pretrained_teacher_model", tiny_sd3, "--data_path", str(tmp_path / "data"),
                             "--output_dir", str(out), "--resolution", "64", "--train_batch_size", "2",
                             "--max_train_steps", "4", "--report_to", "none", "--num_validation_images", "0", *extra]) == 0
        from safetensors.numpy import load_file

        lora.append(load_file(str(out / "paddle_lora_weights.safetensors")))
    for key in lora[0]:
        np.testing.assert_allclose(lora[0][key], lora[1][key], atol=1e-5)


def test_tiny_t5_tokenizer_is_unigram_and_paddle_ids_equal_sentencepiece(tiny_sd3):
    """SD3's real T5 tokenizer is a sentencepiece unigram model; Hugging Face's T5 tokenizers assume that type. The tiny
    one is unigram too, and Paddle's T5Tokenizer gives sentencepiece's own ids plus </s>, so ids agree across frameworks."""
    import os

    import sentencepiece as spm
    from ppdiffusers.transformers import T5Tokenizer
    from sentencepiece import sentencepiece_model_pb2

    model_file = os.path.join(tiny_sd3, "tokenizer_3", "spiece.model")
    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    assert proto.trainer_spec.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM
    processor = spm.SentencePieceProcessor(model_file=model_file)
    paddle_tokenizer = T5Tokenizer.from_pretrained(tiny_sd3, subfolder="tokenizer_3")
    for text in ("a photo of a red dog", "a blue car in the city at golden hour", "unseen zebra words"):
        assert paddle_tokenizer(text)["input_ids"] == processor.encode(text) + [processor.eos_id()]
