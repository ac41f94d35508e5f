"""`DeepseekV3Trainer`: every loss term weighted exactly under gradient accumulation (and, in
`tests/distributed/test_loss_weighting.py`, data parallelism), the logged terms the step's true means, the log-space
loss defined on the whole step, the `logit_scale` clamp, and load balancing inside Trainer."""

import math

import pytest
import torch
from weighting_case import CASES, build_model, build_rows, collate, run

from deepseekv3.training.trainer import LOSS_TERMS, loss_term_item_counts

# InfoNCE's negatives are the micro-batch's own: test_contrastive_accumulation_weights_by_pairs checks that term
EXACT_CASES = [case for case in CASES if "contrastive" not in case]
RELATIVE_TOLERANCE = 1e-6
# fp32 round-off of an update computed in another order; a wrongly weighted term is off by 10% or more
UPDATE_TOLERANCE = 1e-5


def relative_update_error(initial: dict, expected: dict, actual: dict) -> float:
    """||actual - expected|| / ||expected - initial|| over every float tensor: 0 when the two runs made the same
    update, about 1 when they differ as much as the update itself. Also checks the weights themselves agree to
    `RELATIVE_TOLERANCE` (||actual - expected|| / ||expected||)."""
    error = update = norm = 0.0
    for name, value in expected.items():
        if value.is_floating_point():
            error += (actual[name].double() - value.double()).pow(2).sum().item()
            update += (value.double() - initial[name].double()).pow(2).sum().item()
            norm += value.double().pow(2).sum().item()
    assert update > 1e-6, "the runs did not train"
    assert math.sqrt(error / norm) < RELATIVE_TOLERANCE
    return math.sqrt(error / update)


def assert_same_logs(expected: list[dict], actual: list[dict]) -> None:
    assert len(expected) == len(actual) > 0
    for expected_step, actual_step in zip(expected, actual):
        for name in ("loss", *LOSS_TERMS):
            assert (name in expected_step) == (name in actual_step), name
            if name in expected_step:
                assert actual_step[name] == pytest.approx(expected_step[name], rel=RELATIVE_TOLERANCE, abs=1e-6), name


def test_item_counts_follow_each_terms_mean():
    batch = collate(build_rows("all+contrastive")[:3])
    counts = dict(zip(LOSS_TERMS, loss_term_item_counts(batch).tolist()))
    assert counts["lm_loss"] == int(batch["labels"][:, 1:].ne(-100).sum()) > 0
    assert counts["contrastive_loss"] == 3 and counts["balance_loss"] == 3
    assert counts["distillation_loss"] == 2  # row 1 has no distilled position
    assert counts["gate_sparsity_loss"] == int(batch["attention_mask"].sum()) < batch["input_ids"].numel()
    contrastive_only = collate(build_rows("contrastive")[:3])
    assert loss_term_item_counts(contrastive_only).tolist() == [0, 3, 0, 0, 0]


@pytest.mark.parametrize("case", EXACT_CASES)
def test_accumulation_gives_the_update_of_one_batch(case, tmp_path):
    """2 and 4 accumulation steps of 2 and 1 rows equal one step of 4 rows, for each term alone and all together,
    over 2 SGD steps (the MoE bias moves after the first), and log the same values."""
    initial = build_model(case).state_dict()
    reference, reference_logs = run(case, str(tmp_path / "one"), batch_size=4, accumulation=1)
    for batch_size, accumulation in ((2, 2), (1, 4)):
        weights, logs = run(case, str(tmp_path / f"acc{accumulation}"), batch_size, accumulation)
        assert relative_update_error(initial, reference, weights) < UPDATE_TOLERANCE
        assert_same_logs(reference_logs, logs)


def test_logged_terms_are_the_steps_true_means(tmp_path):
    """The first log of an accumulated run holds the loss terms of the first 4 rows as one batch."""
    model = build_model("all").train()
    outputs = model(**collate(build_rows("all")[:4]))
    _, logs = run("all", str(tmp_path), batch_size=2, accumulation=2)
    for name in ("lm_loss", "distillation_loss", "gate_sparsity_loss", "balance_loss"):
        assert logs[0][name] == pytest.approx(outputs[name].item(), rel=1e-5), name
    assert logs[0]["loss"] == pytest.approx(outputs.loss.item(), rel=1e-5)


def test_contrastive_accumulation_weights_by_pairs(tmp_path):
    """InfoNCE within each micro-batch, each weighted by its share of the step's pairs: 2 SGD steps by hand."""
    model = build_model("contrastive").train()
    rows = build_rows("contrastive")
    learning_rate = 0.5
    for step in range(2):
        micro_batches = [collate(rows[step * 4 : step * 4 + 2]), collate(rows[step * 4 + 2 : step * 4 + 4])]
        model.zero_grad()
        for batch in micro_batches:
            (model(**batch).contrastive_loss * 2 / 4).backward()
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.grad is not None:
                    parameter -= learning_rate * parameter.grad
            model.model.logit_scale.clamp_(0, math.log(100))
    expected = {name: value.detach().clone() for name, value in model.state_dict().items()}
    weights, _ = run("contrastive", str(tmp_path), batch_size=2, accumulation=2)
    assert relative_update_error(build_model("contrastive").state_dict(), expected, weights) < UPDATE_TOLERANCE


