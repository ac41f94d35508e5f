"""Tests of deepseekv3.data.edge_cases: each kind is what it says, split evenly, apart from the core, mixable."""

import collections

import numpy as np
import pytest

import deepseekv3.data
from deepseekv3.data import (
    EDGE_CASE_KINDS,
    MULTIMODAL_FEATURES,
    QUESTION_TEMPLATES,
    build_edge_cases,
    build_multimodal_dataset,
    mix_datasets,
)
from deepseekv3.data.edge_cases import _sample_kinds
from deepseekv3.data.splits import split_rows

# 0.3 s clips keep the audio small; a tone is 1,440 samples at 16 kHz.
_CLIP_SECONDS = 0.3
_SPLIT_SHARES = {"train": 0.8, "validation": 0.1, "test": 0.1}


@pytest.fixture(scope="module")
def edge():
    return build_edge_cases(100, 40, seed=3, clip_seconds=_CLIP_SECONDS)


@pytest.fixture(scope="module")
def core_and_edge():
    """A core data set and edge cases of the same seed (small, so the comparison stays quick)."""
    core = build_multimodal_dataset(400, 150, seed=0, clip_seconds=_CLIP_SECONDS)
    return core, build_edge_cases(200, 80, seed=0, clip_seconds=_CLIP_SECONDS)


def _content(row: dict) -> tuple:
    """What a row shows: its scene or its tone layout (what makes two images or two clips the same)."""
    if row["modality"] == "image":
        return ("image",) + tuple((item["color"], item["shape"], tuple(item["box"])) for item in row["objects"])
    return ("audio",) + tuple((tone["pitch"], tone["start"], tone["end"]) for tone in row["tones"])


def _touches_border(box: list[int], image_size: int) -> bool:
    return box[0] == 0 or box[1] == 0 or box[2] == image_size or box[3] == image_size


def test_the_kinds_are_exported_and_the_helper_is_not():
    assert EDGE_CASE_KINDS == ("three_objects", "border", "close_onsets")
    assert {"EDGE_CASE_KINDS", "build_edge_cases"} <= set(deepseekv3.data.__all__)
    assert "with_every_column" not in deepseekv3.data.__all__


def test_every_split_has_the_multimodal_columns_and_types(edge, core_and_edge):
    core, _ = core_and_edge
    assert list(edge) == ["train", "validation", "test"]
    for name, split in edge.items():
        assert split.features == MULTIMODAL_FEATURES
        assert split.column_names == core[name].column_names
        assert split.data.schema == core[name].data.schema
        images = [row for row in split if row["modality"] == "image"]
        clips = [row for row in split if row["modality"] == "audio"]
        assert all(row["audio"] is None and row["tones"] is None and row["image"] is not None for row in images)
        assert all(row["image"] is None and row["objects"] is None and row["audio"] is not None for row in clips)


