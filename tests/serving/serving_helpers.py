"""Shared builders of the serving tests: the tiny media model, a mixed set of requests, fault injection, and waits
that fail a test instead of hanging it."""

import threading
import time

import openai
import torch
from conftest import TINY_MEDIA_KWARGS, TINY_TEXT_KWARGS

from deepseekv3 import (
    DeepseekV3MultimodalConfig,
    DeepseekV3MultimodalForConditionalGeneration,
    DeepseekV3MultimodalProcessor,
)
from deepseekv3.serving import LengthPredictor, LengthPredictorConfig, LengthRecord
from deepseekv3.serving.latent_batch import LatentBatch
from deepseekv3.tokenization import load_default_tokenizer

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


def served_processor_and_model(seed: int = 0, **media_overrides) -> tuple:
    """The model the server tests serve, with its processor: the tiny configuration with the default tokenizer's
    vocabulary, media (`media_overrides` over `TINY_MEDIA_KWARGS`) and the attention gate on, seeded, in eval mode."""
    tokenizer = load_default_tokenizer()
    config = DeepseekV3MultimodalConfig(
        **{**TINY_TEXT_KWARGS, "vocab_size": len(tokenizer)},
        **{**TINY_MEDIA_KWARGS, **media_overrides},
        use_attention_gate=True,
    )
    torch.manual_seed(seed)
    model = DeepseekV3MultimodalForConditionalGeneration(config).eval()
    return DeepseekV3MultimodalProcessor.from_config(config, tokenizer), model


# ---- OpenAI-client requests to a served model named `MODEL_NAME` ----

MODEL_NAME = "tiny"
MESSAGES = [{"role": "user", "content": "What is red?"}]


def ask(client: openai.OpenAI, messages=MESSAGES, stream: bool = False) -> str:
    """The answer's text (the streamed deltas joined)."""
    if not stream:
        response = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8)
        return response.choices[0].message.content
    chunks = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=8, stream=True)
    return "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def error_of(call) -> openai.APIError | None:
    """The `openai.APIError` that `call()` raises, or None."""
    try:
        call()
    except openai.APIError as error:
        return error
    return None


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


FAULT_STAGES = ["length prediction", "admission", "prefill", "decode", "cache compaction"]


def raise_injected_fault(*args, **kwargs):
    raise RuntimeError("injected fault")


def failing_forward(model, is_target):
    """`model.forward`, raising `RuntimeError` on the calls whose `input_ids` `is_target` picks."""
    forward = model.forward

    def forward_or_fail(*args, **kwargs):
        if is_target(kwargs["input_ids"]):
            raise RuntimeError("injected fault")
        return forward(*args, **kwargs)

    return forward_or_fail


def inject_fault(stage: str, engine, patch) -> None:
    """Makes every step of `engine` fail at `stage` (one of `FAULT_STAGES`) until `patch` (a pytest monkeypatch) is
    undone."""
    if stage == "length prediction":  # a real fault: engine state saved from a model with another vocabulary
        predictor = LengthPredictor(LengthPredictorConfig(vocab_size=8))
        predictor.fit([LengthRecord(2, 3, 8, (1, 5))], epochs=1)
        patch.setattr(engine, "length_predictor", predictor)
    elif stage == "admission":
        patch.setattr(engine, "_choose_admissions", raise_injected_fault)
    elif stage == "prefill":
        # at the engine's prefill forward, not "every forward of more than one token": a prompt found in the prefix
        # cache but for its last token is prefilled in a one-token forward
        patch.setattr(engine, "_prefill_forward", raise_injected_fault)
    elif stage == "decode":
        patch.setattr(LatentBatch, "decode", raise_injected_fault)
    else:
        patch.setattr(LatentBatch, "keep", raise_injected_fault)


def run_in_thread(function, timeout: float = 60.0):
    """`function()` in another thread; fails the test when it has not returned within `timeout` seconds (a hang)."""
    outcome = {}

    def target():
        try:
            outcome["value"] = function()
        except BaseException as error:
            outcome["error"] = error

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"{function} still blocked after {timeout} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def wait_until(predicate, timeout: float = 60.0) -> None:
    """Polls `predicate` until it holds; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{predicate} did not hold within {timeout} s"
        time.sleep(0.01)
