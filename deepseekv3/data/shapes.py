"""Synthetic images of coloured shapes with captions, questions and the ground-truth region of every object.

Each image shows one to three objects (distinct colours from `COLORS`, distinct shapes from `SHAPES`) on a plain
light background, drawn with Pillow without anti-aliasing, so every pixel is either the background or one object's
exact colour. With two or more objects, the first two are placed in a clear spatial relation: their boxes are
separated by a gap on one axis and overlap by at least half the smaller side on the other, and a third object is
never on the same side of the first; "which side of the red circle is the blue square?" then has exactly one answer.
Each row asks one question; templates are used in turn (`i % len(templates)`), so question types are balanced.

Two options shape the scenes for edge cases (`build_edge_cases`): `num_objects` fixes the number of objects of every
scene, and `touch_border=True` puts every object against at least one side of the image, both keeping the relations
above. With both at their defaults the data is exactly that of earlier versions (same rows, same fingerprints).
"""

import functools
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
from datasets import DatasetDict, Features, Image, List, Value
from PIL import Image as PILImage
from PIL import ImageDraw

from .questions import (
    COLORS,
    COMMON_FEATURES,
    DEFAULT_HELD_OUT_TEMPLATES,
    NUMBER_WORDS,
    QUESTION_TEMPLATES,
    RELATIONS,
    SHAPES,
    build_messages,
    resolve_templates,
)
from .splits import build_dataset_dict, rows_to_table, sample_unique, split_rows

__all__ = ["BACKGROUND_RGB", "COLOR_RGB", "SHAPES_FEATURES", "build_shapes_dataset", "draw_shapes", "sample_shapes"]

COLOR_RGB = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (235, 200, 30)}
BACKGROUND_RGB = (240, 240, 240)
_RELATION_PHRASES = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
_MIN_IMAGE_SIZE = 16
_SHAPES_STREAM = 0

SHAPES_FEATURES = Features(
    {
        "image": Image(),
        "image_size": Value("int32"),
        "objects": List({"color": Value("string"), "shape": Value("string"), "box": List(Value("int32"), length=4)}),
        **COMMON_FEATURES,
    }
)


def build_shapes_dataset(
    num_examples: int,
    seed: int = 0,
    image_size: int = 32,
    split_sizes: Mapping[str, float] | None = None,
    templates: Sequence[str] | None = None,
    held_out_templates: Collection[str] = DEFAULT_HELD_OUT_TEMPLATES,
    *,
    num_objects: int | None = None,
    touch_border: bool = False,
) -> DatasetDict:
    """The shapes data set: one image, caption and question per row, split into train/validation/test.

    Args:
        num_examples (`int`): images over all splits; every image differs from every other.
        seed (`int`, defaults to 0): the same seed gives identical data.
        image_size (`int`, defaults to 32): side of the square RGB images, at least 16. Shapes read clearly from 32.
        split_sizes (`Mapping[str, float]`, *optional*): fraction of examples per split, summing to 1; defaults to
            `{"train": 0.8, "validation": 0.1, "test": 0.1}`. Rows are assigned to splits in order.
        templates (`Sequence[str]`, *optional*): names of the image templates to ask (`QUESTION_TEMPLATES`); all of
            them by default.
        held_out_templates (`Collection[str]`, defaults to `("color_by_side",)`): templates whose rows get
            `held_out=True`, for a fine-tuning task instruction tuning never sees (`split_held_out`).
        num_objects (`int`, *optional*): objects in every scene, 1 to 3; by default each scene draws between the
            fewest its template needs (`QUESTION_TEMPLATES[name].min_items`) and 3.
        touch_border (`bool`, *optional*, defaults to `False`): put every object's box against at least one side of
            the image (`x_min == 0`, `y_min == 0`, `x_max == image_size` or `y_max == image_size`).

    Returns:
        `DatasetDict` with `SHAPES_FEATURES`: `image` (PIL), `image_size`, `objects` (`color`, `shape`, `box` as
        `[x_min, y_min, x_max, y_max]` pixels, maxima exclusive), `caption`, `question`, `answer`, `question_type`,
        `question_template`, `referred_objects` (indices into `objects`: first the object the answer is about, then
        the object it is located from, or every object for `count`), `held_out`, `messages` and `modality`
        (`"image"`).

    Raises:
        `ValueError`: an image smaller than 16, unknown templates, `num_objects` outside 1-3 or below a template's
            `min_items`, or split sizes that do not sum to 1.
    """
    rows = sample_shapes(
        num_examples,
        seed,
        image_size,
        templates,
        held_out_templates,
        num_objects=num_objects,
        touch_border=touch_border,
    )
    for row in rows:
        row["image"] = draw_shapes(row["objects"], image_size)
    # Options are appended only where they change the data, so default data keeps the fingerprints it had before.
    options = {"num_objects": num_objects} if num_objects is not None else {}
    options.update({"touch_border": True} if touch_border else {})
    generation = ("shapes", num_examples, seed, image_size, split_sizes, templates, sorted(held_out_templates))
    generation = repr(generation + ((options,) if options else ()))
    tables = {name: rows_to_table(split, SHAPES_FEATURES) for name, split in split_rows(rows, split_sizes).items()}
    return build_dataset_dict(tables, SHAPES_FEATURES, generation)


