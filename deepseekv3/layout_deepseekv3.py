"""Token layout of the processor's output: where each image and clip sits, truncation, padding, modality ids.

The processor tokenizes its expanded text without truncating or padding; these functions then work on the token rows
(`{"input_ids": [[...], ...], "attention_mask": [[...], ...], ...}`, one list per sample) so that truncation never
cuts through an image or clip, media that no longer fit are dropped with their `pixel_values` / `input_features` rows,
and every row is padded the same way (`lay_out_rows` does all of it). The checks that the placeholder tokens and the
sizes they depend on agree with the tokenizer and the model's config, and the labels of assistant-only training, live
here too.

Part of the hub-portable core: `processing_deepseekv3.py` imports it with a single dot, so `save_pretrained` copies it
next to the weights. It imports only the standard library, numpy, torch, transformers and the configuration.
"""

from collections.abc import Iterable

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase
from transformers.processing_utils import ProcessorMixin

from .configuration_deepseekv3 import (
    AUDIO_MODALITY_ID,
    IMAGE_MODALITY_ID,
    TEXT_MODALITY_ID,
    DeepseekV3MultimodalConfig,
)

__all__ = [
    "MEDIA_TRUNCATION_CHOICES",
    "assistant_labels",
    "check_layout_sizes",
    "check_media_truncation",
    "check_processor_matches_config",
    "lay_out_rows",
    "media_spans",
    "modality_ids",
    "pad_rows",
    "placeholder_token_ids",
    "truncate_rows",
]

MEDIA_TRUNCATION_CHOICES = ("error", "drop")


def placeholder_token_ids(tokenizer: PreTrainedTokenizerBase, image_token: str, audio_token: str) -> tuple[int, int]:
    """The ids of the image and audio placeholders in `tokenizer`'s vocabulary.

    Raises:
        `ValueError`: naming the placeholder the tokenizer does not know as a token.
    """
    token_ids = []
    for name, token in (("image_token", image_token), ("audio_token", audio_token)):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id or token not in tokenizer.get_vocab():
            raise ValueError(f"{name} ({token!r}) is not a token of the tokenizer")
        token_ids.append(token_id)
    return token_ids[0], token_ids[1]


def check_layout_sizes(
    image_size_setting: dict[str, int], patch_size: int, audio_conv_stride: int, audio_max_frames: int
) -> None:
    """Raise `ValueError` unless the image processor's `size` is square with a side `patch_size` divides, and
    `audio_conv_stride` divides `audio_max_frames`: every image and clip then fills a whole number of tokens."""
    image_size = image_size_setting["height"]
    if image_size_setting.get("width", image_size) != image_size:
        raise ValueError(f"the image processor's size ({image_size_setting}) must be square")
    if image_size % patch_size != 0:
        raise ValueError(f"patch_size ({patch_size}) must divide image_size ({image_size})")
    if audio_max_frames % audio_conv_stride != 0:
        raise ValueError(f"audio_conv_stride ({audio_conv_stride}) must divide audio_max_frames ({audio_max_frames})")


def check_processor_matches_config(processor: ProcessorMixin, config: DeepseekV3MultimodalConfig) -> None:
    """Raise `ValueError` if `processor` (a `DeepseekV3MultimodalProcessor`) would produce inputs the model of
    `config` cannot read: a vocabulary larger than `vocab_size`, or a special-token id or a size the placeholder
    counts depend on that differs from the config's."""
    tokenizer = processor.tokenizer
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}: "
            f"ids >= {config.vocab_size} have no embedding; build the config with vocab_size >= {len(tokenizer)}"
        )
    pairs = {
        "pad_token_id": (tokenizer.pad_token_id, config.pad_token_id),
        "bos_token_id": (tokenizer.bos_token_id, config.bos_token_id),
        "eos_token_id": (tokenizer.eos_token_id, config.eos_token_id),
        "image_token_id": (processor.image_token_id, config.image_token_id),
        "audio_token_id": (processor.audio_token_id, config.audio_token_id),
        "image_size": (processor.image_size, config.image_size),
        "patch_size": (processor.patch_size, config.patch_size),
        "num_mel_bins": (processor.feature_extractor.feature_size, config.num_mel_bins),
        "audio_conv_stride": (processor.audio_conv_stride, config.audio_conv_stride),
        "audio_max_frames": (processor.audio_max_frames, config.audio_max_frames),
    }
    for name, (processor_value, config_value) in pairs.items():
        if config_value is not None and processor_value != config_value:
            raise ValueError(f"config.{name} ({config_value}) differs from the processor's ({processor_value})")


