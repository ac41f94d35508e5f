"""Tests of deepseekv3.data.multimodal: the mixed data set, its chat format through the processor, the text corpus."""

import numpy as np
import pytest
from conftest import TINY_MEDIA_KWARGS, TINY_TEXT_KWARGS

from deepseekv3.configuration_deepseekv3 import DeepseekV3MultimodalConfig
from deepseekv3.data import (
    QUESTION_TEMPLATES,
    build_multimodal_dataset,
    build_shapes_dataset,
    build_text_corpus,
    build_tones_dataset,
)
from deepseekv3.processing_deepseekv3 import DeepseekV3MultimodalProcessor
from deepseekv3.tokenization import train_tokenizer

# 0.3 s clips: 30 log-mel frames, within the tiny config's 32.
_CLIP_SECONDS = 0.3


@pytest.fixture(scope="module")
def mixed():
    return build_multimodal_dataset(30, 20, seed=4, clip_seconds=_CLIP_SECONDS)


def _text_columns(rows):
    return [(row["question_template"], row["question"], row["answer"], row["caption"]) for row in rows]


def test_each_split_holds_the_rows_of_both_single_modality_builders(mixed):
    shapes = build_shapes_dataset(30, seed=4)
    tones = build_tones_dataset(20, seed=4, clip_seconds=_CLIP_SECONDS)
    for name, split in mixed.items():
        images = split.filter(lambda modality: modality == "image", input_columns="modality")
        clips = split.filter(lambda modality: modality == "audio", input_columns="modality")
        assert sorted(_text_columns(images)) == sorted(_text_columns(shapes[name]))
        assert sorted(_text_columns(clips)) == sorted(_text_columns(tones[name]))
        assert sorted(images["objects"], key=str) == sorted(shapes[name]["objects"], key=str)
        assert all(row["audio"] is None and row["tones"] is None for row in images)
        assert all(row["image"] is None and row["objects"] is None for row in clips)
    # Mixed, not one modality after the other.
    assert mixed["train"]["modality"] != sorted(mixed["train"]["modality"])


def test_same_seed_gives_the_same_mix(mixed):
    again = build_multimodal_dataset(30, 20, seed=4, clip_seconds=_CLIP_SECONDS)
    for name in mixed:
        assert mixed[name].data.equals(again[name].data)


def test_messages_render_with_the_chat_template_and_feed_the_processor(mixed):
    tokenizer = train_tokenizer(build_text_corpus(200, 100), vocab_size=400)
    config = DeepseekV3MultimodalConfig(**{**TINY_TEXT_KWARGS, "vocab_size": len(tokenizer)}, **TINY_MEDIA_KWARGS)
    processor = DeepseekV3MultimodalProcessor.from_config(config, tokenizer)
    for modality in ("image", "audio"):
        row = mixed["train"][mixed["train"]["modality"].index(modality)]
        prompt = processor.apply_chat_template(row["messages"])
        assert prompt.count(f"<{modality}>") == 1 and prompt.endswith(f"{row['answer']}<|end|>\n")
        media = {"images": row["image"]} if modality == "image" else {"audio": np.asarray(row["audio"]["array"])}
        inputs = processor(text=prompt, **media, add_special_tokens=False)
        media_token = config.image_token_id if modality == "image" else config.audio_token_id
        expected = 16 if modality == "image" else 30 // TINY_MEDIA_KWARGS["audio_conv_stride"]
        assert inputs["input_ids"][0].count(media_token) == expected


def test_text_corpus_holds_every_caption_question_and_answer():
    corpus = build_text_corpus(num_images=40, num_clips=20, seed=3)
    assert corpus == build_text_corpus(num_images=40, num_clips=20, seed=3)
    shapes = build_shapes_dataset(40, seed=3)
    tones = build_tones_dataset(20, seed=3)
    for split in (*shapes.values(), *tones.values()):
        for row in split.select_columns(["caption", "question", "answer"]):
            assert set(row.values()) <= set(corpus)
    answers = {answer for template in QUESTION_TEMPLATES.values() for answer in template.answers}
    assert answers <= set(corpus)
