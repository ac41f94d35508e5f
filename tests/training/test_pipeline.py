"""`deepseekv3 train --stages ...`: stages in turn, each from the model the one before saved, a summary of each
stage's validation accuracy, and a rerun that resumes a killed stage from its last checkpoint."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_recipes import _run, _train_command

from deepseekv3.training.pipeline import run_pipeline, stage_directories


def _pipeline_command(output_dir, *extra):
    command = _train_command(output_dir, "instruct", *extra)
    stage = command.index("--stage")
    return [*command[:stage], "--stages", "instruct,instruct", *command[stage + 2 :]]


def test_a_rerun_skips_finished_stages_and_resumes_the_killed_one_to_the_same_weights(tmp_path):
    output = tmp_path / "out"
    options = ("--stage_steps", "instruct=4", "--save_steps", "2", "--learning_rate", "1e-2")
    result = _run(_pipeline_command(output, *options))
    first, second = stage_directories(output, ["instruct", "instruct"])
    assert [entry["stage"] for entry in json.loads((output / "summary.json").read_text())] == ["instruct"] * 2
    accuracy = json.loads((second / "stage_done.json").read_text())["accuracy"]
    # per question type of the (tiny) validation split
    assert accuracy and set(accuracy) <= {"audio", "color", "count", "shape", "spatial"}
    assert all(0.0 <= value <= 1.0 for value in accuracy.values())
    assert "| instruct | 4 |" in result.stdout
    # the second stage started from the first one's model, and trained it further
    first_weights, uninterrupted = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert any(not torch.equal(first_weights[name], uninterrupted[name]) for name in first_weights)

    # killed after the second stage's checkpoint at step 2: its later checkpoint, model and marker never written
    shutil.rmtree(second / "checkpoint-4")
    for name in ("stage_done.json", "model.safetensors"):
        (second / name).unlink()
    resumed = _run(_pipeline_command(output, *options))
    assert "stage instruct: already done" in resumed.stderr
    assert "resuming from the last checkpoint" in resumed.stderr
    weights = load_file(second / "model.safetensors")
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--stages", "instruct,rl"], "name stages of"),
        (["--stages", "instruct", "--stage_steps", "grpo=3"], "each item is stage=steps"),
        (["--stages", "instruct", "--stage_steps", "instruct=0"], "each item is stage=steps"),
        (["--stages", "instruct", "--num_generations", "4"], "takes ['--num_generations']"),
        (["--stages", "instruct"], "needs --output_dir"),
    ],
)  # fmt: skip
def test_a_bad_pipeline_is_refused_before_anything_runs(tmp_path, extra, message):
    output = ["--output_dir", str(tmp_path / "out")] if "needs --output_dir" not in message else []
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        run_pipeline([*extra, *output, "--use_cpu", "--report_to", "none"])
    assert not (tmp_path / "out").exists()
