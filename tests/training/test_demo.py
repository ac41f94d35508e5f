"""The main job end to end, in its quick form: every step runs and leaves the report, plots, a loadable model and a
loadable LoRA adapter."""

import json

import pytest
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

from deepseekv3.training.demo import (
    QUESTION_TYPES,
    DemoSettings,
    format_accuracy_table,
    run_demo,
    stage_training_arguments,
)

# peft 0.21.2 reads `model.is_gradient_checkpointing`, which transformers 5.24 deprecates; the warning is theirs.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def test_quick_demo_writes_report_plots_a_hub_ready_model_and_an_adapter(tmp_path):
    report = run_demo(DemoSettings.quick(output_dir=str(tmp_path)))

    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["seconds"] == report["seconds"] > 0
    # the aligned model and the compute-matched baseline (trained in a second process), as many steps each
    assert set(saved["variants"]) == {"A", "B"}
    steps = {name: sum(log[-1]["step"] for log in v["losses"].values()) for name, v in saved["variants"].items()}
    assert steps["A"] == steps["B"] == 16
    assert list(saved["variants"]["A"]["validation_after"]) == ["contrastive", "distill", "instruct"]
    for variant in saved["variants"].values():
        for measure in ("scored", "generated", "invalid_replies"):
            assert set(variant["test"][measure]) == set(QUESTION_TYPES)
            assert all(0.0 <= value <= 1.0 for value in variant["test"][measure].values())
    floors = saved["floors"]["test"]
    assert floors["chance"]["spatial"] == 0.25
    assert all(floors["strongest"][q] >= floors["chance"][q] for q in QUESTION_TYPES)
    assert saved["floors"]["held_out_test"]["heuristic"]["color"] == 0.5  # 3-object scenes
    assert saved["saved_variant"] in {"A", "B"}
    assert 0 < saved["lora"]["trainable_fraction"] < 1
    assert {"lm_loss", "distillation_loss"} <= saved["variants"]["A"]["losses"]["distill"][-1].keys()
    assert len(saved["gate_activations"]) == 3 and all(len(layer) == 4 for layer in saved["gate_activations"])
    assert [example["model"] for example in saved["examples"]] == ["saved model"] * 4 + ["+ LoRA"]

    for name in ("loss_curves.png", "accuracy.png", "gate_activations.png"):
        assert Image.open(tmp_path / name).size[0] > 100
    model_dir = tmp_path / "model"
    card = (model_dir / "README.md").read_text()
    assert "| model (test) | color | shape | count | spatial | audio |" in card
    assert format_accuracy_table(report) in card
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    # the demo's image path: conv stem, each image's patches attending to one another both ways
    assert model.config.use_bidirectional_media_attention and model.config.image_conv_stem_channels > 0
    assert type(model).__name__ == "DeepseekV3MultimodalForConditionalGeneration"
    assert type(AutoProcessor.from_pretrained(model_dir)).__name__ == "DeepseekV3MultimodalProcessor"
    # the adapter is shared the PEFT way, beside the model, not merged into it
    assert (tmp_path / "lora-adapter" / "adapter_config.json").is_file()
    adapted = PeftModel.from_pretrained(model, tmp_path / "lora-adapter")
    assert any("lora_" in name for name, _ in adapted.named_parameters())
    assert not any("lora_" in key for key in AutoModelForCausalLM.from_pretrained(model_dir).state_dict())


def test_each_stage_trains_at_its_own_learning_rate(tmp_path):
    settings = DemoSettings(learning_rate=1e-3, contrastive_learning_rate=3e-4, lora_learning_rate=3e-3)
    rates = {
        stage: stage_training_arguments(settings, stage, tmp_path, steps=10).learning_rate
        for stage in ("contrastive", "distill", "instruct", "lora")
    }
    assert rates == {"contrastive": 3e-4, "distill": 1e-3, "instruct": 1e-3, "lora": 3e-3}