def sample_shapes(
    num_examples: int,
    seed: int = 0,
    image_size: int = 32,
    templates: Sequence[str] | None = None,
    held_out_templates: Collection[str] = DEFAULT_HELD_OUT_TEMPLATES,
    *,
    num_objects: int | None = None,
    touch_border: bool = False,
    stream: int = _SHAPES_STREAM,
) -> list[dict[str, Any]]:
    """The rows of `build_shapes_dataset` without the images (no drawing): scenes, captions, questions, answers.

    Arguments as in `build_shapes_dataset`, and:
        stream (`int`, *optional*, defaults to 0): the random stream under `seed` (`sample_unique`); another stream
            draws other scenes from the same seed (the edge cases use their own, apart from the core data's).

    Returns one dict per example, in order.
    """
    if image_size < _MIN_IMAGE_SIZE:
        raise ValueError(f"image_size ({image_size}) must be at least {_MIN_IMAGE_SIZE} to fit three shapes")
    templates, held_out = resolve_templates("image", templates, held_out_templates)
    _check_num_objects(num_objects, templates)

    def sample(rng: np.random.Generator, index: int) -> dict[str, Any]:
        template = templates[index % len(templates)]
        count = num_objects
        if count is None:
            count = int(rng.integers(QUESTION_TEMPLATES[template].min_items, len(NUMBER_WORDS) + 1))
        objects, relation = _sample_scene(rng, image_size, count, touch_border)
        question, answer, referred = _ask(rng, template, objects, relation)
        return {
            "modality": "image",
            "image_size": image_size,
            "objects": objects,
            "caption": _caption(objects, relation),
            "question": question,
            "answer": answer,
            "question_type": QUESTION_TEMPLATES[template].question_type,
            "question_template": template,
            "referred_objects": referred,
            "held_out": template in held_out,
            "messages": build_messages(question, answer, "image"),
        }

    def key(row: dict[str, Any]) -> tuple:
        return tuple((item["color"], item["shape"], tuple(item["box"])) for item in row["objects"])

    return sample_unique(num_examples, seed, stream, sample, key)


