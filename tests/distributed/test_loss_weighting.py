"""`DeepseekV3Trainer` on 2 processes (DDP, gloo) gives the update and the logs of one process: every loss term, the
MoE bias (the same on both ranks), with and without accumulation (`tests/training/weighting_case.py`)."""

import sys
from pathlib import Path

import pytest
from distributed_helpers import read_json, read_weights, run_torchrun

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
from test_trainer import UPDATE_TOLERANCE, assert_same_logs, relative_update_error  # noqa: E402
from weighting_case import build_model, run  # noqa: E402

pytestmark = pytest.mark.distributed

# (case, per-process batch, accumulation) on 2 processes -> the same rows as (batch, accumulation) on one
SINGLE_PROCESS_EQUIVALENT = {
    ("all", 2, 1): (4, 1),
    ("all", 1, 2): (4, 1),
    # InfoNCE's negatives are the micro-batch's own: the same micro-batches, accumulated on one process
    ("all+contrastive", 2, 1): (2, 2),
}


def test_ddp_trainer_matches_one_process(tmp_path):
    run_torchrun(2, "loss_weighting", str(tmp_path))
    logs = read_json(tmp_path / "loss_weighting.json")
    for (case, batch_size, accumulation), (single_batch, single_accumulation) in SINGLE_PROCESS_EQUIVALENT.items():
        name = f"{case}-{batch_size}-{accumulation}"
        expected, expected_logs = run(case, str(tmp_path / f"single-{name}"), single_batch, single_accumulation)
        ranks = [read_weights(tmp_path / f"{name}-rank{rank}.safetensors") for rank in (0, 1)]
        initial = build_model(case).state_dict()
        for weights in ranks:
            assert relative_update_error(initial, expected, weights) < UPDATE_TOLERANCE, name
        bias = "model.layers.1.mlp.gate.e_score_correction_bias"
        assert expected[bias].abs().sum() > 0  # the balancer moved it
        assert (ranks[0][bias] == ranks[1][bias]).all() and (ranks[0][bias] == expected[bias]).all()
        assert_same_logs(expected_logs, logs[name])
