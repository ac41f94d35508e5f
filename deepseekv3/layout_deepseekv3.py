"""Token layout of the processor's output: where each image and clip sits, truncation, padding, modality ids.

The processor tokenizes its expanded text without truncating or padding; these functions then work on the token rows
(`{"input_ids": [[...], ...], "attention_mask": [[...], ...], ...}`, one list per sample) so that truncation never
cuts through an image or clip, media that no longer fit are dropped with their `pixel_values` / `input_features` rows,
and every row is padded the same way.

Part of the hub-portable core: `processing_deepseekv3.py` imports it with a single dot, so `save_pretrained` copies it
next to the weights. It imports only the standard library and the configuration.
"""

from collections.abc import Iterable

from .configuration_deepseekv3 import AUDIO_MODALITY_ID, IMAGE_MODALITY_ID, TEXT_MODALITY_ID

__all__ = ["media_spans", "modality_ids", "pad_rows", "truncate_rows"]


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