def draw_shapes(objects: Sequence[Mapping[str, Any]], image_size: int) -> PILImage.Image:
    """Draw `objects` (`color`, `shape`, `box`) on the plain background, without anti-aliasing.

    Args:
        objects (`Sequence[Mapping]`): as in the `objects` column; boxes are `[x_min, y_min, x_max, y_max]`, maxima
            exclusive, and the shape touches all four sides of its box.
        image_size (`int`): side of the square image.

    Returns:
        `PIL.Image.Image`: an RGB image.
    """
    image = PILImage.new("RGB", (image_size, image_size), BACKGROUND_RGB)
    draw = ImageDraw.Draw(image)
    for item in objects:
        x_min, y_min, x_max, y_max = item["box"]
        # Pillow's coordinates are inclusive; the boxes' maxima are exclusive.
        corners = [x_min, y_min, x_max - 1, y_max - 1]
        fill = COLOR_RGB[item["color"]]
        if item["shape"] == "circle":
            draw.ellipse(corners, fill=fill)
        elif item["shape"] == "square":
            draw.rectangle(corners, fill=fill)
        else:
            apex = ((x_min + x_max - 1) / 2, y_min)
            draw.polygon([(x_min, y_max - 1), (x_max - 1, y_max - 1), apex], fill=fill)
    return image


def _check_num_objects(num_objects: int | None, templates: Sequence[str]) -> None:
    """Raise if `num_objects` is set outside 1-3 or below what one of `templates` needs."""
    if num_objects is None:
        return
    if not 1 <= num_objects <= len(NUMBER_WORDS):
        raise ValueError(f"num_objects ({num_objects}) must be between 1 and {len(NUMBER_WORDS)}, or None")
    for template in templates:
        if QUESTION_TEMPLATES[template].min_items > num_objects:
            raise ValueError(
                f"template {template!r} needs at least {QUESTION_TEMPLATES[template].min_items} objects, but "
                f"num_objects is {num_objects}; ask for more objects or leave {template!r} out of templates"
            )


