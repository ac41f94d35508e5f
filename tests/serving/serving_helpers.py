"""Shared builders of the serving tests: the tiny media model and a mixed set of requests."""

import torch
from conftest import TINY_MEDIA_KWARGS, TINY_TEXT_KWARGS

from deepseekv3 import DeepseekV3MultimodalConfig, DeepseekV3MultimodalForConditionalGeneration

IMAGE_ID, AUDIO_ID = TINY_MEDIA_KWARGS["image_token_id"], TINY_MEDIA_KWARGS["audio_token_id"]
NUM_IMAGE_TOKENS = (TINY_MEDIA_KWARGS["image_size"] // TINY_MEDIA_KWARGS["patch_size"]) ** 2
STRIDE = TINY_MEDIA_KWARGS["audio_conv_stride"]


def tiny_media_model(seed: int = 0, **overrides) -> DeepseekV3MultimodalForConditionalGeneration:
    """Every feature on (gate, images with position values, audio), seeded, in eval mode."""
    torch.manual_seed(seed)
    config = DeepseekV3MultimodalConfig(
        **{**TINY_TEXT_KWARGS, **overrides},
        **TINY_MEDIA_KWARGS,
        use_attention_gate=True,
        use_image_position_values=True,
    )
    return DeepseekV3MultimodalForConditionalGeneration(config).eval()


def text_ids(generator: torch.Generator, length: int) -> list[int]:
    """BOS and `length` ordinary tokens (ids 0-4 are special)."""
    return [1] + torch.randint(5, TINY_TEXT_KWARGS["vocab_size"], (length,), generator=generator).tolist()


def mixed_requests(count: int, seed: int = 1) -> list[tuple[dict, int]]:
    """`count` (inputs, max_new_tokens) pairs cycling through text, image, audio and image+audio prompts of
    different lengths."""
    generator = torch.Generator().manual_seed(seed)
    requests = []
    for index in range(count):
        ids = text_ids(generator, int(torch.randint(1, 20, (1,), generator=generator)))
        inputs = {}
        kind = index % 4
        if kind in (1, 3):
            ids = ids[:1] + [IMAGE_ID] * NUM_IMAGE_TOKENS + ids[1:]
            inputs["pixel_values"] = torch.randn(1, 3, 16, 16, generator=generator)
        if kind in (2, 3):
            frames = 2 * int(torch.randint(2, 8, (1,), generator=generator))
            ids = ids + [AUDIO_ID] * (frames // STRIDE) + [7]
            inputs["input_features"] = torch.randn(1, 8, frames, generator=generator)
            inputs["input_features_mask"] = torch.ones(1, frames, dtype=torch.long)
        inputs["input_ids"] = torch.tensor([ids])
        requests.append((inputs, int(torch.randint(1, 24, (1,), generator=generator))))
    return requests


def generate_one(model, inputs: dict, max_new_tokens: int) -> list[int]:
    """`model.generate(do_sample=False)` on one request: the new tokens."""
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return output[0, inputs["input_ids"].shape[1] :].tolist()
