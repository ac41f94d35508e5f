"""Tests of deepseekv3.data.shapes: every caption, box and answer is checked against the drawn pixels."""

import hashlib
import io
import json
import math
import re

import numpy as np
import pytest
from PIL import Image

from deepseekv3.data import COLORS, NUMBER_WORDS, QUESTION_TEMPLATES, build_shapes_dataset
from deepseekv3.data.shapes import BACKGROUND_RGB, COLOR_RGB, draw_shapes, sample_shapes

# Share of its box a shape fills: square 1, circle about pi/4, triangle about 1/2 (0.62 at a side of 4 pixels).
_CIRCLE_MIN_FILL, _SQUARE_MIN_FILL = 0.64, 0.95
_RELATION_WORDS = {"left of": "left", "right of": "right", "above": "above", "below": "below"}
# Computed on the code before `num_objects` and `touch_border` existed (commit 8b7027e): default options must keep
# giving exactly that data (a digest of `sample_shapes(50, seed=3)`) and that fingerprint.
_PRE_OPTIONS_ROWS_DIGEST = "3685b473183d275e"
_PRE_OPTIONS_TRAIN_FINGERPRINT = "e2f1abb3e1b8aa7f"


@pytest.fixture(scope="module")
def shapes():
    return build_shapes_dataset(60, seed=7)


def _read_objects(image) -> dict[str, dict]:
    """Each colour found in the pixels: its bounding box (maxima exclusive) and the shape its fill ratio implies."""
    pixels = np.asarray(image)
    found = {}
    for color in COLORS:
        mask = (pixels == COLOR_RGB[color]).all(axis=-1)
        if not mask.any():
            continue
        ys, xs = np.nonzero(mask)
        box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
        fill = mask.sum() / ((box[2] - box[0]) * (box[3] - box[1]))
        shape = "square" if fill > _SQUARE_MIN_FILL else "circle" if fill > _CIRCLE_MIN_FILL else "triangle"
        found[color] = {"color": color, "shape": shape, "box": box}
    return found


def _relation(target: list[int], anchor: list[int]) -> str | None:
    """Where `target` lies relative to `anchor` when apart on one axis and overlapping on the other, else None."""
    overlap_x = min(target[2], anchor[2]) > max(target[0], anchor[0])
    overlap_y = min(target[3], anchor[3]) > max(target[1], anchor[1])
    if overlap_y and target[2] <= anchor[0]:
        return "left"
    if overlap_y and target[0] >= anchor[2]:
        return "right"
    if overlap_x and target[3] <= anchor[1]:
        return "above"
    if overlap_x and target[1] >= anchor[3]:
        return "below"
    return None


def _touches_border(box: list[int], image_size: int) -> bool:
    return box[0] == 0 or box[1] == 0 or box[2] == image_size or box[3] == image_size