def test_log_space_loss_is_defined_on_the_whole_step(tmp_path):
    """With log_space_loss, a step descends log(1 + L), L the loss of all its micro-batches: the same update with
    or without accumulation, and (SGD) the plain update shrunk by 1 / (1 + L)."""
    initial = build_model("all").state_dict()
    one, one_logs = run("all", str(tmp_path / "one"), 4, 1, log_space_loss=True)
    accumulated, accumulated_logs = run("all", str(tmp_path / "acc"), 2, 2, log_space_loss=True)
    assert relative_update_error(initial, one, accumulated) < UPDATE_TOLERANCE
    assert_same_logs(one_logs, accumulated_logs)

    plain, plain_logs = run("all", str(tmp_path / "plain"), 2, 2, max_steps=1)
    logged, _ = run("all", str(tmp_path / "log1"), 2, 2, max_steps=1, log_space_loss=True)
    shrink = 1.0 / (1.0 + plain_logs[0]["loss"])  # the logged loss stays the untransformed one
    expected = {
        name: initial[name] + (value - initial[name]) * shrink if value.is_floating_point() else value
        for name, value in plain.items()
    }
    # the MoE bias follows its own rule (no gradient): compare it separately
    bias_names = [name for name in expected if name.endswith("e_score_correction_bias")]
    for name in bias_names:
        torch.testing.assert_close(logged[name], plain[name])
        expected[name] = logged[name]
    assert relative_update_error(initial, expected, logged) < UPDATE_TOLERANCE


def test_logit_scale_is_clamped_as_a_parameter_after_each_step(tmp_path):
    model = build_model("contrastive")
    with torch.no_grad():
        model.model.logit_scale.fill_(math.log(100) + 1.0)  # above the cap: the clamp must bring it back
    outputs = model.train()(**collate(build_rows("contrastive")[:2]))
    outputs.contrastive_loss.backward()
    assert model.model.logit_scale.grad.abs().item() > 0  # not clamped in the loss: its gradient is alive

    from deepseekv3.training.trainer import DeepseekV3Trainer

    args = _short_arguments(tmp_path, max_steps=1)
    DeepseekV3Trainer(model=model, args=args, train_dataset=build_rows("contrastive"), data_collator=collate).train()
    assert model.model.logit_scale.item() == pytest.approx(math.log(100))


def _short_arguments(tmp_path, **overrides):
    from transformers import TrainingArguments

    defaults = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 2,
        "max_steps": 2,
        "optim": "sgd",
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "remove_unused_columns": False,
        "disable_tqdm": True,
    }
    return TrainingArguments(**{**defaults, **overrides})


# peft 0.21.2 reads `model.is_gradient_checkpointing`, which transformers 5.24 deprecates; the warning is theirs.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_trainer_balances_the_full_model_but_not_an_adapter(tmp_path):
    from peft import get_peft_model

    from deepseekv3.training.lora import default_lora_config
    from deepseekv3.training.trainer import DeepseekV3Trainer

    model = build_model("lm")
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    trainer = DeepseekV3Trainer(
        model=model, args=_short_arguments(tmp_path), train_dataset=build_rows("lm"), data_collator=collate
    )
    trainer.train()
    assert trainer.balancer is not None and bias.abs().sum() > 0
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert all(entry["expert_load_max_over_mean/layer_1"] >= 1.0 for entry in logs)

    adapted = get_peft_model(build_model("lm"), default_lora_config())
    trainer = DeepseekV3Trainer(
        model=adapted, args=_short_arguments(tmp_path / "lora"), train_dataset=build_rows("lm"), data_collator=collate
    )
    trainer.train()
    assert trainer.balancer is None
    assert adapted.base_model.model.model.layers[1].mlp.gate.e_score_correction_bias.abs().sum() == 0


def test_plain_trainer_loss_kwargs_warn_that_only_lm_loss_is_normalised():
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    from deepseekv3 import modeling_deepseekv3

    model = build_model("lm+gate").train()
    batch = collate(build_rows("lm+gate")[:2])
    logging.get_logger("transformers").warning_once.cache_clear()
    with CaptureLogger(modeling_deepseekv3.logger) as captured:
        model(**batch, num_items_in_batch=torch.tensor(10))
    assert "train with deepseekv3.training.trainer.DeepseekV3Trainer" in captured.out
