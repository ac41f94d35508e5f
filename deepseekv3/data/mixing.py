"""The seed's data practice, "core 80% + edge cases 20%": a training set that gives the long tail a fixed share.

`mix_datasets(core, edge, edge_fraction=0.2, seed=0)` returns one data set of which exactly `edge_fraction` (rounded
to whole examples) comes from `edge`. Map-style data sets are mixed by exact counts: every source is drawn in seeded
full passes (each example once per pass, in a new order each pass), so a rare edge set is repeated evenly and no
example is repeated more than once beyond any other of its source. Streaming data sets (`IterableDataset`) are
interleaved by `datasets.interleave_datasets` with those probabilities until both are exhausted.
"""

import math

import numpy as np
from datasets import Dataset, IterableDataset, concatenate_datasets, interleave_datasets

__all__ = ["mix_datasets"]


def _passes(size: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` indices into a source of `size` rows: seeded full permutations, the last one cut short."""
    if not count:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([rng.permutation(size) for _ in range(math.ceil(count / size))])[:count]


def mix_datasets(
    core: Dataset | IterableDataset,
    edge: Dataset | IterableDataset,
    edge_fraction: float = 0.2,
    seed: int = 0,
    num_examples: int | None = None,
) -> Dataset | IterableDataset:
    """Mix a core data set with edge cases so that `edge_fraction` of the result are edge cases.

    Args:
        core (`Dataset` or `IterableDataset`): the common cases.
        edge (`Dataset` or `IterableDataset`): the edge cases, the same kind and columns as `core`.
        edge_fraction (`float`, *optional*, defaults to 0.2): the share of edge cases, in `[0, 1)`.
        seed (`int`, *optional*, defaults to 0): the same seed gives the same mix.
        num_examples (`int`, *optional*): map-style only, the size of the mix. By default every core example is kept
            once and `round(len(core) * edge_fraction / (1 - edge_fraction))` edge cases are added.

    Returns:
        `Dataset` (shuffled; exactly `round(num_examples * edge_fraction)` edge rows when `num_examples` is given) or
        `IterableDataset` (`interleave_datasets` with probabilities `[1 - edge_fraction, edge_fraction]`,
        `stopping_strategy="all_exhausted"`).

    Raises:
        `ValueError`: a fraction outside `[0, 1)`, a map-style and a streaming source together, `num_examples` with
        streaming sources or below 1, columns that differ, or an empty source that must give examples.
    """
    if not 0.0 <= edge_fraction < 1.0:
        raise ValueError(f"edge_fraction ({edge_fraction}) must be in [0, 1): the core must give some examples")
    streaming = [isinstance(source, IterableDataset) for source in (core, edge)]
    if any(streaming) and not all(streaming):
        raise ValueError(
            "core and edge must both be map-style (Dataset) or both streaming (IterableDataset); got "
            f"{type(core).__name__} and {type(edge).__name__}"
        )
    if core.features is not None and edge.features is not None and core.features != edge.features:
        differing = sorted(
            name
            for name in set(core.features) | set(edge.features)
            if core.features.get(name) != edge.features.get(name)
        )
        raise ValueError(f"core and edge must have the same columns and types; they differ in {differing}")
    if all(streaming):
        if num_examples is not None:
            raise ValueError("num_examples sizes a map-style mix; take from a streaming mix with .take(n)")
        return interleave_datasets(
            [core, edge],
            probabilities=[1.0 - edge_fraction, edge_fraction],
            seed=seed,
            stopping_strategy="all_exhausted",
        )
    if num_examples is None:
        num_edge = round(len(core) * edge_fraction / (1.0 - edge_fraction))
        num_core = len(core)
    elif num_examples < 1:
        raise ValueError(f"num_examples ({num_examples}) must be at least 1")
    else:
        num_edge = round(num_examples * edge_fraction)
        num_core = num_examples - num_edge
    for name, source, count in (("core", core, num_core), ("edge", edge, num_edge)):
        if count and not len(source):
            raise ValueError(f"the {name} data set is empty but the mix needs {count} examples from it")
    rng = np.random.default_rng(seed)
    core_rows = core.select(_passes(len(core), num_core, rng))
    edge_rows = edge.select(_passes(len(edge), num_edge, rng))
    return concatenate_datasets([core_rows, edge_rows]).shuffle(seed=seed).flatten_indices()
