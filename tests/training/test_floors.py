"""The floors a model must beat: chance, the training rows' majority answer, and a picture-based guess.

The expected values are computed here from the rows by other means than the code under test: the picture guess as
`1 / n_objects` (or `1 / (n_objects - 1)`), and by simulation, drawing an object at random and reading the object
the question names from the question's text, not from `referred_objects`.
"""

import math
import re
from collections import Counter

import numpy as np
import pytest

from deepseekv3.data import COLORS, build_multimodal_dataset
from deepseekv3.data.shapes import sample_shapes
from deepseekv3.data.tones import sample_tones
from deepseekv3.training.evaluation import FLOORS, chance_accuracy, floor_accuracies

QUESTION_TYPES = ["audio", "color", "count", "shape", "spatial"]


@pytest.fixture(scope="module")
def data():
    """Image and audio rows of every template, split in order (the images are not drawn: floors read no pixels)."""
    shapes = sample_shapes(1200, seed=0, image_size=32)
    tones = sample_tones(300, seed=0, clip_seconds=0.25)
    return {"train": shapes[:800] + tones[:200], "test": shapes[800:] + tones[200:]}


def of_template(rows, *templates, num_objects=None):
    return [
        row
        for row in rows
        if row["question_template"] in templates and (num_objects is None or len(row["objects"]) == num_objects)
    ]


def test_every_floor_has_every_question_type_and_the_strongest_is_the_highest(data):
    floors = floor_accuracies(data["test"], data["train"])
    assert list(floors) == list(FLOORS)
    for name in FLOORS:
        assert list(floors[name]) == QUESTION_TYPES
        assert all(0.0 <= value <= 1.0 for value in floors[name].values())
    assert floors["chance"] == pytest.approx(chance_accuracy(data["test"]))
    for question_type in QUESTION_TYPES:
        expected = max(floors[name][question_type] for name in ("chance", "majority", "heuristic"))
        assert floors["strongest"][question_type] == expected
    # the picture guess is the floor to beat on colour and shape questions, far above chance
    assert floors["strongest"]["color"] == floors["heuristic"]["color"] > 0.6
    assert floors["strongest"]["shape"] == floors["heuristic"]["shape"] > 0.55


def test_a_dataset_gives_the_floors_of_its_rows_as_dicts():
    """A `datasets.Dataset` (image and audio rows, `objects` None on audio rows) is read column-wise."""
    data = build_multimodal_dataset(60, 30, seed=0, image_size=16, clip_seconds=0.25)
    as_dicts = floor_accuracies(list(data["test"]), list(data["train"]))
    assert floor_accuracies(data["test"], data["train"]) == as_dicts
    assert set(as_dicts["chance"]) == {row["question_type"] for row in data["test"]}


def test_colour_and_shape_guesses_score_one_over_the_number_of_objects(data):
    for template in ("color", "shape"):
        rows = of_template(data["test"], template)
        # every answer is an attribute of an object of the scene: a drawn object is right one time in n
        assert all(any(row["answer"] in item.values() for item in row["objects"]) for row in rows)
        assert {len(row["objects"]) for row in rows} == {1, 2, 3}
        expected = np.mean([1 / len(row["objects"]) for row in rows])
        assert math.isclose(floor_accuracies(rows, data["train"])["heuristic"][template], expected)


@pytest.mark.parametrize(("num_objects", "expected"), [(3, 0.5), (2, 1.0)])
def test_colour_by_side_guesses_among_the_objects_other_than_the_one_named(data, num_objects, expected):
    """The question names one object ("what colour is the object left of the red circle?"): the answer is one of
    the others, so with three objects a guess among the other two is right half the time, with two always."""
    rows = of_template(data["test"], "color_by_side", num_objects=num_objects)
    assert len(rows) > 10
    assert floor_accuracies(rows, data["train"])["heuristic"]["color"] == expected


def named_object(row) -> int:
    """Index of the object the question names, read from its text ("... the red circle?")."""
    color, shape = re.search(r"the (\w+) (\w+)\?$", row["question"]).groups()
    return next(i for i, item in enumerate(row["objects"]) if (item["color"], item["shape"]) == (color, shape))


def test_the_picture_guess_agrees_with_a_simulation_of_it(data):
    """Guessing by drawing objects at random (a fixed seed, many draws per row) matches the analytic expectation
    within 4 standard errors; for `color_by_side` the simulation also rules out guessing among all objects."""
    rows = sample_shapes(3000, seed=1, image_size=32, templates=["color", "shape", "color_by_side"])
    rng = np.random.default_rng(0)
    draws_per_row = 20
    for template, attribute in (("color", "color"), ("shape", "shape"), ("color_by_side", "color")):
        template_rows = of_template(rows, template)
        hits = []
        for row in template_rows:
            named = named_object(row) if template == "color_by_side" else None
            pool = [item[attribute] for index, item in enumerate(row["objects"]) if index != named]
            hits += [pool[choice] == row["answer"] for choice in rng.integers(len(pool), size=draws_per_row)]
        simulated = float(np.mean(hits))
        question_type = "shape" if template == "shape" else "color"
        analytic = floor_accuracies(template_rows, data["train"])["heuristic"][question_type]
        # draws with different probabilities p_i: the variance of their mean is at most mean(p)(1 - mean(p)) / N
        standard_error = math.sqrt(analytic * (1 - analytic) / len(hits))
        assert abs(simulated - analytic) < 4 * standard_error
        if template == "color_by_side":
            every_object = np.mean([1 / len(row["objects"]) for row in template_rows])
            assert abs(simulated - every_object) > 20 * standard_error


