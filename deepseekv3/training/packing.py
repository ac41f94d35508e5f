"""Collators for tokenized multimodal examples: packing into fixed token budgets, and plain padding as the baseline.

`MultimodalPackingCollator` places whole examples into rows of at most `max_tokens_per_row` tokens (first-fit
decreasing) and marks the boundaries the way transformers reads them: `position_ids` restart at 0 at every sequence
and no `attention_mask` is returned, so `create_causal_mask` builds a block-diagonal causal mask for eager and sdpa
attention and the model's attention gate restarts its running mean per sequence; `cu_seq_lens_q/k` and
`max_length_q/k` (the varlen kwargs flash attention reads) come on request. The first label of every sequence is
-100, so no sequence is trained to predict the next one's first token. `MultimodalPaddingCollator` pads each
example to the longest of the batch instead. Both concatenate the batch's images and audio clips in the order their
placeholders appear, row by row, as the model expects.

For grouping examples of similar length (fewer pad tokens in padded batches) reuse transformers'
`LengthGroupedSampler`: `length_grouped_sampler` builds one with its own seeded generator, and `Trainer` builds one
itself with `TrainingArguments(train_sampling_strategy="group_by_length")`.
"""

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from transformers import DataCollatorWithFlattening
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
from transformers.trainer_pt_utils import LengthGroupedSampler

from ..configuration_deepseekv3 import DeepseekV3MultimodalConfig

__all__ = [
    "MultimodalPackingCollator",
    "MultimodalPaddingCollator",
    "length_grouped_sampler",
    "pack_first_fit_decreasing",
]

IGNORE_INDEX = -100
_MEDIA_KEYS = ("pixel_values", "input_features", "input_features_mask")


def pack_first_fit_decreasing(lengths: Sequence[int], max_tokens_per_row: int) -> list[list[int]]:
    """Assign examples to rows of at most `max_tokens_per_row` tokens, first-fit decreasing; no example is split.

    Longest first, each example goes into the first row with room for it, else opens a new row. Deterministic: ties
    keep their input order.

    Args:
        lengths (`Sequence[int]`): token count of each example.
        max_tokens_per_row (`int`): the budget of one row.

    Returns:
        `list[list[int]]`: per row, the indices of its examples in ascending order (the order they are laid out in).

    Raises:
        ValueError: an example is longer than the budget, or empty.
    """
    for index, length in enumerate(lengths):
        if length > max_tokens_per_row:
            raise ValueError(
                f"example {index} has {length} tokens, more than max_tokens_per_row ({max_tokens_per_row}); "
                "packing never splits an example: raise the budget or shorten the example"
            )
        if length < 1:
            raise ValueError(f"example {index} is empty (0 tokens)")
    rows: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[index]), None)
        if row is None:
            rows.append([])
            room.append(max_tokens_per_row)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= lengths[index]
    return [sorted(row) for row in rows]


def length_grouped_sampler(lengths: Sequence[int], batch_size: int, seed: int = 0) -> LengthGroupedSampler:
    """transformers' `LengthGroupedSampler` with its own seeded generator: the same seed gives the same order.

    Each epoch draws a random permutation, cuts it into mega-batches of 50 batches (fewer for small data sets) and
    sorts each by length, so consecutive `batch_size` indices have similar lengths; the longest example comes first.

    Args:
        lengths (`Sequence[int]`): token count of each example (`len(input_ids)`, media placeholders included).
        batch_size (`int`): the batch size the grouping is for.
        seed (`int`, defaults to 0): seed of the sampler's generator (independent of the global RNG).

    Returns:
        `LengthGroupedSampler` yielding every index once per epoch.
    """
    generator = torch.Generator().manual_seed(seed)
    return LengthGroupedSampler(batch_size, lengths=list(lengths), generator=generator)