def check_media_truncation(media_truncation: str) -> None:
    """Raise `ValueError` unless `media_truncation` is one of `MEDIA_TRUNCATION_CHOICES`."""
    if media_truncation not in MEDIA_TRUNCATION_CHOICES:
        raise ValueError(f"media_truncation ({media_truncation!r}) must be one of {MEDIA_TRUNCATION_CHOICES}")


def lay_out_rows(
    rows: dict[str, list[list]],
    media: dict,
    image_token_id: int,
    audio_token_id: int,
    num_image_tokens: int,
    audio_conv_stride: int,
    pad_token_id: int,
    padding_side: str,
    truncation_side: str,
    media_truncation: str,
    return_tensors: str | None = None,
    padding: bool | str | None = None,
    truncation: bool | str | None = None,
    max_length: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> tuple[dict[str, list[list]], dict]:
    """Truncate without cutting a media span (`truncate_rows`), add `mm_token_type_ids`, pad (`pad_rows`).

    Args:
        rows (`dict[str, list[list]]`): the tokenizer's unpadded, untruncated `input_ids`, `attention_mask` and
            `offset_mapping` rows.
        media (`dict`): the processed `pixel_values`, `input_features` and `input_features_mask` numpy arrays.
        image_token_id, audio_token_id (`int`): the placeholder ids.
        num_image_tokens (`int`): placeholder tokens per image.
        audio_conv_stride (`int`): frames per audio token.
        pad_token_id, padding_side, truncation_side, media_truncation, return_tensors, padding, max_length,
            pad_to_multiple_of: as in `truncate_rows` and `pad_rows`.
        truncation (`bool` or `str`, *optional*): `True`, `"longest_first"` or `"only_first"` truncate to
            `max_length`; `None`, `False` or `"do_not_truncate"` keep every token.

    Returns:
        `tuple[dict, dict]`: the rows with `mm_token_type_ids`, and the media that were kept.
    """
    if truncation not in (None, False, "do_not_truncate") and max_length is not None:
        if truncation not in (True, "longest_first", "only_first"):
            raise ValueError(f"truncation ({truncation!r}) must be True, False, 'longest_first' or 'only_first'")
        clip_tokens = [
            int(frames) // audio_conv_stride for frames in media.get("input_features_mask", np.zeros((0, 1))).sum(-1)
        ]
        spans = media_spans(rows["input_ids"], image_token_id, audio_token_id, num_image_tokens, clip_tokens)
        rows, media = truncate_rows(rows, media, spans, max_length, truncation_side, media_truncation)
    rows["mm_token_type_ids"] = [
        modality_ids(input_ids, image_token_id, audio_token_id) for input_ids in rows["input_ids"]
    ]
    rows = pad_rows(
        rows,
        pad_token_id,
        padding_side,
        padding=padding,
        max_length=max_length,
        pad_to_multiple_of=pad_to_multiple_of,
        return_tensors=return_tensors,
    )
    return rows, media


def assistant_labels(
    input_ids: torch.Tensor | list[list[int]], assistant_masks: torch.Tensor | list[list[int]]
) -> torch.Tensor:
    """Labels for "train on assistant turns only": `input_ids` where `assistant_masks` is 1, -100 elsewhere.

    Args:
        input_ids (`torch.Tensor` or `list[list[int]]`): `(batch, seq_len)`.
        assistant_masks (`torch.Tensor` or `list[list[int]]`): `(batch, seq_len)`, 1 on assistant tokens.

    Returns:
        `torch.Tensor`: `(batch, seq_len)` long labels.
    """
    input_ids = torch.as_tensor(input_ids, dtype=torch.long)
    assistant_masks = torch.as_tensor(assistant_masks)
    if input_ids.shape != assistant_masks.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and assistant_masks {tuple(assistant_masks.shape)} must match"
        )
    return input_ids.masked_fill(assistant_masks == 0, -100)


