"""The alignment ablations: every variant trains as many optimizer steps, and D really drops distillation."""

import pytest

from deepseekv3.training.ablations import VARIANTS, schedule
from deepseekv3.training.demo import DemoSettings, prepare_demo_data, train_variant

STEPS = {"contrastive": 3, "distill": 5, "instruct": 7, "lora": 2}


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_trains_as_many_steps_as_a(variant):
    assert sum(steps for _, steps, _ in schedule(variant, STEPS)) == 15


def test_variants_are_the_documented_stage_sequences():
    assert schedule("A", STEPS) == [("contrastive", 3, {}), ("distill", 5, {}), ("instruct", 7, {})]
    assert schedule("B", STEPS) == [("instruct", 15, {})]
    assert schedule("C", STEPS) == [("distill", 8, {}), ("instruct", 7, {})]
    # D: A's batches and answer labels in stage 2, the distillation term weighted 0
    assert schedule("D", STEPS) == [
        ("contrastive", 3, {}),
        ("distill", 5, {"attention_distillation_weight": 0.0}),
        ("instruct", 7, {}),
    ]
    assert schedule("A", {**STEPS, "contrastive": 0}) == [("distill", 5, {}), ("instruct", 7, {})]


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="variant"):
        schedule("E", STEPS)
    with pytest.raises(ValueError, match="distill"):
        schedule("A", {"contrastive": 1, "instruct": 1})
    with pytest.raises(ValueError, match="non-negative"):
        schedule("A", {**STEPS, "distill": -1})


def test_variant_d_trains_stage_2_on_the_answers_without_the_term(tmp_path):
    settings = DemoSettings.quick(output_dir=str(tmp_path), baseline=False)
    data = prepare_demo_data(settings, progress=False)
    model, result = train_variant("D", settings, data, tmp_path)
    stage_2 = result["losses"]["distill (attention_distillation_weight=0.0)"]
    assert stage_2 and all("lm_loss" in entry and "distillation_loss" not in entry for entry in stage_2)
    # the weight is the ablation's, for stage 2 only: the trained model keeps the config's own
    assert model.config.attention_distillation_weight == 1.0
    assert list(result["validation_after"]) == list(result["losses"])