def test_every_row_is_an_edge_case_of_its_kind(edge):
    sampling_rate, num_samples = 16000, round(_CLIP_SECONDS * 16000)
    for row in edge["train"]:
        if row["modality"] == "image":
            boxes = [item["box"] for item in row["objects"]]
            # three_objects: three objects; border: two or three objects, every one against a side.
            assert len(boxes) == 3 or (len(boxes) == 2 and all(_touches_border(box, 32) for box in boxes))
            assert row["image"].size == (32, 32)
        else:
            tones = row["tones"]
            assert len(tones) == 3 and all(tone["end"] - tone["start"] == num_samples // 5 for tone in tones)
            assert all(later["start"] == earlier["end"] for earlier, later in zip(tones, tones[1:]))
            waveform = np.asarray(row["audio"]["array"])
            assert waveform.shape == (num_samples,) and row["audio"]["sampling_rate"] == sampling_rate
            # Sound from the first onset to the last end: no 5 ms of silence (the gap of core clips is 23 ms here).
            loud = np.flatnonzero(np.abs(waveform) > 1e-6)
            assert loud[0] == tones[0]["start"] + 1 and loud[-1] == tones[-1]["end"] - 2
            assert np.diff(loud).max() < 0.005 * sampling_rate


@pytest.mark.parametrize(("num_images", "num_clips"), [(100, 40), (61, 23)])
def test_each_kind_is_split_on_its_own_in_the_split_shares(num_images, num_clips):
    dataset = build_edge_cases(num_images, num_clips, seed=3, clip_seconds=_CLIP_SECONDS)
    kinds = _sample_kinds(num_images, num_clips, 3, 32, 16000, _CLIP_SECONDS, ("color_by_side",))
    assert [len(kinds[kind]) for kind in EDGE_CASE_KINDS] == [num_images // 2, num_images - num_images // 2, num_clips]
    assert all(len(row["objects"]) == 3 for row in kinds["three_objects"])
    assert collections.Counter(len(row["objects"]) for row in kinds["border"]) == {
        2: num_images - num_images // 2 - (num_images - num_images // 2) // 2,
        3: (num_images - num_images // 2) // 2,
    }
    expected = collections.defaultdict(collections.Counter)
    for kind in EDGE_CASE_KINDS:
        for name, rows in split_rows(kinds[kind], None).items():
            expected[name].update({(kind, _content(row)): 1 for row in rows})
            # The split's share of each kind, to the row (leftovers of rounding go to train).
            if name != "train":
                assert len(rows) == round(_SPLIT_SHARES[name] * len(kinds[kind]))
    kind_of = {content: kind for counter in expected.values() for kind, content in counter}
    for name, split in dataset.items():
        found = collections.Counter((kind_of[_content(row)], _content(row)) for row in split)
        assert found == expected[name]


def test_the_rows_of_a_split_are_shuffled_not_grouped_by_kind(edge):
    modalities = edge["train"]["modality"]
    assert modalities != sorted(modalities) and modalities != sorted(modalities, reverse=True)
    objects = [len(row["objects"]) for row in edge["train"] if row["modality"] == "image"]
    assert objects != sorted(objects) and objects != sorted(objects, reverse=True)


def test_every_template_is_asked_and_only_held_out_templates_are_held_out(edge):
    rows = [row for split in edge.values() for row in split]
    assert {row["question_template"] for row in rows} == set(QUESTION_TEMPLATES)
    assert all(row["held_out"] == (row["question_template"] == "color_by_side") for row in rows)
    assert all(QUESTION_TEMPLATES[row["question_template"]].modality == row["modality"] for row in rows)
    none_held_out = build_edge_cases(12, 3, seed=3, clip_seconds=_CLIP_SECONDS, held_out_templates=())
    assert not any(held for split in none_held_out.values() for held in split["held_out"])


def test_same_seed_gives_identical_data_and_another_seed_differs(edge):
    again = build_edge_cases(100, 40, seed=3, clip_seconds=_CLIP_SECONDS)
    other = build_edge_cases(100, 40, seed=4, clip_seconds=_CLIP_SECONDS)
    for name in edge:
        assert edge[name].data.equals(again[name].data)  # the encoded images and waveforms too
        assert edge[name]._fingerprint == again[name]._fingerprint != other[name]._fingerprint
    assert {_content(row) for row in edge["train"]}.isdisjoint(_content(row) for row in other["train"])


def test_no_edge_row_shows_an_image_or_clip_of_the_core_of_the_same_seed(core_and_edge):
    core, edge = core_and_edge
    core_content = [_content(row) for split in core.values() for row in split]
    edge_content = [_content(row) for split in edge.values() for row in split]
    assert len(core_content) == 550 and len(edge_content) == 280
    # No two edge rows show the same image or clip either, so the splits are disjoint by content.
    assert len(set(edge_content)) == len(edge_content)
    assert set(edge_content).isdisjoint(core_content)
    # The core does hold scenes of three objects and scenes against the border: the kinds are not disjoint by type.
    assert any(content[0] == "image" and len(content) == 4 for content in core_content)


def test_mix_datasets_gives_the_core_train_split_exactly_20_percent_edge_cases(core_and_edge):
    core, edge = core_and_edge
    edge_content = {_content(row) for row in edge["train"]}
    mixed = mix_datasets(core["train"], edge["train"], edge_fraction=0.2, seed=0)
    is_edge = [_content(row) in edge_content for row in mixed]
    assert len(mixed) == len(core["train"]) + round(len(core["train"]) / 4) == 550
    assert sum(is_edge) == 110 == 0.2 * len(mixed)
    assert mixed.features == MULTIMODAL_FEATURES
    sized = mix_datasets(core["train"], edge["train"], edge_fraction=0.2, seed=1, num_examples=100)
    assert sum(_content(row) in edge_content for row in sized) == 20


def test_one_modality_alone():
    images = build_edge_cases(12, 0, seed=1, split_sizes={"train": 0.5, "test": 0.5})
    assert {row["modality"] for split in images.values() for row in split} == {"image"}
    assert [len(split) for split in images.values()] == [6, 6]
    clips = build_edge_cases(0, 4, seed=1, clip_seconds=_CLIP_SECONDS, split_sizes={"train": 1.0})
    assert clips["train"]["modality"] == ["audio"] * 4 and clips["train"].features == MULTIMODAL_FEATURES


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_images": 0, "num_clips": 0}, r"num_images \(0\) and num_clips \(0\) must be >= 0, and not both 0"),
        ({"num_images": -2}, r"num_images \(-2\) and num_clips \(10\) must be >= 0"),
        ({"num_images": 5}, r"num_images \(5\) must be 0 or at least 6: its two kinds"),
        ({"num_images": 3, "split_sizes": {"train": 0.5, "test": 0.5}}, r"num_images \(3\) must be 0 or at least 4"),
        ({"num_clips": 2}, r"num_clips \(2\) must be 0 or at least the number of splits \(3\)"),
        ({"image_size": 12}, "image_size"),
        ({"clip_seconds": 2.0}, "clip_seconds"),
        ({"held_out_templates": ["no_such_template"]}, "held_out_templates"),
        ({"split_sizes": {"train": 0.5, "test": 0.4}}, "sum to 1"),
    ],
)
def test_bad_arguments_raise_a_value_error_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_edge_cases(**{"num_images": 10, "num_clips": 10, **kwargs})
