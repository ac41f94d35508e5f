"""Tests of deepseekv3.data.mix_datasets: exact proportions, even repetition, determinism, streaming, clear errors."""

import collections

import pytest
from datasets import Dataset

from deepseekv3.data import mix_datasets


def _rows(source: str, count: int) -> Dataset:
    return Dataset.from_dict({"source": [source] * count, "id": [f"{source}{index}" for index in range(count)]})


def test_by_default_every_core_row_is_kept_once_and_edge_rows_make_the_fraction():
    mixed = mix_datasets(_rows("core", 40), _rows("edge", 7), edge_fraction=0.2, seed=0)
    counts = collections.Counter(mixed["source"])
    assert counts == {"core": 40, "edge": 10}
    assert sorted(set(mixed.filter(lambda row: row["source"] == "core")["id"])) == sorted(_rows("core", 40)["id"])


def test_a_sized_mix_has_exact_counts_and_repeats_each_source_evenly():
    mixed = mix_datasets(_rows("core", 30), _rows("edge", 7), edge_fraction=0.2, seed=3, num_examples=100)
    assert collections.Counter(mixed["source"]) == {"core": 80, "edge": 20}
    for source, size in (("core", 30), ("edge", 7)):
        repeats = collections.Counter(i for i, s in zip(mixed["id"], mixed["source"], strict=True) if s == source)
        assert len(repeats) == size and max(repeats.values()) - min(repeats.values()) <= 1


def test_the_same_seed_gives_the_same_mix_and_another_seed_another_order():
    core, edge = _rows("core", 50), _rows("edge", 9)
    first = mix_datasets(core, edge, seed=1, num_examples=60)["id"]
    assert mix_datasets(core, edge, seed=1, num_examples=60)["id"] == first
    assert mix_datasets(core, edge, seed=2, num_examples=60)["id"] != first


def test_the_edge_rows_are_spread_through_the_mix_not_appended():
    mixed = mix_datasets(_rows("core", 80), _rows("edge", 20), seed=0)["source"]
    assert 0 < mixed[:50].count("edge") < 20


def test_streaming_sources_interleave_at_the_fraction_until_both_are_exhausted():
    core, edge = _rows("core", 800).to_iterable_dataset(), _rows("edge", 40).to_iterable_dataset()
    stream = list(mix_datasets(core, edge, edge_fraction=0.2, seed=0))
    ids = {row["id"] for row in stream}
    assert ids == {f"core{i}" for i in range(800)} | {f"edge{i}" for i in range(40)}
    share = sum(row["source"] == "edge" for row in stream) / len(stream)
    assert 0.15 < share < 0.25
    assert [row["id"] for row in mix_datasets(core, edge, edge_fraction=0.2, seed=0)] == [row["id"] for row in stream]


@pytest.mark.parametrize(
    ("core", "edge", "kwargs", "message"),
    [
        (_rows("core", 4), _rows("edge", 2), {"edge_fraction": 1.0}, r"edge_fraction \(1.0\) must be in \[0, 1\)"),
        (_rows("core", 4), _rows("edge", 2).to_iterable_dataset(), {}, r"map-style \(Dataset\) or both streaming"),
        (_rows("core", 4), _rows("edge", 2).rename_column("id", "name"), {}, r"differ in \['id', 'name'\]"),
        (_rows("core", 8), _rows("edge", 2).select([]), {}, "the edge data set is empty but the mix needs 2"),
        (_rows("core", 4), _rows("edge", 2), {"num_examples": 0}, r"num_examples \(0\) must be at least 1"),
    ],
)
def test_bad_arguments_are_refused_naming_the_problem(core, edge, kwargs, message):
    with pytest.raises(ValueError, match=message):
        mix_datasets(core, edge, **kwargs)