def _check_scene_layout(row: dict) -> None:
    """The module docstring's promises, from the boxes: objects `gap` apart, the pair in its relation with an overlap
    of half the smaller side, and a third object's centre never on the target's side of the anchor."""
    boxes, size = [item["box"] for item in row["objects"]], row["image_size"]
    gap = max(2, size // 16)
    assert all(0 <= box[0] < box[2] <= size and 0 <= box[1] < box[3] <= size for box in boxes)
    for i, box in enumerate(boxes):
        for other in boxes[i + 1 :]:
            assert max(other[0] - box[2], box[0] - other[2], other[1] - box[3], box[1] - other[3]) >= gap
    if len(boxes) == 1:
        return
    match = re.match(r"a \w+ \w+ (left of|right of|above|below) a \w+ \w+", row["caption"])
    relation, (anchor, target) = _RELATION_WORDS[match[1]], boxes[:2]
    assert _relation(target, anchor) == relation
    across = 1 if relation in ("left", "right") else 0
    overlap = min(target[across + 2], anchor[across + 2]) - max(target[across], anchor[across])
    assert overlap >= math.ceil(min(target[2] - target[0], anchor[2] - anchor[0]) / 2)
    # Twice the centres, to stay in integers; the target's side is where `sign * (centre - anchor's centre) > 0`.
    axis, sign = {"left": (0, -1), "right": (0, 1), "above": (1, -1), "below": (1, 1)}[relation]
    for third in boxes[2:]:
        assert sign * (third[axis] + third[axis + 2] - anchor[axis] - anchor[axis + 2]) <= 0, (relation, boxes)


def _answer_from_pixels(question: str, objects: dict[str, dict]) -> str:
    """Answer `question` from the objects read off the pixels alone."""
    by_name = {f"{item['color']} {item['shape']}": item for item in objects.values()}
    if match := re.fullmatch(r"what colour is the (\w+)\?", question):
        (item,) = [item for item in objects.values() if item["shape"] == match[1]]
        return item["color"]
    if match := re.fullmatch(r"what shape is the (\w+) object\?", question):
        return objects[match[1]]["shape"]
    if question == "how many shapes are there?":
        return NUMBER_WORDS[len(objects) - 1]
    if match := re.fullmatch(r"which side of the (\w+ \w+) is the (\w+ \w+)\?", question):
        return _relation(by_name[match[2]]["box"], by_name[match[1]]["box"])
    if match := re.fullmatch(r"what colour is the object (left of|right of|above|below) the (\w+ \w+)\?", question):
        anchor = by_name[match[2]]["box"]
        # Exactly one object may stand in that relation, else the question would be ambiguous.
        (item,) = [item for item in objects.values() if _relation(item["box"], anchor) == _RELATION_WORDS[match[1]]]
        return item["color"]
    raise AssertionError(f"unparsed question {question!r}")


@pytest.mark.parametrize("image_size", [16, 32, 48])
def test_objects_and_answers_match_the_drawn_pixels(image_size):
    dataset = build_shapes_dataset(40, seed=1, image_size=image_size, split_sizes={"train": 1.0})["train"]
    for row in dataset:
        pixels = np.asarray(row["image"])
        assert row["image"].size == (image_size, image_size) and row["image_size"] == image_size
        objects = _read_objects(row["image"])
        # Nothing but the background and the objects' colours is drawn.
        palette = [BACKGROUND_RGB, *COLOR_RGB.values()]
        assert sum((pixels == color).all(axis=-1) for color in palette).all()
        assert sorted(objects.values(), key=lambda item: item["color"]) == sorted(
            row["objects"], key=lambda item: item["color"]
        )
        assert row["answer"] == _answer_from_pixels(row["question"], objects), row["question"]
        assert row["answer"] in QUESTION_TEMPLATES[row["question_template"]].answers


def test_every_scene_keeps_its_layout(shapes):
    for row in shapes["train"]:
        _check_scene_layout(row)


def test_default_options_give_the_data_of_earlier_versions():
    rows = sample_shapes(50, seed=3)
    assert rows == sample_shapes(50, seed=3, num_objects=None, touch_border=False, stream=0)
    # Another random stream draws other scenes from the same seed (the edge cases have their own).
    assert [row["objects"] for row in sample_shapes(50, seed=3, stream=3)] != [row["objects"] for row in rows]
    assert hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:16] == _PRE_OPTIONS_ROWS_DIGEST
    assert build_shapes_dataset(20)["train"]._fingerprint == _PRE_OPTIONS_TRAIN_FINGERPRINT
    assert build_shapes_dataset(20, num_objects=None, touch_border=False)["train"]._fingerprint == (
        _PRE_OPTIONS_TRAIN_FINGERPRINT
    )
    fingerprints = {
        build_shapes_dataset(20, **kwargs)["train"]._fingerprint
        for kwargs in ({}, {"num_objects": 3}, {"touch_border": True}, {"num_objects": 3, "touch_border": True})
    }
    assert len(fingerprints) == 4


@pytest.mark.parametrize(("num_objects", "templates"), [(1, ["color", "shape", "count"]), (2, None), (3, None)])
def test_num_objects_sets_the_objects_of_every_scene(num_objects, templates):
    dataset = build_shapes_dataset(
        30, seed=2, templates=templates, held_out_templates=(), num_objects=num_objects, split_sizes={"train": 1.0}
    )["train"]
    for row in dataset:
        objects = _read_objects(row["image"])
        assert len(row["objects"]) == len(objects) == num_objects
        assert row["answer"] == _answer_from_pixels(row["question"], objects), row["question"]
        _check_scene_layout(row)
    if templates is None:
        assert set(dataset["question_template"]) == {n for n, t in QUESTION_TEMPLATES.items() if t.modality == "image"}


@pytest.mark.parametrize(("image_size", "num_objects"), [(16, None), (32, None), (48, None), (32, 3)])
def test_touch_border_puts_every_object_against_a_side_and_keeps_the_answers(image_size, num_objects):
    dataset = build_shapes_dataset(
        60, seed=5, image_size=image_size, num_objects=num_objects, touch_border=True, split_sizes={"train": 1.0}
    )["train"]
    counts = set()
    for row in dataset:
        objects = _read_objects(row["image"])
        # Read off the pixels, so the drawn shape (not only its box) reaches the side.
        assert all(_touches_border(item["box"], image_size) for item in objects.values()), row["objects"]
        assert sorted(objects.values(), key=lambda item: item["color"]) == sorted(
            row["objects"], key=lambda item: item["color"]
        )
        assert row["answer"] == _answer_from_pixels(row["question"], objects), row["question"]
        _check_scene_layout(row)
        counts.add(len(objects))
    assert counts == ({1, 2, 3} if num_objects is None else {num_objects})