def _sample_scene(
    rng: np.random.Generator, image_size: int, num_objects: int, touch_border: bool = False
) -> tuple[list[dict[str, Any]], str | None]:
    """Objects (distinct colours and shapes) and, with two or more, where object 1 lies relative to object 0.

    With `touch_border`, each object is moved onto a side of the image (`_move_to_border`) and the third is placed
    on one; without, the random draws are those of earlier versions.
    """
    colors = rng.choice(COLORS, size=num_objects, replace=False)
    shapes = rng.choice(SHAPES, size=num_objects, replace=False)
    min_side, max_side = round(0.22 * image_size), round(0.3 * image_size)
    sides = rng.integers(min_side, max_side + 1, size=num_objects)
    gap = max(2, image_size // 16)
    while True:
        if num_objects == 1:
            x_min, y_min = rng.integers(0, image_size - sides[0] + 1, size=2)
            boxes, relation = [(x_min, y_min, x_min + sides[0], y_min + sides[0])], None
        else:
            relation = str(rng.choice(RELATIONS))
            boxes = list(_place_pair(rng, image_size, int(sides[0]), int(sides[1]), relation, gap))
        if touch_border:
            boxes = _move_to_border(rng, image_size, boxes, relation, gap)
        if num_objects == 3:
            third = _place_third(rng, image_size, int(sides[2]), boxes, relation, gap, touch_border)
            if third is None:
                continue
            boxes.append(third)
        break
    objects = [
        {"color": str(color), "shape": str(shape), "box": [int(value) for value in box]}
        for color, shape, box in zip(colors, shapes, boxes)
    ]
    return objects, relation


def _place_pair(
    rng: np.random.Generator, image_size: int, anchor_side: int, target_side: int, relation: str, gap: int
) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """Boxes of an anchor and a target that lies `relation` of it, separated on one axis, overlapping on the other."""
    # Along the relation's axis: the earlier object (left / above) starts first, then at least `gap` pixels follow.
    target_first = relation in ("left", "above")
    first_side, second_side = (target_side, anchor_side) if target_first else (anchor_side, target_side)
    first_start = int(rng.integers(0, image_size - first_side - second_side - gap + 1))
    second_start = int(rng.integers(first_start + first_side + gap, image_size - second_side + 1))
    target_along, anchor_along = (first_start, second_start) if target_first else (second_start, first_start)
    # Across the axis: the two boxes share at least half of the smaller side, so they read as one row or column.
    min_overlap = math.ceil(min(anchor_side, target_side) / 2)
    anchor_across = int(rng.integers(0, image_size - anchor_side + 1))
    low = max(0, anchor_across - target_side + min_overlap)
    high = min(image_size - target_side, anchor_across + anchor_side - min_overlap)
    target_across = int(rng.integers(low, high + 1))
    if relation in ("left", "right"):
        return _square(anchor_along, anchor_across, anchor_side), _square(target_along, target_across, target_side)
    return _square(anchor_across, anchor_along, anchor_side), _square(target_across, target_along, target_side)


def _place_third(
    rng: np.random.Generator,
    image_size: int,
    side: int,
    boxes: list[tuple[int, int, int, int]],
    relation: str,
    gap: int,
    touch_border: bool = False,
) -> tuple[int, int, int, int] | None:
    """A box `gap` pixels clear of `boxes` whose centre is not on the target's side of the anchor, or `None`.

    With `touch_border`, the box lies against a side of the image: one of every such place that fits, drawn
    uniformly (`_place_third_on_border`).
    """
    if touch_border:
        return _place_third_on_border(rng, image_size, side, boxes, relation, gap)
    anchor = boxes[0]
    for _ in range(50):
        x_min, y_min = (int(value) for value in rng.integers(0, image_size - side + 1, size=2))
        box = _square(x_min, y_min, side)
        if any(not _is_apart(box, other, gap) for other in boxes):
            continue
        if not _on_target_side(box[0] + box[2], box[1] + box[3], anchor, relation):
            return box
    return None


def _on_target_side(twice_x: Any, twice_y: Any, anchor: tuple[int, ...], relation: str) -> Any:
    """Whether a centre (twice its coordinates, to stay in integers; ints or arrays) is on the target's side."""
    anchor_x, anchor_y = anchor[0] + anchor[2], anchor[1] + anchor[3]
    return {
        "left": twice_x < anchor_x,
        "right": twice_x > anchor_x,
        "above": twice_y < anchor_y,
        "below": twice_y > anchor_y,
    }[relation]


def _place_third_on_border(
    rng: np.random.Generator,
    image_size: int,
    side: int,
    boxes: list[tuple[int, int, int, int]],
    relation: str,
    gap: int,
) -> tuple[int, int, int, int] | None:
    """`_place_third`'s box against a side of the image: every place along the four sides is checked at once."""
    x_min, y_min = _border_corners(image_size, side)
    x_max, y_max = x_min + side, y_min + side
    fits = np.ones(len(x_min), dtype=bool)
    for other in boxes:
        fits &= _is_apart((x_min, y_min, x_max, y_max), other, gap)
    (places,) = np.nonzero(fits & ~_on_target_side(x_min + x_max, y_min + y_max, boxes[0], relation))
    if not len(places):
        return None
    place = places[int(rng.integers(len(places)))]
    return _square(int(x_min[place]), int(y_min[place]), side)


@functools.cache
def _border_corners(image_size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners of every place a box of `side` pixels touches a side of the image, each place once."""
    offsets = np.arange(image_size - side + 1)
    inner = offsets[1:-1]  # the corners of the image are on the left and right sides already
    ends = [0, image_size - side]
    x_min = np.concatenate([np.repeat(ends, len(offsets)), np.tile(inner, 2)])
    y_min = np.concatenate([np.tile(offsets, 2), np.repeat(ends, len(inner))])
    x_min.setflags(write=False)
    y_min.setflags(write=False)
    return x_min, y_min


def _move_to_border(
    rng: np.random.Generator,
    image_size: int,
    boxes: list[tuple[int, int, int, int]],
    relation: str | None,
    gap: int,
) -> list[tuple[int, int, int, int]]:
    """Move each box that touches no side of the image against one, keeping the pair in `relation`.

    A box may move along one axis to either end of it: one of the four moves is drawn among those that keep the
    target `relation` of the anchor (`_in_relation`). Moving the two boxes apart along the relation's axis always
    does, so there is always a move.
    """
    boxes = list(boxes)
    for index, box in enumerate(boxes):
        if _touches_border(box, image_size):
            continue
        side = box[2] - box[0]
        moves = []
        for axis in (0, 1):
            for start in (0, image_size - side):
                corner = [box[0], box[1]]
                corner[axis] = start
                moved = _square(corner[0], corner[1], side)
                if relation is None:
                    moves.append(moved)
                    continue
                anchor, target = (moved, boxes[1]) if index == 0 else (boxes[0], moved)
                if _in_relation(target, anchor, relation, gap):
                    moves.append(moved)
        boxes[index] = moves[int(rng.integers(len(moves)))]
    return boxes


def _touches_border(box: tuple[int, ...], image_size: int) -> bool:
    return box[0] == 0 or box[1] == 0 or box[2] == image_size or box[3] == image_size


def _in_relation(target: tuple[int, ...], anchor: tuple[int, ...], relation: str, gap: int) -> bool:
    """Whether `target` lies `relation` of `anchor` as `_place_pair` places it: at least `gap` pixels apart on the
    relation's axis, sharing at least half the smaller side on the other."""
    axis = 0 if relation in ("left", "right") else 1
    first, second = (target, anchor) if relation in ("left", "above") else (anchor, target)
    overlap = min(target[3 - axis], anchor[3 - axis]) - max(target[1 - axis], anchor[1 - axis])
    min_overlap = math.ceil(min(target[2] - target[0], anchor[2] - anchor[0]) / 2)
    return first[axis + 2] + gap <= second[axis] and overlap >= min_overlap


def _square(x_min: int, y_min: int, side: int) -> tuple[int, int, int, int]:
    return (x_min, y_min, x_min + side, y_min + side)


def _is_apart(box: tuple[Any, ...], other: tuple[int, ...], gap: int) -> Any:
    """Whether the boxes are at least `gap` pixels apart on the x or the y axis (`box` of ints or of arrays, one box
    per element)."""
    return (
        (box[2] + gap <= other[0])
        | (other[2] + gap <= box[0])
        | (box[3] + gap <= other[1])
        | (other[3] + gap <= box[1])
    )


def _describe(item: Mapping[str, Any]) -> str:
    return f"{item['color']} {item['shape']}"


def _caption(objects: list[dict[str, Any]], relation: str | None) -> str:
    """'a blue square left of a red circle and a green triangle': object 1 related to object 0, then the rest."""
    if relation is None:
        return f"a {_describe(objects[0])}"
    caption = f"a {_describe(objects[1])} {_RELATION_PHRASES[relation]} a {_describe(objects[0])}"
    return caption + "".join(f" and a {_describe(item)}" for item in objects[2:])


def _ask(
    rng: np.random.Generator, template: str, objects: list[dict[str, Any]], relation: str | None
) -> tuple[str, str, list[int]]:
    """Question, answer and referred object indices of `template` about the scene."""
    if template == "count":
        return "how many shapes are there?", NUMBER_WORDS[len(objects) - 1], list(range(len(objects)))
    if template == "spatial":
        question = f"which side of the {_describe(objects[0])} is the {_describe(objects[1])}?"
        return question, relation, [1, 0]
    if template == "color_by_side":
        question = f"what colour is the object {_RELATION_PHRASES[relation]} the {_describe(objects[0])}?"
        return question, objects[1]["color"], [1, 0]
    index = int(rng.integers(len(objects)))
    if template == "color":
        return f"what colour is the {objects[index]['shape']}?", objects[index]["color"], [index]
    return f"what shape is the {objects[index]['color']} object?", objects[index]["shape"], [index]
