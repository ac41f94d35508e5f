"""Ground-truth object regions as per-patch weight maps: the teacher distribution of attention distillation.

The built-in shapes data keeps each object's box in pixels. `boxes_to_patch_weights` turns the boxes a question
refers to into one weight per image patch, the fraction of that patch the boxes cover, normalised to sum to 1, laid
out like the model's image tokens (row-major over the patch grid, as a strided convolution flattened over height
then width produces them).
"""

from collections.abc import Sequence

import numpy as np

__all__ = ["boxes_to_patch_weights"]


def boxes_to_patch_weights(boxes: Sequence[Sequence[int]], image_size: int, patch_size: int) -> np.ndarray:
    """Per-patch weights of the region covered by `boxes`.

    Args:
        boxes (`Sequence[Sequence[int]]`): `[x_min, y_min, x_max, y_max]` in pixels, maxima exclusive (the `box` of
            the data set's `objects`). Boxes of one image do not overlap.
        image_size (`int`): side of the square image the boxes live in.
        patch_size (`int`): side of one patch, in the same pixels; must divide `image_size`. When the processor
            resizes images to the model's `image_size`, pass `config.patch_size * image_size // config.image_size`.

    Returns:
        `np.ndarray` of shape `(image_size // patch_size, image_size // patch_size)`, float32, summing to 1: the
        weight of patch `(row, column)` is proportional to the area of that patch the boxes cover, so patches outside
        every box weigh 0. Flatten it (`.reshape(-1)`) to match the order of the image tokens.
    """
    if patch_size <= 0 or image_size % patch_size != 0:
        raise ValueError(f"patch_size ({patch_size}) must be positive and divide image_size ({image_size})")
    if len(boxes) == 0:
        raise ValueError("boxes is empty: a region needs at least one box")
    num_patches = image_size // patch_size
    edges = np.arange(num_patches + 1) * patch_size
    weights = np.zeros((num_patches, num_patches), dtype=np.float64)
    for box in boxes:
        x_min, y_min, x_max, y_max = box
        if not 0 <= x_min < x_max <= image_size or not 0 <= y_min < y_max <= image_size:
            raise ValueError(f"box {list(box)} is empty or outside the {image_size}x{image_size} image")
        # Covered length of each patch column / row; their outer product is the covered area per patch.
        widths = np.clip(np.minimum(edges[1:], x_max) - np.maximum(edges[:-1], x_min), 0, None)
        heights = np.clip(np.minimum(edges[1:], y_max) - np.maximum(edges[:-1], y_min), 0, None)
        weights += np.outer(heights, widths)
    return (weights / weights.sum()).astype(np.float32)
