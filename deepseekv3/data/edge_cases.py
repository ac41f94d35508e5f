"""Edge cases of the built-in data: the rows its balance leaves rare, as a data set to mix into the core splits.

The core data (`build_multimodal_dataset`) is balanced by design: templates take turns, scenes hold one to three
objects anywhere in the image, and clips hold one to three evenly spaced tones (each a fifth of the clip, with 8% of
the clip's silence between two tones). `build_edge_cases` builds the long tail it lacks, with the same columns
(`MULTIMODAL_FEATURES`), so that `mix_datasets(core["train"], edge["train"], edge_fraction=0.2)` gives it a fixed
share. Its rows are of three kinds, `EDGE_CASE_KINDS`:

- `three_objects`: scenes of exactly three objects, the hardest scenes: the most objects to count, and besides the
  pair a `spatial` or `color_by_side` question is about, a third object to tell apart from them. Core scenes hold one
  to three objects, three in 40% of them (a third of the `color`, `shape` and `count` scenes, half of the `spatial`
  and `color_by_side` ones).
- `border`: scenes in which every object touches a side of the image (`touch_border=True`). There an object fills
  patches that the image's content covers only partly: the overlapping windows of the convolutional stem
  (`image_conv_stem_channels`, which the demo's model has) reach half a patch past the edge into zero padding, as
  its 3x3 convolutions do, so an object at the border is seen by fewer windows, and by part-empty ones. In core
  scenes 23% of the objects touch a side, and every object of only 5% of the scenes. Border scenes hold two or three
  objects (half each): one object alone against a side has too few scenes to stay apart from the core (about 4,500
  at 32 pixels, of which the demo's 9,400 core images of the time showed about 300).
- `close_onsets`: clips of three tones back to back, with no silence between them (`gap_fraction=0`). Core clips
  always leave 8% of the clip silent between two tones, so counting and ordering tones can lean on the gaps; here
  only the change of pitch and the tones' 10 ms fades mark where one ends and the next begins.

The close-onset clips also serve the rarest templates of the demo's mix: its 20,000 images over 5 image templates
against 4,000 clips over 3 audio templates make 4,000 rows per image template but 1,333 per audio template, so the
audio templates are the rarest, and the edge set gives them rows of their own.

Edge rows stay apart from the core rows of the same seed: by construction for clips, since a core clip's tones are
always apart, and in practice for scenes. Each kind draws from random streams of its own under the seed, apart from
the core data's (`sample_unique`), among scenes of two or three objects, too many to repeat: none of 8,300 border
scenes and none of 8,300 three-object scenes was among 20,000 core images, for each of three seeds. Every template
is asked as in the core builders, held-out templates flagged `held_out=True`.
"""

import itertools
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import DatasetDict

from .multimodal import MULTIMODAL_FEATURES, with_every_column
from .questions import DEFAULT_HELD_OUT_TEMPLATES
from .shapes import SHAPES_FEATURES, draw_shapes, sample_shapes
from .splits import DEFAULT_SPLIT_SIZES, build_dataset_dict, rows_to_table, split_rows
from .tones import TONES_FEATURES, sample_tones, synthesize_tones

__all__ = ["EDGE_CASE_KINDS", "build_edge_cases"]

EDGE_CASE_KINDS = ("three_objects", "border", "close_onsets")
# Random streams under the seed: 0, 1 and 2 are the core data's (shapes, tones, the multimodal mix).
_THREE_OBJECTS_STREAM, _BORDER_STREAMS, _CLOSE_ONSETS_STREAM, _MIX_STREAM = 3, (4, 5), 6, 7