def test_caption_names_every_object_and_the_relation_the_pixels_show(shapes):
    for row in shapes["train"]:
        objects = _read_objects(row["image"])
        names = re.findall(r"a (\w+) (\w+)", row["caption"])
        assert sorted(names) == sorted((item["color"], item["shape"]) for item in objects.values())
        if match := re.match(r"a (\w+) \w+ (left of|right of|above|below) a (\w+) \w+", row["caption"]):
            target, anchor = objects[match[1]]["box"], objects[match[3]]["box"]
            assert _relation(target, anchor) == _RELATION_WORDS[match[2]]


def test_referred_objects_are_the_objects_the_question_names(shapes):
    for row in shapes["train"]:
        referred = [row["objects"][index] for index in row["referred_objects"]]
        template = row["question_template"]
        if template == "count":
            assert len(referred) == len(row["objects"])
        elif template in ("color", "shape"):
            assert len(referred) == 1 and referred[0]["color" if template == "shape" else "shape"] in row["question"]
        else:
            answered, anchor = referred
            assert f"{anchor['color']} {anchor['shape']}" in row["question"]
            assert answered["color"] == row["answer"] or f"{answered['color']} {answered['shape']}" in row["question"]


def test_same_seed_gives_identical_data_and_another_seed_differs():
    first, second, other = (build_shapes_dataset(20, seed=seed) for seed in (3, 3, 4))
    for split in first:
        assert first[split].to_list() == second[split].to_list()
        assert first[split].data.equals(second[split].data)  # the encoded images too
    assert first["train"]["objects"] != other["train"]["objects"]


def test_templates_take_turns_and_only_held_out_templates_are_held_out(shapes):
    rows = shapes["train"]
    templates = [name for name, template in QUESTION_TEMPLATES.items() if template.modality == "image"]
    assert rows["question_template"][: 2 * len(templates)] == templates * 2
    assert all(held == (name == "color_by_side") for held, name in zip(rows["held_out"], rows["question_template"]))
    assert all(
        QUESTION_TEMPLATES[name].question_type == kind
        for name, kind in zip(rows["question_template"], rows["question_type"])
    )


def test_messages_ask_the_question_about_the_image_and_answer_it(shapes):
    row = shapes["test"][0]
    assert row["messages"] == [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": row["question"]}]},
        {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]},
    ]


def test_chosen_templates_and_held_out_templates():
    dataset = build_shapes_dataset(10, templates=["spatial"], held_out_templates=(), split_sizes={"train": 1.0})
    assert set(dataset["train"]["question_template"]) == {"spatial"}
    assert not any(dataset["train"]["held_out"])


def test_draw_shapes_fills_each_box_to_its_edges():
    image = draw_shapes([{"color": "red", "shape": "triangle", "box": [2, 3, 12, 13]}], 16)
    assert _read_objects(image)["red"]["box"] == [2, 3, 12, 13]
    assert np.asarray(image)[0, 0].tolist() == list(BACKGROUND_RGB)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 12}, "image_size"),
        ({"templates": ["audio_pitch"]}, "templates"),
        ({"templates": ["colour"]}, "templates"),
        ({"held_out_templates": ["no_such_template"]}, "held_out_templates"),
        ({"templates": ["count"], "held_out_templates": ["spatial"]}, "held_out_templates"),
        ({"split_sizes": {"train": 0.5, "test": 0.4}}, "sum to 1"),
        ({"num_examples": 2}, "number of splits"),
        ({"num_objects": 0}, r"num_objects \(0\) must be between 1 and 3"),
        ({"num_objects": 4}, r"num_objects \(4\) must be between 1 and 3"),
        ({"num_objects": 1}, r"template 'spatial' needs at least 2 objects, but num_objects is 1"),
        ({"num_objects": 1, "templates": ["count", "color_by_side"]}, "template 'color_by_side' needs at least 2"),
    ],
)
def test_bad_arguments_raise_a_value_error_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_shapes_dataset(**{"num_examples": 10, **kwargs})


def test_images_are_stored_as_png_bytes_and_decode_to_pil(shapes):
    stored = shapes["train"].with_format("arrow")["image"][0].as_py()
    assert stored["bytes"].startswith(b"\x89PNG") and stored["path"] is None
    assert Image.open(io.BytesIO(stored["bytes"])).mode == "RGB"
