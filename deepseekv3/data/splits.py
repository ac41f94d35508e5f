"""Seeded generation of unique examples, their train/validation/test splits, and the held-out rows.

Example `i` of a data set draws from its own generator, seeded with `(seed, stream, i)`, so the same seed gives the
same data on any machine and the two modalities never share random numbers. No two examples of one data set show the
same image or clip, so the splits are disjoint by content, not only by index.
"""

import hashlib
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import Dataset, DatasetDict, DatasetInfo, Features
from datasets.table import InMemoryTable

__all__ = [
    "DEFAULT_SPLIT_SIZES",
    "build_dataset_dict",
    "rows_to_table",
    "sample_unique",
    "split_held_out",
    "split_rows",
]

DEFAULT_SPLIT_SIZES = {"train": 0.8, "validation": 0.1, "test": 0.1}
# Draws per example before giving up: far more than any size the scenes allow needs (see `sample_unique`).
_MAX_DRAWS_PER_EXAMPLE = 100


def split_rows(rows: list[dict[str, Any]], split_sizes: Mapping[str, float] | None) -> dict[str, list[dict[str, Any]]]:
    """Cut `rows` in order into splits of the given fractions (summing to 1); rounding leftovers go to the first."""
    num_examples = len(rows)
    fractions = dict(DEFAULT_SPLIT_SIZES if split_sizes is None else split_sizes)
    if not fractions or any(fraction < 0 for fraction in fractions.values()):
        raise ValueError(f"split_sizes ({fractions}) must be a non-empty mapping of split name to fraction >= 0")
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ValueError(f"split_sizes ({fractions}) must sum to 1, not {sum(fractions.values())}")
    if num_examples < len(fractions):
        raise ValueError(f"num_examples ({num_examples}) must be at least the number of splits ({len(fractions)})")
    names = list(fractions)
    sizes = {name: round(fractions[name] * num_examples) for name in names[1:]}
    sizes = {names[0]: num_examples - sum(sizes.values()), **sizes}
    if sizes[names[0]] < 0:
        raise ValueError(f"split_sizes ({fractions}) leave no examples for {names[0]!r}")
    splits, start = {}, 0
    for name, size in sizes.items():
        splits[name] = rows[start : start + size]
        start += size
    return splits


def sample_unique(
    num_examples: int,
    seed: int,
    stream: int,
    sample: Callable[[np.random.Generator, int], dict[str, Any]],
    key: Callable[[dict[str, Any]], Hashable],
) -> list[dict[str, Any]]:
    """Draw `num_examples` examples whose `key`s all differ.

    Args:
        num_examples (`int`): how many examples.
        seed (`int`): the data set's seed.
        stream (`int`): separates the random streams of different generators under one seed.
        sample (`Callable`): `sample(rng, index)` draws example `index` (a dict of columns) from `rng`.
        key (`Callable`): what makes two examples the same (the content of the image or clip).

    Returns:
        `list[dict]`: the examples in index order.
    """
    seen: set[Hashable] = set()
    examples = []
    for index in range(num_examples):
        rng = np.random.default_rng([seed, stream, index])
        for _ in range(_MAX_DRAWS_PER_EXAMPLE):
            example = sample(rng, index)
            if key(example) not in seen:
                break
        else:
            raise ValueError(
                f"could not draw {num_examples} distinct examples (stuck at {index}); ask for fewer, or larger media"
            )
        seen.add(key(example))
        examples.append(example)
    return examples


def build_dataset_dict(tables: Mapping[str, pa.Table], features: Features, generation: str) -> DatasetDict:
    """One in-memory `Dataset` per split; nothing is written to the cache directory.

    Args:
        tables (`Mapping[str, pa.Table]`): each split's rows, encoded (`rows_to_table`).
        features (`Features`): the columns and their types.
        generation (`str`): the builder and every argument that shaped the rows. It makes each split's fingerprint,
            so `datasets` need not hash the data (which takes longer than generating it) and identical data gets the
            same fingerprint.
    """
    return DatasetDict(
        {
            name: Dataset(
                InMemoryTable(table),
                info=DatasetInfo(features=features),
                fingerprint=hashlib.sha256(f"{generation}/{name}".encode()).hexdigest()[:16],
            )
            for name, table in tables.items()
        }
    )


def rows_to_table(rows: list[dict[str, Any]], features: Features) -> pa.Table:
    """Encode `rows` (dicts of Python values, one key per column) as an Arrow table of `features`."""
    columns = {}
    for name, feature in features.items():
        values = [row[name] for row in rows]
        # Waveforms go to Arrow straight from numpy: encoding them value by value, as `Dataset.from_list` does, takes
        # about 4 ms per 1 s clip, longer than synthesising it.
        if name == "audio":
            columns[name] = _waveform_array(values)
        else:
            encoded = Features({name: feature}).encode_batch({name: values})[name]
            columns[name] = pa.array(encoded, type=features.arrow_schema.field(name).type)
    return pa.table(columns)


def split_held_out(dataset: DatasetDict) -> tuple[DatasetDict, DatasetDict]:
    """Separate the held-out rows (`held_out=True`) from the rest, split by split.

    Args:
        dataset (`DatasetDict`): a built-in data set (shapes, tones or multimodal).

    Returns:
        `tuple[DatasetDict, DatasetDict]`: `(seen, held_out)`. Instruction tuning trains on `seen`; the held-out
        fine-tuning task (LoRA) trains on `held_out["train"]` and is evaluated on `held_out["test"]`.
    """
    seen, held_out = DatasetDict(), DatasetDict()
    for name, split in dataset.items():
        is_held_out = np.asarray(split["held_out"], dtype=bool)
        seen[name] = split.select(np.flatnonzero(~is_held_out))
        held_out[name] = split.select(np.flatnonzero(is_held_out))
    return seen, held_out


def _waveform_array(values: list[dict[str, Any]]) -> pa.StructArray:
    """`{"array", "sampling_rate"}` structs as one Arrow array, the waveforms copied once."""
    waveforms = [np.asarray(value["array"], np.float32) for value in values]
    offsets = np.cumsum([0] + [len(waveform) for waveform in waveforms], dtype=np.int32)
    samples = np.concatenate(waveforms) if waveforms else np.zeros(0, np.float32)
    return pa.StructArray.from_arrays(
        [
            pa.ListArray.from_arrays(pa.array(offsets), pa.array(samples)),
            pa.array([value["sampling_rate"] for value in values], pa.int32()),
        ],
        names=["array", "sampling_rate"],
    )
