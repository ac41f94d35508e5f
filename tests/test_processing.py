"""Tests of DeepseekV3MultimodalProcessor: placeholder expansion, media checks, padding, truncation, chat, loading."""

import inspect
import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import TINY_MEDIA_KWARGS, TINY_TEXT_KWARGS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import AutoProcessor

import deepseekv3  # noqa: F401  (registers the Auto classes)
from deepseekv3.configuration_deepseekv3 import (
    AUDIO_MODALITY_ID,
    IMAGE_MODALITY_ID,
    TEXT_MODALITY_ID,
    DeepseekV3MultimodalConfig,
)
from deepseekv3.layout_deepseekv3 import media_spans
from deepseekv3.media_deepseekv3 import load_images
from deepseekv3.modeling_deepseekv3 import DeepseekV3MultimodalForConditionalGeneration
from deepseekv3.processing_deepseekv3 import DeepseekV3MultimodalProcessor
from deepseekv3.tokenization import load_default_tokenizer

SAMPLING_RATE = 16000
HOP_LENGTH = 160
IMAGE_ID = TINY_MEDIA_KWARGS["image_token_id"]
AUDIO_ID = TINY_MEDIA_KWARGS["audio_token_id"]
STRIDE = TINY_MEDIA_KWARGS["audio_conv_stride"]
NUM_IMAGE_TOKENS = (TINY_MEDIA_KWARGS["image_size"] // TINY_MEDIA_KWARGS["patch_size"]) ** 2


@pytest.fixture(scope="module")
def tokenizer():
    return load_default_tokenizer()


@pytest.fixture(scope="module")
def media_config(tokenizer) -> DeepseekV3MultimodalConfig:
    """The tiny media config, its vocabulary widened to the default tokenizer's."""
    return DeepseekV3MultimodalConfig(
        **{**TINY_TEXT_KWARGS, "vocab_size": len(tokenizer)}, **TINY_MEDIA_KWARGS, use_attention_gate=True
    )


@pytest.fixture(scope="module")
def model(media_config) -> DeepseekV3MultimodalForConditionalGeneration:
    torch.manual_seed(0)
    return DeepseekV3MultimodalForConditionalGeneration(media_config).eval()


@pytest.fixture(scope="module")
def processor(media_config, tokenizer) -> DeepseekV3MultimodalProcessor:
    return DeepseekV3MultimodalProcessor.from_config(media_config, tokenizer)


def _image(seed: int = 0, size=(20, 12), mode="RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def _clip(num_samples: int, seed: int = 0) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(num_samples)).astype(np.float32)


def _image_bytes(image: Image.Image, image_format="PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------------
# Placeholder expansion and outputs


def test_each_placeholder_expands_to_the_tokens_the_model_consumes(processor):
    short, long = _clip(1000), _clip(3000, seed=1)  # padded to 1120 / 3040 samples: 7 / 19 frames: 3 / 9 tokens
    out = processor(
        text=["<image> hi <audio>", "x <audio> y <image><image>"],
        images=[_image(0), _image(1), _image(2)],
        audio=[short, long],
        padding=True,
        padding_side="right",
        return_tensors="pt",
    )
    assert set(out) == {
        "input_ids",
        "attention_mask",
        "mm_token_type_ids",
        "pixel_values",
        "input_features",
        "input_features_mask",
    }
    assert out["pixel_values"].shape == (3, 3, 16, 16)
    assert out["input_features"].shape == (2, TINY_MEDIA_KWARGS["num_mel_bins"], 19)
    assert out["input_features_mask"].sum(-1).tolist() == [7, 19]
    ids = out["input_ids"]
    assert (ids[0] == IMAGE_ID).sum() == NUM_IMAGE_TOKENS and (ids[0] == AUDIO_ID).sum() == 7 // STRIDE
    assert (ids[1] == IMAGE_ID).sum() == 2 * NUM_IMAGE_TOKENS and (ids[1] == AUDIO_ID).sum() == 19 // STRIDE
    expected_modality = torch.full_like(ids, TEXT_MODALITY_ID)
    expected_modality[ids == IMAGE_ID] = IMAGE_MODALITY_ID
    expected_modality[ids == AUDIO_ID] = AUDIO_MODALITY_ID
    torch.testing.assert_close(out["mm_token_type_ids"], expected_modality)
    # the image span is contiguous and sits where "<image>" was: at the start (plain text gets no BOS)
    assert ids[0, :NUM_IMAGE_TOKENS].eq(IMAGE_ID).all()


def test_a_rendered_chat_template_tokenizes_to_exactly_one_bos_on_every_path(processor):
    """TRL and other clients render the template, then tokenize the text, with or without special tokens."""
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    tokenizer, bos = processor.tokenizer, processor.tokenizer.bos_token_id
    rendered = processor.apply_chat_template(messages)
    assert rendered.startswith(tokenizer.bos_token)
    paths = {
        "tokenizer": tokenizer(rendered)["input_ids"],
        "tokenizer, no special tokens": tokenizer(rendered, add_special_tokens=False)["input_ids"],
        "processor": processor(text=rendered, images=[_image()])["input_ids"][0],
        "processor, no special tokens": processor(text=rendered, images=[_image()], add_special_tokens=False)[
            "input_ids"
        ][0],
        "tokenizer.apply_chat_template": tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)[
            "input_ids"
        ],
        "processor.apply_chat_template": processor.apply_chat_template(
            messages, images=[_image()], tokenize=True, return_dict=True
        )["input_ids"][0],
    }
    for path, ids in paths.items():
        ids = list(ids)
        assert ids.count(bos) == 1 and ids[0] == bos, path


def test_a_clip_gets_the_same_tokens_and_features_alone_or_batched_with_a_longer_clip(processor):
    clip = _clip(1000)
    alone = processor(text="<audio>", audio=clip, return_tensors="pt")
    batched = processor(
        text=["<audio>", "<audio>"],
        audio=[clip, _clip(4000, 1)],
        padding=True,
        padding_side="right",
        return_tensors="pt",
    )
    frames = int(alone["input_features_mask"].sum())
    assert int(batched["input_features_mask"][0].sum()) == frames
    torch.testing.assert_close(batched["input_features"][0, :, :frames], alone["input_features"][0, :, :frames])
    assert alone["input_ids"][0].tolist() == batched["input_ids"][0, : alone["input_ids"].shape[1]].tolist()


def test_text_only_and_media_only_calls(processor):
    text_only = processor(text="just words", return_tensors="pt")
    assert set(text_only) == {"input_ids", "attention_mask", "mm_token_type_ids"}
    assert text_only["mm_token_type_ids"].eq(TEXT_MODALITY_ID).all()
    media_only = processor(images=_image(), return_tensors="pt")
    assert set(media_only) == {"pixel_values"}


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_either_side_keeps_every_row_and_pads_with_pad_id(processor, side):
    texts = ["<image> a long question about the picture", "<audio> short"]
    media = {"images": [_image()], "audio": [_clip(1000)]}
    rows = [processor(text=text, **{k: v for k, v in media.items() if f"<{k[:5]}" in text}) for text in texts]
    out = processor(text=texts, **media, padding=True, padding_side=side, return_tensors="pt")
    width = out["input_ids"].shape[1]
    for index, row in enumerate(rows):
        length = len(row["input_ids"][0])
        kept = slice(width - length, width) if side == "left" else slice(0, length)
        padded = slice(0, width - length) if side == "left" else slice(length, width)
        assert out["input_ids"][index, kept].tolist() == row["input_ids"][0]
        assert out["mm_token_type_ids"][index, kept].tolist() == row["mm_token_type_ids"][0]
        assert out["attention_mask"][index, kept].eq(1).all() and out["attention_mask"][index, padded].eq(0).all()
        assert out["input_ids"][index, padded].eq(processor.tokenizer.pad_token_id).all()
        assert out["mm_token_type_ids"][index, padded].eq(TEXT_MODALITY_ID).all()


def test_padding_to_max_length_and_multiple(processor):
    out = processor(text=["a", "abc def"], padding="max_length", max_length=10, return_tensors="pt")
    assert out["input_ids"].shape == (2, 10)
    out = processor(text=["a", "abc def"], padding=True, pad_to_multiple_of=8, return_tensors="pt")
    assert out["input_ids"].shape[1] % 8 == 0


def test_unequal_lengths_without_padding_are_refused_for_tensors(processor):
    with pytest.raises(ValueError, match="different lengths.*padding=True"):
        processor(text=["a", "a much longer sentence"], return_tensors="pt")


# ----------------------------------------------------------------------------------------------------
# Truncation never cuts a media span


def test_truncation_cutting_through_an_image_raises_by_default(processor):
    with pytest.raises(ValueError, match=r"remove part of the image at tokens \[2, 18\) of sample 0"):
        processor(text="hi <image> there", images=_image(), truncation=True, max_length=10)


def test_truncation_that_would_drop_a_whole_image_raises_by_default(processor):
    with pytest.raises(ValueError, match=r"would remove the image at tokens"):
        processor(text="words words words words <image>", images=_image(), truncation=True, max_length=4)


def test_truncation_drop_removes_the_whole_span_and_its_pixels(processor):
    full = processor(text="hi <image> there <image>", images=[_image(0), _image(1)], return_tensors="pt")
    first_span_end = int((full["input_ids"][0] == IMAGE_ID).nonzero().max()) - NUM_IMAGE_TOKENS + 1
    out = processor(
        text="hi <image> there <image>",
        images=[_image(0), _image(1)],
        truncation=True,
        max_length=first_span_end + 5,  # second image cut after a few tokens
        media_truncation="drop",
        return_tensors="pt",
    )
    assert out["input_ids"].shape[1] <= first_span_end + 5
    assert (out["input_ids"] == IMAGE_ID).sum() == NUM_IMAGE_TOKENS
    torch.testing.assert_close(out["pixel_values"], full["pixel_values"][:1])


def test_left_truncation_drops_a_leading_clip_whole(processor):
    processor.tokenizer.truncation_side = "left"
    try:
        out = processor(
            text="<audio> then some trailing words",
            audio=_clip(1000),
            truncation=True,
            max_length=6,
            media_truncation="drop",
            return_tensors="pt",
        )
    finally:
        processor.tokenizer.truncation_side = "right"
    assert not (out["input_ids"] == AUDIO_ID).any() and "input_features" not in out
    assert out["input_ids"].shape[1] <= 6


def test_truncation_drop_keeps_the_adjacent_clip_that_fits_with_only_its_frames(processor):
    short, long = _clip(1000), _clip(3000, seed=1)  # 7 / 19 frames: 3 / 9 tokens, one run of 12 audio tokens
    out = processor(
        text="<audio><audio> tail",
        audio=[short, long],
        truncation=True,
        max_length=5,  # keeps the first clip whole, cuts the second
        media_truncation="drop",
        return_tensors="pt",
    )
    alone = processor(text="<audio>", audio=short, return_tensors="pt")
    assert out["input_ids"][0].tolist() == [AUDIO_ID] * (7 // STRIDE)
    assert out["input_features"].shape[-1] == 7 and out["input_features_mask"].tolist() == [[1] * 7]
    torch.testing.assert_close(out["input_features"], alone["input_features"])


def test_media_spans_split_runs_of_adjacent_images_and_clips():
    image, audio, text = 3, 4, 9
    rows = [[text, image, image, image, image, audio, audio, audio, audio, audio, text], [audio, audio, text]]
    spans = media_spans(rows, image, audio, num_image_tokens=2, clip_tokens=[3, 2, 2])
    assert spans == [
        [(1, 3, "image"), (3, 5, "image"), (5, 8, "audio"), (8, 10, "audio")],
        [(0, 2, "audio")],
    ]


def test_truncation_of_text_alone_needs_no_media_choice(processor):
    out = processor(text="<image> " + "word " * 50, images=_image(), truncation=True, max_length=30)
    assert len(out["input_ids"][0]) == 30 and out["input_ids"][0].count(IMAGE_ID) == NUM_IMAGE_TOKENS


# ----------------------------------------------------------------------------------------------------
# Bad input: each raises ValueError naming the problem


def _corrupt_png() -> bytes:
    data = _image_bytes(_image())
    return data[:40] + b"\x00" * 20 + data[60:]


def _bomb_png() -> bytes:
    """100 million pixels that compress to a few kilobytes: refused from the header, before decoding."""
    return _image_bytes(Image.new("1", (10_000, 10_000)))


BAD_INPUTS = {
    "corrupt_image_bytes": (
        lambda: {"text": "<image>", "images": _corrupt_png()},
        r"image 0: cannot decode the image data",
    ),
    "not_an_image": (lambda: {"text": "<image>", "images": b"hello, world"}, r"image 0: cannot decode"),
    "missing_path": (
        lambda: {"text": "<image>", "images": "/nonexistent/cat.png"},
        r"image 0: the file '/nonexistent/cat.png' does not exist",
    ),
    "zero_size_image": (lambda: {"text": "<image>", "images": Image.new("RGB", (0, 5))}, r"zero-size image \(0x5\)"),
    "zero_size_array": (lambda: {"text": "<image>", "images": np.zeros((0, 4, 3), np.uint8)}, r"zero-size image"),
    "decompression_bomb": (lambda: {"text": "<image>", "images": _bomb_png()}, r"exceeds max_image_pixels"),
    "float_image_out_of_range": (
        lambda: {"text": "<image>", "images": np.full((4, 4, 3), 2.0)},
        r"float pixels must lie in \[0, 1\]",
    ),
    "wrong_sampling_rate": (
        lambda: {"text": "<audio>", "audio": _clip(4000), "sampling_rate": 8000},
        r"audio sampled at 8000 Hz but the feature extractor expects 16000 Hz.*resample_audio=True",
    ),
    "empty_audio": (lambda: {"text": "<audio>", "audio": np.zeros(0, np.float32)}, r"audio 0: the clip is empty"),
    "nan_audio": (
        lambda: {"text": "<audio>", "audio": np.full(1000, np.nan, np.float32)},
        r"audio 0: the waveform contains NaN or infinite",
    ),
    "infinite_audio": (
        lambda: {"text": "<audio>", "audio": np.r_[_clip(999), np.inf].astype(np.float32)},
        r"NaN or infinite",
    ),
    "audio_too_long": (lambda: {"text": "<audio>", "audio": _clip(6000)}, r"exceeds audio_max_frames \(32 frames"),
    "audio_too_short": (lambda: {"text": "<audio>", "audio": _clip(100)}, r"shorter than one audio token"),
    "more_images_than_placeholders": (
        lambda: {"text": "<image>", "images": [_image(0), _image(1)]},
        r"1 <image> tokens and 2 images",
    ),
    "fewer_images_than_placeholders": (
        lambda: {"text": ["<image>", "<image>"], "images": [_image(0)]},
        r"2 <image> tokens and 1 images",
    ),
    "more_clips_than_placeholders": (
        lambda: {"text": "<audio>", "audio": [_clip(1000), _clip(1000)]},
        r"1 <audio> tokens and 2 audio inputs",
    ),
    "fewer_clips_than_placeholders": (
        lambda: {"text": "<audio> and <audio>", "audio": [_clip(1000)]},
        r"2 <audio> tokens and 1 audio inputs",
    ),
    "hand_typed_image_placeholder_without_images": (
        lambda: {"text": "please ignore <image> this"},
        r"Found 1 <image> tokens in the text but no images were passed",
    ),
    "hand_typed_audio_placeholder_without_audio": (
        lambda: {"text": "<audio>"},
        r"Found 1 <audio> tokens in the text but no audio inputs were passed",
    ),
    "unknown_media_truncation": (
        lambda: {"text": "hi", "media_truncation": "cut"},
        r"media_truncation \('cut'\) must be one of",
    ),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_a_value_error_naming_the_problem(processor, name):
    make_inputs, message = BAD_INPUTS[name]
    with pytest.raises(ValueError, match=message):
        processor(**make_inputs())


@pytest.mark.parametrize(
    ("name", "other_kwargs", "message"),
    [
        ("vocab_size", {"vocab_size": 96}, r"the tokenizer has 433 tokens but the model's vocab_size is 96"),
        ("image_token_id", {"image_token_id": 9}, r"config.image_token_id \(9\) differs from the processor's \(3\)"),
    ],
)
def test_processor_refuses_a_config_the_tokenizer_does_not_fit(tokenizer, name, other_kwargs, message):
    kwargs = {**TINY_TEXT_KWARGS, "vocab_size": len(tokenizer), **TINY_MEDIA_KWARGS, **other_kwargs}
    with pytest.raises(ValueError, match=message):
        DeepseekV3MultimodalProcessor.from_config(DeepseekV3MultimodalConfig(**kwargs), tokenizer)


# ----------------------------------------------------------------------------------------------------
# Documented conversions


def _pixels(processor, image) -> torch.Tensor:
    return processor(images=image, return_tensors="pt")["pixel_values"]


def test_grayscale_palette_rgba_and_16_bit_images_are_converted_to_rgb(processor):
    gray = Image.fromarray(np.arange(16 * 16, dtype=np.uint8).reshape(16, 16), mode="L")
    torch.testing.assert_close(_pixels(processor, gray), _pixels(processor, gray.convert("RGB")))
    palette = _image().convert("P")
    torch.testing.assert_close(_pixels(processor, palette), _pixels(processor, palette.convert("RGB")))
    transparent = Image.new("RGBA", (16, 16), (10, 200, 30, 0))
    white = Image.new("RGB", (16, 16), (255, 255, 255))
    torch.testing.assert_close(_pixels(processor, transparent), _pixels(processor, white))
    sixteen_bit = Image.fromarray(np.full((16, 16), 257 * 100, dtype=np.uint16))
    assert sixteen_bit.mode.startswith("I;16")
    torch.testing.assert_close(
        _pixels(processor, sixteen_bit), _pixels(processor, Image.new("RGB", (16, 16), (100, 100, 100)))
    )


def _sixteen_bit_image(values: np.ndarray, mode: str) -> Image.Image:
    if mode == "I":
        return Image.fromarray(values.astype(np.int32))
    byte_order = ">" if mode == "I;16B" else "<"
    return Image.frombytes(mode, values.shape[::-1], values.astype(f"{byte_order}u2").tobytes())


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_images_are_scaled_to_8_bits_not_clipped(mode):
    """transformers' `convert_to_rgb` clips 16-bit pixels at 255; they must be divided by 257 first."""
    values = np.array([[0, 257 * 100], [257 * 200, 65535]])
    image = _sixteen_bit_image(values, mode)
    assert image.mode == mode
    (rgb,) = load_images(image, max_image_pixels=4)
    expected = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(rgb), np.repeat(expected[..., None], 3, axis=-1))


def test_premultiplied_alpha_is_composited_onto_white_like_straight_alpha():
    pixels = np.random.default_rng(0).integers(0, 256, (6, 6, 4), dtype=np.uint8)
    pixels[:2, :, 3] = 0  # fully transparent rows: white
    straight = Image.fromarray(pixels)
    (from_premultiplied,) = load_images(straight.convert("RGBa"), max_image_pixels=36)
    (from_straight,) = load_images(straight, max_image_pixels=36)
    assert np.asarray(from_straight)[:2].min() == 255
    # premultiplying rounds each colour to a multiple of 255 / alpha; compositing scales that error by alpha / 255
    np.testing.assert_allclose(np.asarray(from_premultiplied), np.asarray(from_straight), atol=1, rtol=0)


def test_a_transparent_colour_key_is_composited_onto_white():
    """A PNG's tRNS colour on an RGB image, like palette transparency, marks pixels transparent."""
    pixels = np.zeros((4, 4, 3), dtype=np.uint8)
    pixels[:2], pixels[2:] = (10, 20, 30), (200, 100, 50)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", transparency=(10, 20, 30))
    (rgb,) = load_images(buffer.getvalue(), max_image_pixels=16)
    expected = pixels.copy()
    expected[:2] = 255
    np.testing.assert_array_equal(np.asarray(rgb), expected)


def test_paths_bytes_arrays_and_tensors_give_the_same_pixels_as_pil(processor, tmp_path):
    image = _image(size=(16, 16))
    path = tmp_path / "image.png"
    image.save(path)
    array = np.asarray(image)
    reference = _pixels(processor, image)
    for same in (
        str(path),
        path,
        _image_bytes(image),
        array,
        array.transpose(2, 0, 1),
        torch.from_numpy(array.copy()),
    ):
        torch.testing.assert_close(_pixels(processor, same), reference)
    torch.testing.assert_close(_pixels(processor, array.astype(np.float32) / 255.0), reference)


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_stereo_audio_is_averaged_to_mono(processor, layout):
    left, right = _clip(2000, 0), _clip(2000, 1)
    stereo = np.stack([left, right]) if layout == "channels_first" else np.stack([left, right], axis=1)
    mono = (left + right) / 2
    torch.testing.assert_close(
        processor(audio=stereo, return_tensors="pt")["input_features"],
        processor(audio=mono, return_tensors="pt")["input_features"],
    )


def test_integer_pcm_is_scaled_and_resampling_runs_only_when_asked(processor):
    pcm = (_clip(2000) * 32768).astype(np.int16)
    torch.testing.assert_close(
        processor(audio=pcm, return_tensors="pt")["input_features"],
        processor(audio=pcm.astype(np.float32) / 32768, return_tensors="pt")["input_features"],
    )
    tone_8k = np.sin(2 * np.pi * 440 * np.arange(1600) / 8000).astype(np.float32)
    resampled = processor(text="<audio>", audio=tone_8k, sampling_rate=8000, resample_audio=True, return_tensors="pt")
    assert int(resampled["input_features_mask"].sum()) == 3200 // HOP_LENGTH  # 0.2 s at 16 kHz


def test_resampled_audio_gives_the_features_of_the_tones_sampled_at_the_target_rate(processor):
    def tones(rate: int, num_samples: int) -> np.ndarray:
        times = np.arange(num_samples) / rate
        return (0.3 * np.sin(2 * np.pi * 441.3 * times) + 0.2 * np.sin(2 * np.pi * 1733.7 * times + 1.0)).astype(
            np.float32
        )

    resampled = processor(audio=tones(8000, 2000), sampling_rate=8000, resample_audio=True, return_tensors="pt")
    direct = processor(audio=tones(SAMPLING_RATE, 4000), return_tensors="pt")
    # the FFT resampler treats the clip as periodic: on 0.25 s the jump where its end wraps to its start rings through
    # every frame (mean error 0.026); a wrong gain or a linear interpolation gives 0.15 or more
    difference = (resampled["input_features"] - direct["input_features"]).abs()
    assert difference.mean() < 0.05


# ----------------------------------------------------------------------------------------------------
# Chat template and assistant-only labels


def _conversation(image, clip):
    return [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": image},
                {"type": "audio", "audio": clip},
                {"type": "text", "text": "What do you see and hear?"},
            ],
        },
        {"role": "assistant", "content": "A red square and a low tone."},
    ]


def test_chat_template_matches_calling_the_processor_on_the_rendered_prompt(processor):
    image, clip = _image(), _clip(1000)
    out = processor.apply_chat_template(
        _conversation(image, clip)[:1], tokenize=True, return_dict=True, add_generation_prompt=True
    )
    prompt = processor.apply_chat_template(_conversation(image, clip)[:1], add_generation_prompt=True)
    direct = processor(text=prompt, images=image, audio=clip, add_special_tokens=False, return_tensors="pt")
    assert prompt.endswith("<|assistant|>") and prompt.count("<s>") == 1
    for key in direct:
        torch.testing.assert_close(torch.as_tensor(out[key]), direct[key])


def test_assistant_labels_cover_exactly_the_assistant_reply(processor):
    out = processor.apply_chat_template(
        _conversation(_image(), _clip(1000)),
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        processor_kwargs={"return_tensors": "pt"},
    )
    labels = processor.build_assistant_labels(out["input_ids"], out["assistant_masks"])
    trained = labels[labels != -100]
    assert processor.tokenizer.decode(trained) == "A red square and a low tone.<|end|>"
    assert not torch.isin(trained, torch.tensor([IMAGE_ID, AUDIO_ID])).any()


# ----------------------------------------------------------------------------------------------------
# Saving and loading


def test_save_pretrained_round_trips_through_auto_processor(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded) is DeepseekV3MultimodalProcessor
    assert json.loads((tmp_path / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_deepseekv3.DeepseekV3MultimodalProcessor"
    }
    inputs = {"text": ["<image> and <audio>"], "images": [_image()], "audio": [_clip(1000)], "return_tensors": "pt"}
    expected, actual = processor(**inputs), loaded(**inputs)
    assert set(actual) == set(expected)
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key])