def media_spans(
    rows_input_ids: list[list[int]],
    image_token_id: int,
    audio_token_id: int,
    num_image_tokens: int,
    clip_tokens: Iterable[int],
) -> list[list[tuple[int, int, str]]]:
    """Find every image and clip in a batch of token rows.

    Args:
        rows_input_ids (`list[list[int]]`): the token ids, one list per sample.
        image_token_id (`int`): the image placeholder id.
        audio_token_id (`int`): the audio placeholder id.
        num_image_tokens (`int`): placeholder tokens per image; a run of adjacent images splits every this many.
        clip_tokens (`Iterable[int]`): placeholder tokens of each clip, in order through the batch; a run of
            adjacent clips splits by these counts.

    Returns:
        `list[list[tuple[int, int, str]]]`: per row, `(start, end, kind)` of each image or clip in order, `kind`
        `"image"` or `"audio"`.
    """
    clip_iter = iter(clip_tokens)
    rows_spans = []
    for input_ids in rows_input_ids:
        spans = []
        position = 0
        while position < len(input_ids):
            token_id = input_ids[position]
            if token_id not in (image_token_id, audio_token_id):
                position += 1
                continue
            end = position
            while end < len(input_ids) and input_ids[end] == token_id:
                end += 1
            if token_id == image_token_id:
                spans.extend(
                    (start, start + num_image_tokens, "image") for start in range(position, end, num_image_tokens)
                )
            else:
                start = position
                while start < end:
                    length = next(clip_iter)
                    spans.append((start, start + length, "audio"))
                    start += length
            position = end
        rows_spans.append(spans)
    return rows_spans


def truncate_rows(
    rows: dict[str, list[list]],
    media: dict,
    rows_spans: list[list[tuple[int, int, str]]],
    max_length: int,
    truncation_side: str,
    media_truncation: str,
) -> tuple[dict[str, list[list]], dict]:
    """Cut every row to `max_length` tokens without cutting a media span; drop or refuse media that do not fit.

    Args:
        rows (`dict[str, list[list]]`): the token rows (`input_ids`, `attention_mask`, ...); cut in place.
        media (`dict`): `pixel_values` `(num_images, ...)`, `input_features` `(num_clips, num_mel_bins, frames)` and
            `input_features_mask` `(num_clips, frames)` numpy arrays, each optional.
        rows_spans (`list[list[tuple[int, int, str]]]`): the media spans of each row, from `media_spans`.
        max_length (`int`): the most tokens a row keeps.
        truncation_side (`str`): `"right"` removes tokens from the end, `"left"` from the start.
        media_truncation (`str`): `"error"` raises when an image or clip would lose tokens; `"drop"` removes every
            image or clip that does not fit whole, with its tokens and its media row.

    Returns:
        `tuple[dict, dict]`: the cut rows, and `media` without the rows of dropped images and clips (and without a
        key whose media were all dropped); `input_features` shrinks to the longest clip kept.
    """
    kept = {"image": [], "audio": []}
    seen = {"image": 0, "audio": 0}
    for row_index, spans in enumerate(rows_spans):
        start, stop = _truncation_window(
            spans, len(rows["input_ids"][row_index]), max_length, truncation_side, media_truncation, row_index
        )
        for span_start, span_end, kind in spans:
            if start <= span_start and span_end <= stop:
                kept[kind].append(seen[kind])
            seen[kind] += 1
        for key in rows:
            rows[key][row_index] = rows[key][row_index][start:stop]
    return rows, _select_media(media, kept["image"], kept["audio"])


def modality_ids(input_ids: list[int], image_token_id: int, audio_token_id: int) -> list[int]:
    """The modality id of each token: `IMAGE_MODALITY_ID` / `AUDIO_MODALITY_ID` on placeholders, text elsewhere."""
    by_token = {image_token_id: IMAGE_MODALITY_ID, audio_token_id: AUDIO_MODALITY_ID}
    return [by_token.get(token_id, TEXT_MODALITY_ID) for token_id in input_ids]