def build_edge_cases(
    num_images: int,
    num_clips: int,
    seed: int = 0,
    image_size: int = 32,
    sampling_rate: int = 16000,
    clip_seconds: float = 1.0,
    split_sizes: Mapping[str, float] | None = None,
    held_out_templates: Collection[str] = DEFAULT_HELD_OUT_TEMPLATES,
) -> DatasetDict:
    """The edge cases of `EDGE_CASE_KINDS` in one data set, split into train/validation/test like the core data.

    Args:
        num_images (`int`): image rows over all splits: half of them (rounded down) `three_objects` scenes, the rest
            `border` scenes (of two objects and of three, in turn). `0` for no images; otherwise at least twice the
            number of splits.
        num_clips (`int`): audio rows over all splits, all `close_onsets` clips. `0` for no clips; otherwise at least
            the number of splits.
        seed (`int`, defaults to 0): the same seed gives identical data. The rows differ from those of
            `build_multimodal_dataset` with the same seed: each kind draws from a random stream of its own.
        image_size (`int`, defaults to 32): side of the square images.
        sampling_rate (`int`, defaults to 16000): audio samples per second.
        clip_seconds (`float`, defaults to 1.0): length of every clip.
        split_sizes (`Mapping[str, float]`, *optional*): fraction of each kind's rows per split, summing to 1;
            defaults to `{"train": 0.8, "validation": 0.1, "test": 0.1}`. Each kind is split on its own, so every
            split holds the same share of each kind.
        held_out_templates (`Collection[str]`, defaults to `("color_by_side",)`): templates whose rows get
            `held_out=True`.

    Returns:
        `DatasetDict` with `MULTIMODAL_FEATURES`, the columns and types of `build_multimodal_dataset` (which
        `mix_datasets` checks): `image`, `image_size` and `objects` are `None` on audio rows, `audio` and `tones` on
        image rows. The rows of each split are shuffled (seeded); no column names the kind, which the content shows.

    Raises:
        `ValueError`: negative sizes, no rows at all, a kind too small to give every split a row, or the arguments
            the core builders reject.
    """
    num_splits = len(DEFAULT_SPLIT_SIZES if split_sizes is None else split_sizes)
    if num_images < 0 or num_clips < 0 or num_images + num_clips == 0:
        raise ValueError(f"num_images ({num_images}) and num_clips ({num_clips}) must be >= 0, and not both 0")
    if 0 < num_images < 2 * num_splits:
        raise ValueError(
            f"num_images ({num_images}) must be 0 or at least {2 * num_splits}: its two kinds (three_objects, border) "
            f"are each split on their own into {num_splits} splits"
        )
    if 0 < num_clips < num_splits:
        raise ValueError(f"num_clips ({num_clips}) must be 0 or at least the number of splits ({num_splits})")
    rows = _sample_kinds(num_images, num_clips, seed, image_size, sampling_rate, clip_seconds, held_out_templates)
    num_samples = round(clip_seconds * sampling_rate)
    parts: dict[str, list[pa.Table]] = {}
    for kind_rows in rows.values():
        if not kind_rows:
            continue
        for row in kind_rows:
            if row["modality"] == "image":
                row["image"] = draw_shapes(row["objects"], image_size)
            else:
                waveform = synthesize_tones(row["tones"], num_samples, sampling_rate)
                row["audio"] = {"array": waveform, "sampling_rate": sampling_rate}
        features = SHAPES_FEATURES if kind_rows[0]["modality"] == "image" else TONES_FEATURES
        for name, split in split_rows(kind_rows, split_sizes).items():
            parts.setdefault(name, []).append(with_every_column(rows_to_table(split, features)))
    rng = np.random.default_rng([seed, _MIX_STREAM])
    tables = {}
    for name, tables_of_kinds in parts.items():
        table = pa.concat_tables(tables_of_kinds)
        tables[name] = table.take(rng.permutation(table.num_rows))
    generation = repr(
        ("edge_cases", num_images, num_clips, seed, image_size, sampling_rate, clip_seconds, split_sizes)
        + (sorted(held_out_templates),)
    )
    return build_dataset_dict(tables, MULTIMODAL_FEATURES, generation)


def _sample_kinds(
    num_images: int,
    num_clips: int,
    seed: int,
    image_size: int,
    sampling_rate: int,
    clip_seconds: float,
    held_out_templates: Collection[str],
) -> dict[str, list[dict[str, Any]]]:
    """The rows of each of `EDGE_CASE_KINDS`, in order, without images or waveforms."""
    num_three = num_images // 2
    num_border = num_images - num_three
    image_kwargs = {"seed": seed, "image_size": image_size, "held_out_templates": held_out_templates}
    three_objects = sample_shapes(num_three, **image_kwargs, num_objects=3, stream=_THREE_OBJECTS_STREAM)
    # Two objects and three in turn (the first of them one more when odd), so every split holds both alike.
    two, three = (
        sample_shapes(count, **image_kwargs, num_objects=num_objects, touch_border=True, stream=stream)
        for count, num_objects, stream in zip((num_border - num_border // 2, num_border // 2), (2, 3), _BORDER_STREAMS)
    )
    border = [row for pair in itertools.zip_longest(two, three) for row in pair if row is not None]
    close_onsets = sample_tones(
        num_clips,
        seed,
        sampling_rate,
        clip_seconds,
        held_out_templates=held_out_templates,
        num_tones=3,
        gap_fraction=0.0,
        stream=_CLOSE_ONSETS_STREAM,
    )
    return {"three_objects": three_objects, "border": border, "close_onsets": close_onsets}
