"""The main job end to end, in its quick form: every step runs and leaves the report, plots and a loadable model."""

import json

import pytest
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

from deepseekv3.training.demo import QUESTION_TYPES, DemoSettings, format_accuracy_table, run_demo

# peft 0.21.2 reads `model.is_gradient_checkpointing`, which transformers 5.24 deprecates; the warning is theirs.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def test_quick_demo_writes_report_plots_and_a_hub_ready_model(tmp_path):
    report = run_demo(DemoSettings.quick(output_dir=str(tmp_path)))

    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["seconds"] == report["seconds"] > 0
    assert set(saved["stages"]) == {"contrastive", "distill", "instruct", "lora"}
    for result in [*saved["stages"].values(), saved["baseline_without_alignment"], saved["chance"]]:
        assert set(result["accuracy"]) == set(QUESTION_TYPES)
        assert all(0.0 <= value <= 1.0 for value in result["accuracy"].values())
    assert saved["chance"]["accuracy"]["spatial"] == 0.25 and saved["chance"]["accuracy"]["shape"] > 0.33
    assert 0 < saved["lora_trainable_fraction"] < 1
    losses = saved["losses"]
    assert {"contrastive_loss"} <= losses["contrastive"][-1].keys()
    assert {"lm_loss", "distillation_loss"} <= losses["distill"][-1].keys()
    assert len(saved["gate_activations"]) == 3 and all(len(layer) == 4 for layer in saved["gate_activations"])
    assert len(saved["examples"]) == 3 and all(example["question"] for example in saved["examples"])

    for name in ("loss_curves.png", "accuracy.png", "gate_activations.png"):
        assert Image.open(tmp_path / name).size[0] > 100
    model_dir = tmp_path / "model"
    card = (model_dir / "README.md").read_text()
    assert "| model | color | shape | count | spatial | audio |" in card
    assert format_accuracy_table(report) in card
    assert type(AutoModelForCausalLM.from_pretrained(model_dir)).__name__ == (
        "DeepseekV3MultimodalForConditionalGeneration"
    )
    assert type(AutoProcessor.from_pretrained(model_dir)).__name__ == "DeepseekV3MultimodalProcessor"
