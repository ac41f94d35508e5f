"""Encode the built-in data once, then batch it for each alignment stage.

`encode_rows` runs the processor (chat template, tokenizer, image processor, feature extractor) over rows of the
built-in data sets, in chunks, and keeps one tokenized example per row; training steps then only pad and stack:

- `InstructionCollator` (stage 3, LoRA): the conversation, labels on the assistant's reply only.
- `DistillationCollator` (stage 2): the same, plus, for an image question, a teacher distribution over patches for
  each question token that names an object: the region of the object it names, and for the position that predicts
  the answer, the region of the object the answer is about with half of the heads and, for a relation, the other
  object with the other half (`distillation_targets`, `(batch, seq_len, 2, num_patches)`), at the positions of
  `distillation_query_mask` (every question position, with all referred objects' region, when the question names no
  object). An audio question trains on its answer alone.
- `ContrastiveCollator` (stage 1): every row's caption paired with its image or clip (`contrastive_input_ids`).

A row holds one image (`row["image"]`) or one clip (`row["audio"] = {"array", "sampling_rate"}`); its `messages`
carry `{"type": "image"}` / `{"type": "audio"}` parts without the media, which `conversation_with_media` puts in.
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..configuration_deepseekv3 import DeepseekV3MultimodalConfig
from ..data import boxes_to_patch_weights
from ..processing_deepseekv3 import DeepseekV3MultimodalProcessor
from .packing import MultimodalPackingCollator, MultimodalPaddingCollator

__all__ = [
    "ContrastiveCollator",
    "DistillationCollator",
    "InstructionCollator",
    "conversation_with_media",
    "conversation_with_media_lists",
    "encode_conversations",
    "encode_rows",
]

_MEDIA_KEYS = ("pixel_values", "input_features", "input_features_mask")
# Groups of heads with their own distillation targets (`attention_distillation_loss`); must divide the model's heads.
_HEAD_GROUPS = 2


def _clip(row: Mapping[str, Any]) -> np.ndarray:
    return np.asarray(row["audio"]["array"], dtype=np.float32)


def conversation_with_media(row: Mapping[str, Any], include_answer: bool = True) -> list[dict[str, Any]]:
    """The row's `messages` with its image or clip put into the media part (the transformers chat convention).

    Args:
        row (`dict`): a row of the built-in data sets.
        include_answer (`bool`, *optional*, defaults to `True`): keep the assistant turn (training) or drop it
            (prompting for generation).

    Returns:
        `list[dict]`: the conversation.
    """
    conversation = []
    for message in row["messages"]:
        if message["role"] == "assistant" and not include_answer:
            continue
        content = []
        for part in message["content"]:
            if part["type"] == "image":
                content.append({"type": "image", "image": row["image"]})
            elif part["type"] == "audio":
                content.append({"type": "audio", "audio": _clip(row)})
            else:
                content.append({"type": "text", "text": part["text"]})
        conversation.append({"role": message["role"], "content": content})
    return conversation


def encode_rows(
    processor: DeepseekV3MultimodalProcessor,
    rows: Sequence[Mapping[str, Any]],
    patch_size: int,
    chunk_size: int = 64,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Tokenize and process every row once.

    Args:
        processor (`DeepseekV3MultimodalProcessor`): the model's processor.
        rows (`Sequence[Mapping]`): rows of the built-in data sets (one image or one clip each).
        patch_size (`int`): the model's `patch_size` (for the distillation targets).
        chunk_size (`int`, *optional*, defaults to 64): rows per processor call.
        progress (`bool`, *optional*, defaults to `True`): show a progress bar.

    Returns:
        `list[dict]`, one per row: `input_ids`, `labels` (-100 but on the reply), `mm_token_type_ids` (1-D
        tensors), `prompt_length` (where the reply starts), the media (`pixel_values` `(1, C, H, W)` or
        `input_features` `(1, mel, frames)` and `input_features_mask`), `caption_ids`, and for image rows
        `distillation_targets` `(seq_len, num_patches)` (at each distilled position, the region of the object its
        token names, or the answer is about) and `distillation_query_mask` (1-D, the distilled positions).
    """
    examples = []
    for start in tqdm(range(0, len(rows), chunk_size), desc="encoding rows", disable=not progress, leave=False):
        chunk = [rows[index] for index in range(start, min(start + chunk_size, len(rows)))]
        examples.extend(_encode_chunk(processor, chunk, patch_size))
    return examples