def train_rows_answering(template: str, answers: dict[str, int]) -> list[dict]:
    """Training rows of `template`: `count` rows answering `answer` for each item of `answers`, in order."""
    return [
        {"question_template": template, "answer": answer} for answer, count in answers.items() for _ in range(count)
    ]


def test_majority_is_the_training_rows_most_frequent_answer_scored_on_the_test_rows(data):
    rows = of_template(data["test"], "color")
    test_counts = Counter(row["answer"] for row in rows)
    rarest = min(COLORS, key=test_counts.__getitem__)
    assert rarest != test_counts.most_common(1)[0][0]
    # the training rows' majority is the test rows' rarest answer, so majority on the test rows is low
    train = train_rows_answering("color", {rarest: 3, test_counts.most_common(1)[0][0]: 2})
    floors = floor_accuracies(rows, train)
    assert math.isclose(floors["majority"]["color"], test_counts[rarest] / len(rows))
    assert floors["majority"]["color"] < 0.25


def test_a_tie_between_training_answers_goes_to_the_answer_listed_first(data):
    rows = of_template(data["test"], "color")
    expected = {answer: count / len(rows) for answer, count in Counter(row["answer"] for row in rows).items()}
    # COLORS = red, green, blue, yellow: green is listed before blue, whatever order the training rows come in
    for counts in ({"blue": 2, "green": 2, "red": 1}, {"green": 2, "blue": 2, "yellow": 1}):
        assert floor_accuracies(rows, train_rows_answering("color", counts))["majority"]["color"] == expected["green"]


def test_without_a_picture_guess_the_heuristic_is_the_better_of_chance_and_majority(data):
    rows = of_template(data["test"], "count")
    counts = Counter(row["answer"] for row in rows)
    common, rare = counts.most_common()[0][0], counts.most_common()[-1][0]
    assert counts[common] / len(rows) > 1 / 3 > counts[rare] / len(rows)
    for majority_answer, expected in ((common, counts[common] / len(rows)), (rare, 1 / 3)):
        floors = floor_accuracies(rows, train_rows_answering("count", {majority_answer: 1}))
        assert math.isclose(floors["heuristic"]["count"], expected)
        assert floors["strongest"]["count"] == floors["heuristic"]["count"]
    # a type with a picture guess and without: the mean over its rows of each template's guess
    mixed = of_template(data["test"], "color", num_objects=2)[:10] + of_template(data["test"], "count")[:10]
    mixed = [{**row, "question_type": "color"} for row in mixed]
    count_floor = floor_accuracies(mixed[10:], train_rows_answering("count", {rare: 1}))["heuristic"]["color"]
    train = train_rows_answering("count", {rare: 1}) + train_rows_answering("color", {"red": 1})
    assert math.isclose(floor_accuracies(mixed, train)["heuristic"]["color"], (10 * 0.5 + 10 * count_floor) / 20)


def test_empty_rows_are_refused(data):
    with pytest.raises(ValueError, match="rows is empty"):
        floor_accuracies([], data["train"])
    with pytest.raises(ValueError, match="train_rows is empty"):
        floor_accuracies(data["test"], [])


def test_unknown_templates_and_answers_outside_a_templates_answers_are_refused(data):
    row, train = data["test"][0], data["train"]
    with pytest.raises(ValueError, match=r"question_template \('colour'\) of row 1 is not one of"):
        floor_accuracies([row, {**row, "question_template": "colour"}], train)
    with pytest.raises(ValueError, match=r"question_template \('colour'\) of row 0 is not one of"):
        floor_accuracies([row], [{"question_template": "colour", "answer": "red"}])
    with pytest.raises(ValueError, match=r"answer \('purple'\) of row 0 is not among the answers"):
        floor_accuracies([{**row, "answer": "purple"}], train)
    with pytest.raises(ValueError, match=r"answer \('four'\) of train row 0 is not among the answers"):
        floor_accuracies([row], [{"question_template": "count", "answer": "four"}])


def test_a_template_the_training_rows_lack_is_refused(data):
    rows = of_template(data["test"], "count")
    with pytest.raises(ValueError, match="train_rows has no row of question_template 'count'"):
        floor_accuracies(rows, train_rows_answering("color", {"red": 1}))


def test_picture_rows_without_a_usable_scene_are_refused(data):
    train = data["train"]
    row = of_template(data["test"], "shape")[0]
    with pytest.raises(ValueError, match=r"row 0 \('shape'\) has no objects"):
        floor_accuracies([{**row, "objects": None}], train)
    row = of_template(data["test"], "color_by_side")[0]
    for referred in ([1], [1, 5], [0, 1, 2]):
        with pytest.raises(ValueError, match=r"referred_objects \(\[.*\]\) of row 0 \('color_by_side'\) must be"):
            floor_accuracies([{**row, "referred_objects": referred}], train)