class _MultimodalCollator:
    """Example checks and media concatenation shared by the packing and padding collators."""

    def __init__(self, config: DeepseekV3MultimodalConfig):
        if config.pad_token_id is None:
            raise ValueError("the config has no pad_token_id; the collators need one to fill rows")
        self.config = config

    def _check_example(self, index: int, example: Mapping) -> int:
        """Validate one example; returns its token count."""
        input_ids = torch.as_tensor(example["input_ids"])
        if input_ids.ndim != 1:
            raise ValueError(f"example {index}: input_ids must be 1-D, got shape {tuple(input_ids.shape)}")
        length = input_ids.shape[0]
        if length == 0:
            raise ValueError(f"example {index} is empty (0 tokens)")
        for key in ("labels", "mm_token_type_ids"):
            if key in example and len(example[key]) != length:
                raise ValueError(f"example {index}: {key} has {len(example[key])} entries, input_ids {length}")
        config = self.config
        if config.use_image_input:
            num_images = len(example["pixel_values"]) if example.get("pixel_values") is not None else 0
            self._check_placeholders(index, "image", input_ids, num_images * config.num_image_tokens, num_images)
        if config.use_audio_input:
            valid_frames = _valid_frames(example)
            expected = int(config.get_num_audio_tokens(valid_frames).sum()) if valid_frames is not None else 0
            num_clips = len(valid_frames) if valid_frames is not None else 0
            self._check_placeholders(index, "audio", input_ids, expected, num_clips)
        return length

    def _check_placeholders(
        self, index: int, modality: str, input_ids: torch.Tensor, expected: int, num_items: int
    ) -> None:
        found = int((input_ids == getattr(self.config, f"{modality}_token_id")).sum())
        if found != expected:
            raise ValueError(
                f"example {index} has {found} {modality} placeholder tokens but its {num_items} {modality} "
                f"input(s) need {expected}"
            )

    def _check_batch_keys(self, examples: Sequence[Mapping]) -> None:
        """Optional text keys must be in every example or in none: a partial key would be silently dropped."""
        for key in ("labels", "mm_token_type_ids"):
            present = [key in example for example in examples]
            if any(present) and not all(present):
                raise ValueError(f"{key} is in examples {_indices(present)} but missing from the others")

    @staticmethod
    def _collate_media(examples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        """Images and audio clips of `examples`, concatenated in the given order; clips are zero-padded to the
        longest with `input_features_mask` marking the real frames."""
        media = {}
        images = [torch.as_tensor(e["pixel_values"]) for e in examples if e.get("pixel_values") is not None]
        if images:
            media["pixel_values"] = torch.cat(images)
        clips = [torch.as_tensor(e["input_features"]) for e in examples if e.get("input_features") is not None]
        if clips:
            masks = [_frame_mask(e) for e in examples if e.get("input_features") is not None]
            num_frames = max(clip.shape[-1] for clip in clips)
            # (num_clips, num_mel_bins, frames) and (num_clips, frames), zero beyond each clip's own frames
            media["input_features"] = torch.cat([F.pad(clip, (0, num_frames - clip.shape[-1])) for clip in clips])
            media["input_features_mask"] = torch.cat([F.pad(mask, (0, num_frames - mask.shape[-1])) for mask in masks])
        return media


class MultimodalPackingCollator(_MultimodalCollator):
    """Packs whole tokenized examples into rows of at most `max_tokens_per_row` tokens, with per-sequence boundaries.

    Examples are assigned to rows by [`pack_first_fit_decreasing`] and laid out in each row in their input order.
    The text of each row is flattened by transformers' `DataCollatorWithFlattening` (held, not subclassed: it makes
    one row of the whole batch with no budget and no media, and this collator calls it once per row): `position_ids`
    restart at 0 and the first label of every sequence is -100. Rows are then right-padded to the longest row with
    `pad_token_id`; the pad tail is a sequence of its own (positions 0, 1, ...) labelled -100, so under the
    block-diagonal mask real tokens never see it and it adds nothing to the loss. No `attention_mask` is returned:
    with restarting `position_ids` transformers builds the block-diagonal causal mask itself.

    Args:
        config (`DeepseekV3MultimodalConfig`): the model's config: `pad_token_id`, the media placeholder ids and
            token counts (each example's placeholders are checked against its media), `max_position_embeddings`.
        max_tokens_per_row (`int`): the token budget of one row, at most `config.max_position_embeddings`.
        return_flash_attn_kwargs (`bool`, defaults to `False`): also return `cu_seq_lens_q`, `cu_seq_lens_k`
            (`(num_segments + 1,)` int32 offsets into the rows flattened row-major, pad tails included as segments)
            and `max_length_q`, `max_length_k` (`int`), which transformers' flash-attention path reads to run the
            varlen kernel. Eager and sdpa ignore them.

    Examples are dicts with `input_ids` (1-D), optional `labels` (same length; `input_ids` when absent),
    `mm_token_type_ids` (same length), `pixel_values` `(num_images, channels, size, size)`, `input_features`
    `(num_clips, num_mel_bins, frames)` and `input_features_mask` `(num_clips, frames)`.

    Returns (from `__call__`): `input_ids`, `labels`, `position_ids` `(num_rows, row_len)`, `mm_token_type_ids`
    when the examples have them, the media keys when any example has media, and the flash kwargs when asked.
    """

    def __init__(
        self,
        config: DeepseekV3MultimodalConfig,
        max_tokens_per_row: int,
        return_flash_attn_kwargs: bool = False,
    ):
        super().__init__(config)
        if not 1 <= max_tokens_per_row <= config.max_position_embeddings:
            raise ValueError(
                f"max_tokens_per_row ({max_tokens_per_row}) must be between 1 and the model's "
                f"max_position_embeddings ({config.max_position_embeddings})"
            )
        self.max_tokens_per_row = max_tokens_per_row
        self.return_flash_attn_kwargs = return_flash_attn_kwargs
        self._flatten = DataCollatorWithFlattening(
            return_position_ids=True, separator_id=IGNORE_INDEX, return_tensors="pt"
        )

    def __call__(self, examples: Sequence[Mapping]) -> dict[str, torch.Tensor | int]:
        lengths = [self._check_example(index, example) for index, example in enumerate(examples)]
        self._check_batch_keys(examples)
        rows = pack_first_fit_decreasing(lengths, self.max_tokens_per_row)
        row_length = max(sum(lengths[i] for i in row) for row in rows)
        text = {"input_ids": [], "labels": [], "position_ids": []}
        with_modality_ids = "mm_token_type_ids" in examples[0]
        if with_modality_ids:
            text["mm_token_type_ids"] = []
        for row in rows:
            fields = [_text_fields(examples[i]) for i in row]
            # DataCollatorWithFlattening reads only input_ids and labels: (1, tokens in row) each
            flat = self._flatten([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in fields])
            pad_length = row_length - flat["input_ids"].shape[1]
            text["input_ids"].append(F.pad(flat["input_ids"][0], (0, pad_length), value=self.config.pad_token_id))
            text["labels"].append(F.pad(flat["labels"][0], (0, pad_length), value=IGNORE_INDEX))
            # the pad tail restarts at 0: a sequence of its own, invisible to the real tokens before it
            text["position_ids"].append(torch.cat([flat["position_ids"][0], torch.arange(pad_length)]))
            if with_modality_ids:
                modality_ids = torch.cat([f["mm_token_type_ids"] for f in fields])
                text["mm_token_type_ids"].append(F.pad(modality_ids, (0, pad_length)))  # pad is text (0)
        batch = {key: torch.stack(values) for key, values in text.items()}
        batch.update(self._collate_media([examples[i] for row in rows for i in row]))
        if self.return_flash_attn_kwargs:
            # transformers' own derivation from the position ids: every sequence and every pad tail restarts at 0
            (cu_seq_lens_q, cu_seq_lens_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
            batch.update(
                {
                    "cu_seq_lens_q": cu_seq_lens_q,
                    "cu_seq_lens_k": cu_seq_lens_k,
                    "max_length_q": int(max_q),
                    "max_length_k": int(max_k),
                }
            )
        return batch


class MultimodalPaddingCollator(_MultimodalCollator):
    """Pads tokenized examples on the right to the longest of the batch: one example per row (the unpacked baseline).

    Args:
        config (`DeepseekV3MultimodalConfig`): the model's config (`pad_token_id`, media placeholders).

    Returns (from `__call__`): `input_ids`, `attention_mask`, `labels` (-100 on padding) `(batch, longest)`,
    `mm_token_type_ids` when the examples have them, and the media keys, concatenated in example order.
    """

    def __call__(self, examples: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        lengths = [self._check_example(index, example) for index, example in enumerate(examples)]
        self._check_batch_keys(examples)
        longest = max(lengths)
        rows = [_text_fields(example) for example in examples]
        pad_values = {"input_ids": self.config.pad_token_id, "labels": IGNORE_INDEX, "mm_token_type_ids": 0}
        batch = {
            key: torch.stack([F.pad(row[key], (0, longest - row[key].shape[0]), value=pad_value) for row in rows])
            for key, pad_value in pad_values.items()
            if key in rows[0]
        }
        batch["attention_mask"] = (torch.arange(longest) < torch.tensor(lengths)[:, None]).long()
        batch.update(self._collate_media(examples))
        return batch


def _text_fields(example: Mapping) -> dict[str, torch.Tensor]:
    """`input_ids`, `labels` (a copy of `input_ids` when absent) and, when present, `mm_token_type_ids`, as 1-D
    int64 tensors."""
    fields = {"input_ids": torch.as_tensor(example["input_ids"]).long()}
    fields["labels"] = torch.as_tensor(example["labels"]).long() if "labels" in example else fields["input_ids"]
    if "mm_token_type_ids" in example:
        fields["mm_token_type_ids"] = torch.as_tensor(example["mm_token_type_ids"]).long()
    return fields


def _valid_frames(example: Mapping) -> torch.Tensor | None:
    """`(num_clips,)` real-frame count of each of the example's clips, or None without audio."""
    if example.get("input_features") is None:
        return None
    return _frame_mask(example).sum(dim=-1)


def _frame_mask(example: Mapping) -> torch.Tensor:
    """`(num_clips, frames)` int64 mask of the example's real audio frames (all frames when it has no mask)."""
    features = torch.as_tensor(example["input_features"])
    if example.get("input_features_mask") is None:
        return torch.ones(features.shape[0], features.shape[-1], dtype=torch.long)
    return torch.as_tensor(example["input_features_mask"]).long()


def _indices(flags: Sequence[bool]) -> list[int]:
    return [index for index, flag in enumerate(flags) if flag]
