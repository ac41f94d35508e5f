"""Tests of deepseekv3.data.splits: split sizes, disjoint splits, unique examples and the held-out rows."""

import pytest
from datasets import Image

from deepseekv3.data import build_shapes_dataset, build_tones_dataset, split_held_out
from deepseekv3.data.splits import sample_unique, split_rows


@pytest.mark.parametrize(
    ("num_rows", "split_sizes", "expected"),
    [
        (50, None, {"train": 40, "validation": 5, "test": 5}),
        (11, None, {"train": 9, "validation": 1, "test": 1}),
        (10, {"train": 0.5, "test": 0.5}, {"train": 5, "test": 5}),
        (7, {"train": 1.0, "test": 0.0}, {"train": 7, "test": 0}),
    ],
)
def test_split_rows_cuts_in_order_by_fraction(num_rows, split_sizes, expected):
    splits = split_rows(list(range(num_rows)), split_sizes)
    assert {name: len(rows) for name, rows in splits.items()} == expected
    assert sum(splits.values(), []) == list(range(num_rows))


def test_no_image_or_clip_appears_twice_so_splits_are_disjoint():
    shapes = build_shapes_dataset(200, seed=0, image_size=16)
    images = [
        image["bytes"]
        for split in shapes.values()
        for image in split.cast_column("image", Image(decode=False))["image"]
    ]
    assert len(set(images)) == len(images) == 200
    tones = build_tones_dataset(60, seed=0, clip_seconds=0.25)
    clips = [clip.tobytes() for split in tones.values() for clip in split.with_format("numpy")["audio"]["array"]]
    assert len(set(clips)) == len(clips) == 60


def test_sample_unique_raises_when_examples_run_out():
    with pytest.raises(ValueError, match="could not draw 3 distinct examples"):
        sample_unique(
            3,
            seed=0,
            stream=0,
            sample=lambda rng, index: {"value": int(rng.integers(2))},
            key=lambda example: example["value"],
        )


def test_split_held_out_separates_the_held_out_rows_split_by_split():
    dataset = build_shapes_dataset(50, seed=1)
    seen, held_out = split_held_out(dataset)
    for name, split in dataset.items():
        assert not any(seen[name]["held_out"]) and all(held_out[name]["held_out"])
        assert set(held_out[name]["question_template"]) <= {"color_by_side"}
        assert len(seen[name]) + len(held_out[name]) == len(split)
    assert len(held_out["train"]) == 8  # every fifth row
    assert "color_by_side" not in seen["train"]["question_template"]
