"""Training the byte-level BPE tokenizer of the DeepSeek-V3 multimodal model with the `tokenizers` library.

`train_tokenizer` returns a transformers `PreTrainedTokenizerFast` that carries every special token the model and the
processor need (padding, begin/end of sequence, the `<image>` and `<audio>` placeholders, chat role markers), so it
saves and loads with `AutoTokenizer`. `load_default_tokenizer` trains a small one on text the package builds itself,
so the demo and the tests need nothing from the network. `DeepseekV3MultimodalProcessor.from_config` checks a
tokenizer against the model's config (vocabulary size, special-token ids) and says what disagrees.
"""

import functools
import itertools
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

__all__ = [
    "AUDIO_TOKEN",
    "CHAT_TOKENS",
    "IMAGE_TOKEN",
    "SPECIAL_TOKENS",
    "default_corpus",
    "load_default_tokenizer",
    "train_tokenizer",
]

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
IMAGE_TOKEN = "<image>"
AUDIO_TOKEN = "<audio>"
SYSTEM_TOKEN = "<|system|>"
USER_TOKEN = "<|user|>"
ASSISTANT_TOKEN = "<|assistant|>"
END_OF_TURN_TOKEN = "<|end|>"
CHAT_TOKENS = (SYSTEM_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, END_OF_TURN_TOKEN)
# The order fixes the ids: pad 0, bos 1, eos 2, image 3, audio 4 (the ids of the tests' tiny config), then the chat
# markers 5-8. The trainer gives special tokens the first ids, in this order.
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN, AUDIO_TOKEN, *CHAT_TOKENS)
DEFAULT_VOCAB_SIZE = 512

# Jinja chat template: content is a string or a list of {"type": "text" | "image" | "audio"} parts. Assistant turns
# sit inside `{% generation %}` so `return_assistant_tokens_mask=True` marks exactly the tokens to train on.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>{% generation %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|end|>{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>"
    "{% elif part['type'] == 'audio' %}<audio>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer carrying the model's special tokens and chat template.

    Args:
        texts (`Iterable[str]`): the training corpus.
        vocab_size (`int`, *optional*, defaults to 512): size of the vocabulary, special tokens and the 256 byte
            symbols included; at least `256 + len(SPECIAL_TOKENS)`.
        min_frequency (`int`, *optional*, defaults to 2): a pair is merged only if it occurs at least this often.

    Returns:
        `PreTrainedTokenizerFast`: pads with `<pad>` on the left (batched generation) and exposes `image_token` /
        `audio_token` (and their ids) for the processor. `<s>` comes from the chat template alone, so a rendered
        conversation tokenizes to exactly one `<s>` however it is tokenized (`add_special_tokens` adds nothing);
        plain text gets none.
    """
    smallest = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
    if vocab_size < smallest:
        raise ValueError(
            f"vocab_size ({vocab_size}) must be at least {smallest}: 256 byte symbols and {len(SPECIAL_TOKENS)} "
            "special tokens"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # No `<s>` from the tokenizer: the chat template writes it. A client that renders the template and then tokenizes
    # the text (TRL, serving front ends) would otherwise get two, whatever it passes as `add_special_tokens`.
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return _wrap_tokenizer(tokenizer)


def _wrap_tokenizer(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN, "audio_token": AUDIO_TOKEN},
        additional_special_tokens=list(CHAT_TOKENS),
        chat_template=CHAT_TEMPLATE,
        # generation (TRL's GRPO, pipelines, batched `generate`) needs prompts padded on the left; the training
        # collators pad on the right themselves
        padding_side="left",
    )


def default_corpus() -> list[str]:
    """A small deterministic English corpus about the shapes, colours and tones the built-in data sets show.

    Returns:
        `list[str]`: a few thousand short sentences, the same on every call.
    """
    colours = ("red", "green", "blue", "yellow", "black", "white", "purple", "orange")
    shapes = ("circle", "square", "triangle", "stripe", "cross", "dot")
    sounds = ("low tone", "high tone", "chirp", "click", "silence", "noise burst")
    templates = (
        "The image shows a {colour} {shape}.",
        "What is in the image? A {colour} {shape} on a plain background.",
        "The audio clip is a {sound}, and the picture is a {colour} {shape}.",
        "Describe the sound. It sounds like a {sound}.",
        "Question: which colour is the {shape}? Answer: {colour}.",
        "I hear a {sound} while I look at the {colour} {shape}.",
    )
    return [
        template.format(colour=colour, shape=shape, sound=sound)
        for template, colour, shape, sound in itertools.product(templates, colours, shapes, sounds)
    ]


@functools.lru_cache(maxsize=1)
def _default_tokenizer_json() -> str:
    return train_tokenizer(default_corpus(), vocab_size=DEFAULT_VOCAB_SIZE).backend_tokenizer.to_str()


def load_default_tokenizer() -> PreTrainedTokenizerFast:
    """The package's default tokenizer: byte-level BPE, 512 entries, trained on `default_corpus()` (deterministic).

    Returns:
        `PreTrainedTokenizerFast`: a fresh object on every call (callers may change its padding side and the like).
    """
    return _wrap_tokenizer(Tokenizer.from_str(_default_tokenizer_json()))