_BLOCKED_LOAD = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class BlockDeepseekv3(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            if fullname == "deepseekv3" or fullname.startswith("deepseekv3."):
                raise ImportError(f"import of {fullname!r} is blocked")

    sys.meta_path.insert(0, BlockDeepseekv3())
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoProcessor

    processor = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    image = Image.fromarray(np.full((8, 8, 3), 7, dtype=np.uint8))
    inputs = processor(
        text="<image> hi <audio>", images=image, audio=np.full(1000, 0.1, np.float32), return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**inputs).logits
    print(json.dumps({"module": type(processor).__module__, "logits": logits[0, -1].tolist()}))
    """
)


def test_model_and_processor_saved_in_one_folder_load_where_deepseekv3_cannot_be_imported(processor, model, tmp_path):
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert {"processing_deepseekv3.py", "configuration_deepseekv3.py"} <= set(os.listdir(tmp_path))
    result = subprocess.run(
        [sys.executable, "-c", _BLOCKED_LOAD, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")},
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["module"].startswith("transformers_modules")
    image = Image.fromarray(np.full((8, 8, 3), 7, dtype=np.uint8))
    inputs = processor(
        text="<image> hi <audio>", images=image, audio=np.full(1000, 0.1, np.float32), return_tensors="pt"
    )
    with torch.no_grad():
        expected = model(**inputs).logits[0, -1]
    torch.testing.assert_close(torch.tensor(loaded["logits"]), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Round trip through the model


def test_every_output_key_is_a_model_forward_argument(processor):
    out = processor(text="<image> <audio>", images=_image(), audio=_clip(1000))
    parameters = inspect.signature(DeepseekV3MultimodalForConditionalGeneration.forward).parameters
    assert set(out) <= set(parameters) - {"kwargs"}


def test_processor_output_feeds_the_model_with_labels_and_left_padding(processor, model):
    inputs = processor(
        text=["<image> what is it? <audio>", "<audio> and <image><image> then"],
        images=[_image(0), _image(1), _image(2)],
        audio=[_clip(1500), _clip(4000, 1)],
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    with torch.no_grad():
        outputs = model(**inputs, labels=labels)
    assert outputs.logits.shape == (*inputs["input_ids"].shape, model.config.vocab_size)
    assert torch.isfinite(outputs.loss)


def test_the_model_refuses_a_placeholder_count_the_processor_did_not_make(processor, model):
    inputs = processor(text="<image> hi", images=_image(), return_tensors="pt")
    inputs["input_ids"][0, 1] = processor.tokenizer.convert_tokens_to_ids("hi")  # one image token fewer
    with pytest.raises(ValueError):
        model(**inputs)


# ----------------------------------------------------------------------------------------------------
# Property: placeholder counts always equal what the model consumes

_segment = st.one_of(
    st.text(alphabet="abc xyz.?", min_size=1, max_size=8).map(lambda text: ("text", text)),
    st.integers(0, 3).map(lambda seed: ("image", seed)),
    st.integers(STRIDE * HOP_LENGTH, TINY_MEDIA_KWARGS["audio_max_frames"] * HOP_LENGTH).map(lambda n: ("audio", n)),
)
# every sample has a segment: an empty one has no token to run (the tokenizer adds no BOS; the chat template does)
_batch = st.lists(st.lists(_segment, min_size=1, max_size=4), min_size=1, max_size=3)


def _inputs_from_segments(batch):
    texts, images, clips = [], [], []
    for sample in batch:
        parts = []
        for kind, value in sample:
            if kind == "text":
                parts.append(value)
            elif kind == "image":
                parts.append("<image>")
                images.append(_image(value, size=(8 + value, 11)))
            else:
                parts.append("<audio>")
                clips.append(_clip(value, seed=value))
        texts.append(" ".join(parts))
    return {"text": texts, "images": images or None, "audio": clips or None}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=_batch, side=st.sampled_from(["left", "right"]))
def test_placeholder_tokens_always_equal_what_the_model_consumes(processor, batch, side):
    inputs = _inputs_from_segments(batch)
    out = processor(**inputs, padding=True, padding_side=side, return_tensors="pt")
    num_images = len(inputs["images"] or [])
    assert int((out["input_ids"] == IMAGE_ID).sum()) == num_images * NUM_IMAGE_TOKENS
    if num_images:
        assert out["pixel_values"].shape == (num_images, 3, 16, 16)
    audio_ids = out["input_ids"][out["input_ids"] == AUDIO_ID]
    if inputs["audio"]:
        frames = out["input_features_mask"].sum(-1)
        assert out["input_features"].shape[-1] == int(frames.max()) <= TINY_MEDIA_KWARGS["audio_max_frames"]
        # each mask is a prefix of ones
        assert torch.equal(out["input_features_mask"].cumprod(-1), out["input_features_mask"])
        assert audio_ids.numel() == int((frames // STRIDE).sum())
    else:
        assert audio_ids.numel() == 0 and "input_features" not in out
    assert torch.equal(out["mm_token_type_ids"] == IMAGE_MODALITY_ID, out["input_ids"] == IMAGE_ID)
    assert torch.equal(out["mm_token_type_ids"] == AUDIO_MODALITY_ID, out["input_ids"] == AUDIO_ID)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=_batch, side=st.sampled_from(["left", "right"]))
def test_any_mix_of_text_images_and_audio_runs_through_the_model(processor, model, batch, side):
    out = processor(**_inputs_from_segments(batch), padding=True, padding_side=side, return_tensors="pt")
    with torch.no_grad():
        logits = model(**out).logits
    assert logits.shape[:2] == out["input_ids"].shape and torch.isfinite(logits).all()
