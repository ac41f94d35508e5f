"""`benchmarks/bench_alignment.py --combine`: runs done in separate sittings are summarised as one run would be."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_alignment  # noqa: E402

from deepseekv3.training.demo import QUESTION_TYPES  # noqa: E402

SETTINGS = {"num_images": 20000, "stage_steps": {"contrastive": 200, "distill": 2000, "instruct": 1200}}


def run(variant: str, seed: int, accuracy: float) -> dict:
    figures = {measure: {q: accuracy for q in QUESTION_TYPES} for measure in ("scored", "generated")}
    held_out = {measure: {"color": accuracy / 2} for measure in ("scored", "generated")}
    return {"variant": variant, "seed": seed, "test": figures, "held_out_test": held_out}


def results_file(path: Path, runs: list[dict], settings: dict = SETTINGS, seconds: float = 60.0) -> Path:
    part = {"command": "python benchmarks/bench_alignment.py", "seconds": seconds, "settings": settings}
    path.write_text(json.dumps({**part, "floors": {"test": {}}, "runs": runs}))
    return path


def test_combined_parts_give_the_differences_of_one_run(tmp_path):
    ab = results_file(
        tmp_path / "ab.json", [run(v, s, a) for s in (0, 1, 2) for v, a in (("A", 0.9 + s / 100), ("B", 0.6))]
    )
    cd = results_file(tmp_path / "cd.json", [run("C", s, 0.8) for s in (0, 1, 2)], seconds=30.0)
    combined = bench_alignment.combine_results([ab, cd])
    together = bench_alignment.summarize(
        [run(v, s, a) for s in (0, 1, 2) for v, a in (("A", 0.9 + s / 100), ("B", 0.6), ("C", 0.8))]
    )
    assert combined["summary"] == together
    assert combined["summary"]["differences"]["A-C"]["scored"]["color"]["mean"] == pytest.approx(0.11)
    assert combined["seconds"] == 90.0
    assert [part["command"] for part in combined["parts"]] == ["python benchmarks/bench_alignment.py"] * 2


def test_combine_refuses_other_settings_and_repeated_runs(tmp_path):
    ab = results_file(tmp_path / "ab.json", [run("A", 0, 0.9)])
    other = results_file(tmp_path / "other.json", [run("C", 0, 0.8)], settings={**SETTINGS, "num_images": 9400})
    with pytest.raises(ValueError, match="other settings.*num_images"):
        bench_alignment.combine_results([ab, other])
    again = results_file(tmp_path / "again.json", [run("A", 0, 0.8)])
    with pytest.raises(ValueError, match="variant A at seed 0 is in both"):
        bench_alignment.combine_results([ab, again])