def pad_rows(
    rows: dict[str, list[list]],
    pad_token_id: int,
    padding_side: str,
    padding: bool | str | None = None,
    max_length: int | None = None,
    pad_to_multiple_of: int | None = None,
    return_tensors: str | None = None,
) -> dict[str, list[list]]:
    """Pad every row on `padding_side` to the longest row or to `max_length`.

    Args:
        rows (`dict[str, list[list]]`): `input_ids`, `attention_mask`, `mm_token_type_ids` and `offset_mapping`
            rows, each optional but `input_ids`.
        pad_token_id (`int`): the filler of `input_ids`; `attention_mask` gets 0, `mm_token_type_ids` text.
        padding_side (`str`): `"left"` or `"right"`.
        padding (`bool` or `str`, *optional*): `True` / `"longest"`, `"max_length"`, or `None` / `False` /
            `"do_not_pad"`.
        max_length (`int`, *optional*): the target of `padding="max_length"` (longer rows stay as they are).
        pad_to_multiple_of (`int`, *optional*): round the padded length up to a multiple of this.
        return_tensors (`str`, *optional*): without padding, rows of different lengths cannot become tensors.

    Returns:
        `dict[str, list[list]]`: the padded rows (`rows` itself when `padding` is off).
    """
    lengths = [len(ids) for ids in rows["input_ids"]]
    if padding in (None, False, "do_not_pad"):
        if return_tensors is not None and len(set(lengths)) > 1:
            raise ValueError(f"the samples have different lengths ({lengths}); pass padding=True to return tensors")
        return rows
    if padding in (True, "longest"):
        target = max(lengths)
    elif padding == "max_length":
        if max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        target = max(max_length, max(lengths))
    else:
        raise ValueError(f"padding ({padding!r}) must be True, False, 'longest', 'max_length' or 'do_not_pad'")
    if pad_to_multiple_of:
        target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side ({padding_side!r}) must be 'left' or 'right'")
    pad_values = {
        "input_ids": pad_token_id,
        "attention_mask": 0,
        "mm_token_type_ids": TEXT_MODALITY_ID,
        "offset_mapping": (0, 0),
    }
    padded = {}
    for key, values in rows.items():
        padded[key] = []
        for row in values:
            filler = [pad_values[key]] * (target - len(row))
            padded[key].append(filler + list(row) if padding_side == "left" else list(row) + filler)
    return padded


def _truncation_window(
    spans: list[tuple[int, int, str]],
    length: int,
    max_length: int,
    truncation_side: str,
    media_truncation: str,
    row_index: int,
) -> tuple[int, int]:
    """`(start, stop)` of the tokens a row of `length` keeps: at most `max_length`, no media span cut in two."""
    start, stop = (0, min(length, max_length)) if truncation_side == "right" else (max(0, length - max_length), length)
    for span_start, span_end, kind in spans:
        fits = start <= span_start and span_end <= stop
        cut = span_start < stop < span_end if truncation_side == "right" else span_start < start < span_end
        if not fits and media_truncation == "error":
            raise ValueError(
                f"truncation to max_length ({max_length}) would remove {'part of ' if cut else ''}the {kind} "
                f"at tokens [{span_start}, {span_end}) of sample {row_index} ({length} tokens); raise "
                "max_length or pass media_truncation='drop'"
            )
        if cut and truncation_side == "right":
            stop = span_start
        elif cut:
            start = span_end
    return start, stop


def _select_media(media: dict, kept_images: list[int], kept_clips: list[int]) -> dict:
    """`media` with only the images and clips at the kept indices; a key whose media were all dropped is removed."""
    media = dict(media)
    if "pixel_values" in media:
        media["pixel_values"] = media["pixel_values"][kept_images]
        if not kept_images:
            del media["pixel_values"]
    if "input_features" in media:
        if kept_clips:
            mask = media["input_features_mask"][kept_clips]
            frames = int(mask.sum(-1).max())
            media["input_features"] = media["input_features"][kept_clips, :, :frames]
            media["input_features_mask"] = mask[:, :frames]
        else:
            del media["input_features"], media["input_features_mask"]
    return media
