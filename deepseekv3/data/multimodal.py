"""The built-in multimodal data set (shapes and tones in one table) and the text corpus for training the tokenizer.

`build_multimodal_dataset` puts the rows of `build_shapes_dataset` and `build_tones_dataset` in one `datasets.Dataset`
per split, interleaved in a seeded order; each row has both media columns, the one it does not use set to `None`
(`modality` says which is set). Each modality is split on its own before mixing, so every split holds the same share
of images and clips.
"""

from collections.abc import Collection, Mapping

import numpy as np
import pyarrow as pa
from datasets import DatasetDict, Features

from .questions import DEFAULT_HELD_OUT_TEMPLATES, QUESTION_TEMPLATES
from .shapes import SHAPES_FEATURES, build_shapes_dataset, sample_shapes
from .splits import build_dataset_dict
from .tones import TONES_FEATURES, build_tones_dataset, sample_tones

__all__ = ["MULTIMODAL_FEATURES", "build_multimodal_dataset", "build_text_corpus", "with_every_column"]

MULTIMODAL_FEATURES = Features({**SHAPES_FEATURES, **TONES_FEATURES})
_MIX_STREAM = 2


def build_multimodal_dataset(
    num_images: int,
    num_clips: int,
    seed: int = 0,
    image_size: int = 32,
    sampling_rate: int = 16000,
    clip_seconds: float = 1.0,
    split_sizes: Mapping[str, float] | None = None,
    held_out_templates: Collection[str] = DEFAULT_HELD_OUT_TEMPLATES,
) -> DatasetDict:
    """Shapes and tones in one data set, split into train/validation/test.

    Args:
        num_images (`int`): image rows over all splits (as `build_shapes_dataset`'s `num_examples`).
        num_clips (`int`): audio rows over all splits (as `build_tones_dataset`'s `num_examples`).
        seed (`int`, defaults to 0): the same seed gives identical data; the image rows of each split are those of
            `build_shapes_dataset(num_images, seed, ...)`, the audio rows those of `build_tones_dataset`.
        image_size (`int`, defaults to 32): side of the square images.
        sampling_rate (`int`, defaults to 16000): audio samples per second.
        clip_seconds (`float`, defaults to 1.0): length of every clip.
        split_sizes (`Mapping[str, float]`, *optional*): fraction of each modality's rows per split, summing to 1;
            defaults to `{"train": 0.8, "validation": 0.1, "test": 0.1}`.
        held_out_templates (`Collection[str]`, defaults to `("color_by_side",)`): templates whose rows get
            `held_out=True`.

    Returns:
        `DatasetDict` with `MULTIMODAL_FEATURES`: every column of both data sets; `image`, `image_size` and `objects`
        are `None` on audio rows, `audio` and `tones` are `None` on image rows.
    """
    shapes = build_shapes_dataset(
        num_images, seed, image_size, split_sizes=split_sizes, held_out_templates=held_out_templates
    )
    tones = build_tones_dataset(
        num_clips, seed, sampling_rate, clip_seconds, split_sizes=split_sizes, held_out_templates=held_out_templates
    )
    rng = np.random.default_rng([seed, _MIX_STREAM])
    tables = {}
    for name in shapes:
        table = pa.concat_tables(
            [with_every_column(shapes[name].data.table), with_every_column(tones[name].data.table)]
        )
        tables[name] = table.take(rng.permutation(table.num_rows))
    generation = repr(
        ("multimodal", num_images, num_clips, seed, image_size, sampling_rate, clip_seconds, split_sizes)
        + (sorted(held_out_templates),)
    )
    return build_dataset_dict(tables, MULTIMODAL_FEATURES, generation)


def build_text_corpus(num_images: int = 2000, num_clips: int = 1000, seed: int = 0) -> list[str]:
    """Every caption, question and answer of a built-in data set, for training the tokenizer.

    Nothing is drawn or synthesised, so this takes a fraction of a second. Held-out questions are included: the
    tokenizer should know their words even though instruction tuning never shows them.

    Args:
        num_images (`int`, defaults to 2000): image examples to sample text from.
        num_clips (`int`, defaults to 1000): audio examples to sample text from.
        seed (`int`, defaults to 0): the same seed gives the same corpus.

    Returns:
        `list[str]`: the captions, questions and answers in order, then every answer word of every template once
        (so none is missing from a small sample).
    """
    rows = sample_shapes(num_images, seed) + sample_tones(num_clips, seed)
    corpus = [text for row in rows for text in (row["caption"], row["question"], row["answer"])]
    answers = dict.fromkeys(answer for template in QUESTION_TEMPLATES.values() for answer in template.answers)
    return corpus + list(answers)


def with_every_column(table: pa.Table) -> pa.Table:
    """`table` (the rows of one modality) with a null column for every multimodal column it lacks, columns in the
    order of `MULTIMODAL_FEATURES`, so the tables of both modalities concatenate.

    Args:
        table (`pa.Table`): encoded rows of `SHAPES_FEATURES` or `TONES_FEATURES` (`rows_to_table`, or a built-in
            data set's `Dataset.data.table`).

    Returns:
        `pa.Table` with the schema of `MULTIMODAL_FEATURES`.
    """
    columns = [
        table.column(name) if name in table.column_names else pa.nulls(table.num_rows, field.type)
        for name, field in zip(MULTIMODAL_FEATURES.arrow_schema.names, MULTIMODAL_FEATURES.arrow_schema)
    ]
    return pa.table(columns, schema=MULTIMODAL_FEATURES.arrow_schema.remove_metadata())
