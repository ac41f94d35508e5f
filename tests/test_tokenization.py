"""Tests of deepseekv3.tokenization: the byte-level BPE tokenizer, its special tokens, saving and loading."""

import pytest
from conftest import TINY_MEDIA_KWARGS, TINY_TEXT_KWARGS
from transformers import AutoTokenizer

from deepseekv3.tokenization import (
    AUDIO_TOKEN,
    CHAT_TOKENS,
    IMAGE_TOKEN,
    SPECIAL_TOKENS,
    default_corpus,
    load_default_tokenizer,
    train_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer():
    return load_default_tokenizer()


def test_special_token_ids_are_those_of_the_model_config(tokenizer):
    assert tokenizer.pad_token_id == TINY_TEXT_KWARGS["pad_token_id"]
    assert tokenizer.bos_token_id == TINY_TEXT_KWARGS["bos_token_id"]
    assert tokenizer.eos_token_id == TINY_TEXT_KWARGS["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == TINY_MEDIA_KWARGS["image_token_id"]
    assert tokenizer.convert_tokens_to_ids(AUDIO_TOKEN) == TINY_MEDIA_KWARGS["audio_token_id"]
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(len(SPECIAL_TOKENS)))


@pytest.mark.parametrize(
    "text",
    [
        "The image shows a red circle.",
        "naïve café — 漢字 🎵",
        "  leading and trailing spaces  ",
        "tabs\tand\nnewlines",
    ],
)
def test_decode_inverts_encode_for_any_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_placeholders_are_single_tokens_and_plain_text_gets_no_bos(tokenizer):
    ids = tokenizer(f"a{IMAGE_TOKEN}b{AUDIO_TOKEN}{IMAGE_TOKEN}")["input_ids"]
    assert tokenizer.bos_token_id not in ids  # the chat template writes <s>, the tokenizer adds nothing
    assert ids.count(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)) == 2
    assert ids.count(tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)) == 1
    chat_ids = tokenizer.convert_tokens_to_ids(list(CHAT_TOKENS))
    assert tokenizer("".join(CHAT_TOKENS), add_special_tokens=False)["input_ids"] == chat_ids


def test_training_on_the_built_in_corpus_is_deterministic(tokenizer):
    again = train_tokenizer(default_corpus(), vocab_size=512)
    assert again.get_vocab() == tokenizer.get_vocab()
    assert len(tokenizer) > 256 + len(SPECIAL_TOKENS)  # merges were learnt on top of the byte alphabet


def test_saves_and_loads_with_auto_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = f"{IMAGE_TOKEN} What colour is the square?"
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.chat_template == tokenizer.chat_template
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == ("<pad>", "<s>", "</s>")


def test_vocab_smaller_than_bytes_and_special_tokens_is_refused():
    with pytest.raises(ValueError, match=r"vocab_size \(100\) must be at least 265"):
        train_tokenizer(["hello"], vocab_size=100)


def test_chat_template_renders_roles_media_and_generation_prompt(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": "A red dot."},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<s><|system|>Be brief.<|end|>\n<|user|><image><audio>What?<|end|>\n<|assistant|>A red dot.<|end|>\n"
        "<|assistant|>"
    )
