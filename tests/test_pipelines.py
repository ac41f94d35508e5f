"""transformers' `pipeline` on a saved checkpoint: `image-text-to-text` with an image, `any-to-any` with audio.

Each reply must equal greedy `generate` on the processor's own rendering of the same chat, and the media must reach
the model's media embedding (a forward hook counts what it sees).
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MEDIA_KWARGS, TINY_TEXT_KWARGS
from PIL import Image
from transformers import AutoModelForMultimodalLM, pipeline

from deepseekv3 import (
    DeepseekV3MultimodalConfig,
    DeepseekV3MultimodalForConditionalGeneration,
    DeepseekV3MultimodalProcessor,
)
from deepseekv3.tokenization import load_default_tokenizer

MAX_NEW_TOKENS = 4


def _save_checkpoint(directory: Path, **media_kwargs) -> Path:
    """A tiny model and its processor, saved as `save_pretrained` writes them for the Hub."""
    tokenizer = load_default_tokenizer()
    config = DeepseekV3MultimodalConfig(**{**TINY_TEXT_KWARGS, "vocab_size": len(tokenizer)}, **media_kwargs)
    torch.manual_seed(0)
    DeepseekV3MultimodalForConditionalGeneration(config).save_pretrained(directory)
    DeepseekV3MultimodalProcessor.from_config(config, tokenizer).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def media_checkpoint(tmp_path_factory) -> Path:
    """Images and audio."""
    return _save_checkpoint(tmp_path_factory.mktemp("pipelines") / "media", **TINY_MEDIA_KWARGS)


@pytest.fixture(scope="module")
def audio_checkpoint(tmp_path_factory) -> Path:
    """Audio alone: no image input."""
    audio_kwargs = {**TINY_MEDIA_KWARGS, "use_image_input": False}
    return _save_checkpoint(tmp_path_factory.mktemp("pipelines") / "audio", **audio_kwargs)


def _greedy_reply(model, processor, messages) -> str:
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    generated = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def _count_inputs(module: torch.nn.Module) -> list[int]:
    """The batch size of every call of `module`, appended as the calls happen."""
    batch_sizes = []
    module.register_forward_hook(lambda _module, args, _output: batch_sizes.append(args[0].shape[0]))
    return batch_sizes


def test_image_text_to_text_pipeline_answers_a_chat_about_an_image(media_checkpoint):
    pipe = pipeline("image-text-to-text", model=str(media_checkpoint))
    assert type(pipe.model) is DeepseekV3MultimodalForConditionalGeneration
    assert type(pipe.processor) is DeepseekV3MultimodalProcessor
    pixels = np.random.default_rng(0).integers(0, 256, (12, 20, 3), dtype=np.uint8)
    messages = [
        {
            "role": "user",
            "content": [{"type": "image", "image": Image.fromarray(pixels)}, {"type": "text", "text": "what colour?"}],
        }
    ]
    expected = _greedy_reply(pipe.model, pipe.processor, messages)

    images_seen = _count_inputs(pipe.model.model.image_patch_embedding)
    output = pipe(text=messages, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    assert output[0]["generated_text"] == expected
    # one image through the patch embedding, at the prefill only (the decoding steps read the cache)
    assert images_seen == [1]


def test_auto_model_for_multimodal_lm_loads_the_saved_model(audio_checkpoint):
    """The Auto class behind `pipeline("any-to-any")`."""
    model = AutoModelForMultimodalLM.from_pretrained(audio_checkpoint)
    assert type(model) is DeepseekV3MultimodalForConditionalGeneration


@pytest.mark.parametrize(
    ("switches", "expected"),
    [
        ({}, ["image", "audio", "text"]),
        ({"use_image_input": False}, ["audio", "text"]),
        ({"use_audio_input": False}, ["image", "text"]),
        ({"use_image_input": False, "use_audio_input": False}, ["text"]),
    ],
)
def test_input_modalities_follow_the_config(switches, expected):
    """What pipelines and `generate` read to decide which inputs (and backends such as torchvision) a model needs."""
    config = DeepseekV3MultimodalConfig(**TINY_TEXT_KWARGS, **{**TINY_MEDIA_KWARGS, **switches})
    assert DeepseekV3MultimodalForConditionalGeneration(config).input_modalities == expected


def test_any_to_any_pipeline_answers_a_chat_about_a_clip(audio_checkpoint):
    pipe = pipeline("any-to-any", model=str(audio_checkpoint))
    assert type(pipe.model) is DeepseekV3MultimodalForConditionalGeneration
    clip = (0.1 * np.random.default_rng(0).standard_normal(4000)).astype(np.float32)
    messages = [
        {"role": "user", "content": [{"type": "audio", "audio": clip}, {"type": "text", "text": "how many tones?"}]}
    ]
    expected = _greedy_reply(pipe.model, pipe.processor, messages)

    clips_seen = _count_inputs(pipe.model.model.audio_frame_embedding)
    output = pipe(text=messages, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
    assert output[0]["generated_text"] == expected
    assert clips_seen == [1]