def encode_conversations(
    processor: DeepseekV3MultimodalProcessor,
    rows: Sequence[Mapping[str, Any]],
    chunk_size: int = 64,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Tokenize and process conversations (`deepseekv3.data.load_conversations`: `messages`, `images`, `audios`) for
    `InstructionCollator`: labels on the assistant turns only, through the chat template's generation markers.

    Clips at another sampling rate than the feature extractor's are resampled.

    Returns:
        `list[dict]`, one per row: `input_ids`, `labels`, `mm_token_type_ids`, and `pixel_values` `(images, C, H, W)`
        / `input_features` `(clips, mel, frames)` and `input_features_mask` where the row has media.
    """
    examples = []
    bar = tqdm(total=len(rows), desc="encoding conversations", disable=not progress, leave=False)
    start = 0
    while start < len(rows):
        rate = _sampling_rate(rows[start])
        end = start + 1
        while end < len(rows) and end - start < chunk_size and _sampling_rate(rows[end]) in (rate, None):
            end += 1
        examples.extend(_encode_conversation_chunk(processor, [rows[index] for index in range(start, end)], rate))
        bar.update(end - start)
        start = end
    bar.close()
    return examples


def _sampling_rate(row: Mapping[str, Any]) -> int | None:
    rates = {audio["sampling_rate"] for audio in row["audios"]}
    if len(rates) > 1:
        raise ValueError(f"a row's clips are sampled at several rates {sorted(rates)}: give them one rate")
    return rates.pop() if rates else None


def conversation_with_media_lists(row: Mapping[str, Any], include_last_reply: bool = True) -> list[dict[str, Any]]:
    """A `load_conversations` row's `messages` with its `images` / `audios` put into the media parts, in order.

    Args:
        row (`dict`): `messages`, `images`, `audios` (clips as `{"array", "sampling_rate"}`).
        include_last_reply (`bool`, *optional*, defaults to `True`): keep the last assistant turn (training) or end
            before it (prompting for generation).
    """
    messages = list(row["messages"])
    if not include_last_reply:
        last = max(index for index, message in enumerate(messages) if message["role"] == "assistant")
        messages = messages[:last]
    images, audios = iter(row["images"]), iter(row["audios"])
    conversation = []
    for message in messages:
        content = []
        for part in message["content"]:
            if part["type"] == "image":
                content.append({"type": "image", "image": next(images)})
            elif part["type"] == "audio":
                content.append({"type": "audio", "audio": np.asarray(next(audios)["array"], dtype=np.float32)})
            else:
                content.append({"type": "text", "text": part["text"]})
        conversation.append({"role": message["role"], "content": content})
    return conversation


def _encode_conversation_chunk(processor, rows, rate) -> list[dict[str, Any]]:
    batch, labels = _chat_batch(processor, [conversation_with_media_lists(row) for row in rows], rate)
    image_index = audio_index = 0
    examples = []
    for index, row in enumerate(rows):
        example = _text_example(batch, labels, index)
        if row["images"]:
            example["pixel_values"] = batch["pixel_values"][image_index : image_index + len(row["images"])]
            image_index += len(row["images"])
        if row["audios"]:
            clips = slice(audio_index, audio_index + len(row["audios"]))
            frames = int(batch["input_features_mask"][clips].sum(dim=-1).max())
            example["input_features"] = batch["input_features"][clips, :, :frames]
            example["input_features_mask"] = batch["input_features_mask"][clips, :frames]
            audio_index += len(row["audios"])
        examples.append(example)
    return examples


def _chat_batch(processor, conversations, rate) -> tuple[Any, torch.Tensor]:
    """The processor's padded batch of `conversations` and its labels on the assistant turns only."""
    batch = processor.apply_chat_template(
        conversations,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        processor_kwargs={
            "return_tensors": "pt",
            "padding": True,
            "padding_side": "right",  # each row is cut back to its own tokens below
            "sampling_rate": rate,
            "resample_audio": True,
        },
    )
    return batch, processor.build_assistant_labels(batch["input_ids"], batch["assistant_masks"])


def _text_example(batch, labels, index: int) -> dict[str, torch.Tensor]:
    """Row `index` of a `_chat_batch` without its padding: `input_ids`, `labels`, `mm_token_type_ids`."""
    length = int(batch["attention_mask"][index].sum())
    return {
        "input_ids": batch["input_ids"][index, :length],
        "labels": labels[index, :length],
        "mm_token_type_ids": batch["mm_token_type_ids"][index, :length],
    }


def _encode_chunk(processor, rows, patch_size) -> list[dict[str, Any]]:
    rates = {row["audio"]["sampling_rate"] for row in rows if row.get("audio") is not None}
    batch, labels = _chat_batch(
        processor, [conversation_with_media(row) for row in rows], rates.pop() if rates else None
    )
    # a caption is encoded alone for the contrastive stage, starting with <s> as every conversation does
    bos = processor.tokenizer.bos_token
    captions = processor.tokenizer([bos + row["caption"] for row in rows], add_special_tokens=False)["input_ids"]
    image_index = audio_index = 0
    examples = []
    for index, row in enumerate(rows):
        example = {**_text_example(batch, labels, index), "caption_ids": torch.tensor(captions[index])}
        example["prompt_length"] = int((example["labels"] != -100).nonzero()[0])
        if row.get("image") is not None:
            example["pixel_values"] = batch["pixel_values"][image_index : image_index + 1]
            image_index += 1
            example.update(_distillation_fields(row, example, processor.tokenizer, processor.image_size, patch_size))
        else:
            frames = int(batch["input_features_mask"][audio_index].sum())
            example["input_features"] = batch["input_features"][audio_index : audio_index + 1, :, :frames]
            example["input_features_mask"] = batch["input_features_mask"][audio_index : audio_index + 1, :frames]
            audio_index += 1
        examples.append(example)
    return examples


def _distillation_fields(row, example, tokenizer, image_size: int, patch_size: int) -> dict[str, torch.Tensor]:
    """Per-position teacher distributions for two groups of heads: each question token that names a referred object
    (its colour or shape word) targets that object's region, and the position that predicts the answer targets the
    region of the object the answer is about (the first referred object) with the first half of the heads and, when
    the question relates two objects, the object it is located from with the second half; a question naming none
    (`how many shapes are there?`) has every question position target the region of all the referred objects.

    The answer position's targets matter for relations: in "which side of the red circle is the blue square?" a
    reader that pools both named objects equally sees a sum that is symmetric in the two and carries no signal about
    the relation; one group of heads on each object gives the answer position both positions apart (with
    `use_image_position_values`, as two attention-weighted patch coordinates).
    """
    # boxes are in the data's pixels; the processor resized the image to the model's image_size
    scale = image_size / row["image_size"]

    def region(indices):
        boxes = [[round(value * scale) for value in row["objects"][index]["box"]] for index in indices]
        return torch.from_numpy(boxes_to_patch_weights(boxes, image_size, patch_size)).flatten()

    input_ids = example["input_ids"]
    # the question: text positions after the image and before the reply
    is_text = example["mm_token_type_ids"] == 0
    after_image = torch.cumsum(example["mm_token_type_ids"] == 1, dim=0) > 0
    in_prompt = torch.arange(input_ids.shape[0]) < example["prompt_length"]
    question_mask = is_text & after_image & in_prompt
    # (seq_len, head groups, num_patches): both groups share a position's target unless set apart below
    targets = torch.zeros(input_ids.shape[0], _HEAD_GROUPS, (image_size // patch_size) ** 2)
    query_mask = torch.zeros_like(question_mask)
    for position, index in _naming_positions(tokenizer, row, input_ids, question_mask):
        targets[position] = region([index])
        query_mask[position] = True
    if not query_mask.any():
        targets[question_mask] = region(row["referred_objects"])
        query_mask = question_mask
    else:
        referred = row["referred_objects"]
        answer_position = example["prompt_length"] - 1
        targets[answer_position, 0] = region(referred[:1])
        targets[answer_position, 1] = region(referred[1:2] if len(referred) > 1 else referred[:1])
        query_mask[answer_position] = True
    return {"distillation_targets": targets, "distillation_query_mask": query_mask}


def _naming_positions(tokenizer, row, input_ids: torch.Tensor, question_mask: torch.Tensor) -> list[tuple[int, int]]:
    """(position in `input_ids`, object index) of every question token inside a referred object's colour or shape
    word."""
    question = row["question"]
    encoded = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    question_ids = torch.tensor(encoded["input_ids"])
    candidates = question_mask.nonzero().squeeze(-1).tolist()
    start = next(
        (p for p in candidates if torch.equal(input_ids[p : p + len(question_ids)], question_ids)),
        None,
    )
    if start is None:
        raise ValueError(f"the question {question!r} is not in the encoded prompt as the tokenizer alone encodes it")
    words = []  # (first char, end char, object index)
    for index in row["referred_objects"]:
        item = row["objects"][index]
        for word in (item["color"], item["shape"]):
            words += [(match.start(), match.end(), index) for match in re.finditer(rf"\b{word}\b", question)]
    named = []
    for offset, (first, end) in enumerate(encoded["offset_mapping"]):
        for word_first, word_end, index in words:
            if first < word_end and word_first < end:
                named.append((start + offset, index))
    return named


class InstructionCollator:
    """Batches encoded examples for next-token training on the reply: right padding (or packing), media in example
    order.

    Args:
        config (`DeepseekV3MultimodalConfig`): the model's config (`pad_token_id`, placeholders).
        packing_max_tokens (`int`, *optional*, defaults to 0): when above 0, pack whole examples into rows of at
            most this many tokens (`MultimodalPackingCollator`: per-sequence positions and masks, so each example
            keeps its own loss) instead of one right-padded example per row.
    """

    def __init__(self, config: DeepseekV3MultimodalConfig, packing_max_tokens: int = 0):
        if packing_max_tokens:
            self.padding = MultimodalPackingCollator(config, max_tokens_per_row=packing_max_tokens)
        else:
            self.padding = MultimodalPaddingCollator(config)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        keys = ("input_ids", "labels", "mm_token_type_ids", *_MEDIA_KEYS)
        return self.padding([{key: example[key] for key in keys if key in example} for example in examples])


class DistillationCollator(InstructionCollator):
    """`InstructionCollator` plus `distillation_targets` and `distillation_query_mask`.

    An example without targets (an audio question) is batched with no distilled position: it trains on its answer
    alone. A batch without any image example is a plain instruction batch.
    """

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = super().__call__(examples)
        distilled = [example for example in examples if "distillation_targets" in example]
        if not distilled:
            return batch
        length = batch["input_ids"].shape[1]
        target_shape = distilled[0]["distillation_targets"].shape[1:]
        targets, query_masks = [], []
        for example in examples:
            if "distillation_targets" in example:
                target, query_mask = example["distillation_targets"], example["distillation_query_mask"]
            else:
                target = torch.zeros(len(example["input_ids"]), *target_shape)
                query_mask = torch.zeros(
                    len(example["input_ids"]), dtype=distilled[0]["distillation_query_mask"].dtype
                )
            targets.append(F.pad(target, (0, 0, 0, 0, 0, length - len(example["input_ids"]))))
            query_masks.append(F.pad(query_mask, (0, length - len(example["input_ids"]))))
        batch["distillation_targets"] = torch.stack(targets)
        batch["distillation_query_mask"] = torch.stack(query_masks)
        return batch


class ContrastiveCollator:
    """Captions paired with their media: image examples first, then audio, as the contrastive loss expects.

    Args:
        config (`DeepseekV3MultimodalConfig`): the model's config (`pad_token_id`).
    """

    def __init__(self, config: DeepseekV3MultimodalConfig):
        self.pad_token_id = config.pad_token_id

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        ordered = [e for e in examples if "pixel_values" in e] + [e for e in examples if "input_features" in e]
        captions = [example["caption_ids"] for example in ordered]
        longest = max(len(caption) for caption in captions)
        batch = {
            "contrastive_input_ids": torch.stack(
                [F.pad(caption, (0, longest - len(caption)), value=self.pad_token_id) for caption in captions]
            ),
            "contrastive_attention_mask": torch.stack(
                [(torch.arange(longest) < len(caption)).long() for caption in captions]
            ),
        }
        images = [example["pixel_values"] for example in ordered if "pixel_values" in example]
        if images:
            batch["pixel_values"] = torch.cat(images)
        clips = [example for example in ordered if "input_features" in example]
        if clips:
            frames = max(example["input_features"].shape[-1] for example in clips)
            batch["input_features"] = torch.cat(
                [
                    F.pad(example["input_features"], (0, frames - example["input_features"].shape[-1]))
                    for example in clips
                ]
            )
            batch["input_features_mask"] = torch.cat(
                [
                    F.pad(example["input_features_mask"], (0, frames - example["input_features_mask"].shape[-1]))
                    for example in clips
                ]
            )
        return batch
