"""Tests of deepseekv3.data.regions: boxes as per-patch teacher distributions for attention distillation."""

import numpy as np
import pytest

from deepseekv3.data import boxes_to_patch_weights, build_shapes_dataset


@pytest.mark.parametrize(
    ("boxes", "expected"),
    [
        ([[0, 0, 4, 4]], [[1, 0], [0, 0]]),
        # One pixel into each of four patches: a quarter each.
        ([[3, 3, 5, 5]], [[0.25, 0.25], [0.25, 0.25]]),
        # Covers half of the top-right patch and all of the bottom-right one.
        ([[4, 2, 8, 8]], [[0, 1 / 3], [0, 2 / 3]]),
        # Two boxes weigh by covered area: 4 pixels and 12 pixels.
        ([[0, 0, 2, 2], [4, 4, 8, 7]], [[0.25, 0], [0, 0.75]]),
    ],
)
def test_weights_are_the_covered_share_of_each_patch(boxes, expected):
    weights = boxes_to_patch_weights(boxes, image_size=8, patch_size=4)
    assert weights.dtype == np.float32 and weights.shape == (2, 2)
    np.testing.assert_allclose(weights, expected, atol=1e-7)


def test_weights_of_every_referred_region_sum_to_one_and_vanish_outside_the_boxes():
    dataset = build_shapes_dataset(30, seed=2, split_sizes={"train": 1.0})["train"]
    patch_size = 4
    for row in dataset:
        boxes = [row["objects"][index]["box"] for index in row["referred_objects"]]
        weights = boxes_to_patch_weights(boxes, row["image_size"], patch_size)
        np.testing.assert_allclose(weights.sum(), 1.0, rtol=1e-6)
        # Patch (r, c) touches a box iff the box's pixel mask has a pixel inside it.
        mask = np.zeros((row["image_size"],) * 2, dtype=bool)
        for x_min, y_min, x_max, y_max in boxes:
            mask[y_min:y_max, x_min:x_max] = True
        grid = row["image_size"] // patch_size
        touched = mask.reshape(grid, patch_size, grid, patch_size).any(axis=(1, 3))
        assert (weights[~touched] == 0).all() and (weights[touched] > 0).all()


@pytest.mark.parametrize(
    ("boxes", "patch_size", "message"),
    [
        ([[0, 0, 4, 4]], 3, "patch_size"),
        ([], 4, "boxes is empty"),
        ([[2, 2, 2, 6]], 4, "empty or outside"),
        ([[0, 0, 9, 4]], 4, "empty or outside"),
    ],
)
def test_bad_boxes_or_patch_size_raise(boxes, patch_size, message):
    with pytest.raises(ValueError, match=message):
        boxes_to_patch_weights(boxes, image_size=8, patch_size=patch_size)
