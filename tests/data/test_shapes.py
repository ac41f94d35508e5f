"""Tests of deepseekv3.data.shapes: every caption, box and answer is checked against the drawn pixels."""

import io
import re

import numpy as np
import pytest
from PIL import Image

from deepseekv3.data import COLORS, NUMBER_WORDS, QUESTION_TEMPLATES, build_shapes_dataset
from deepseekv3.data.shapes import BACKGROUND_RGB, COLOR_RGB, draw_shapes

# Share of its box a shape fills: square 1, circle about pi/4, triangle about 1/2 (0.62 at a side of 4 pixels).
_CIRCLE_MIN_FILL, _SQUARE_MIN_FILL = 0.64, 0.95
_RELATION_WORDS = {"left of": "left", "right of": "right", "above": "above", "below": "below"}


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
    ],
)
def test_bad_arguments_raise_a_value_error_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_shapes_dataset(**{"num_examples": 10, **kwargs})


def test_images_are_stored_as_png_bytes_and_decode_to_pil(shapes):
    stored = shapes["train"].with_format("arrow")["image"][0].as_py()
    assert stored["bytes"].startswith(b"\x89PNG") and stored["path"] is None
    assert Image.open(io.BytesIO(stored["bytes"])).mode == "RGB"
