"""Model cards: the metadata the Hub reads (pipeline tag, library, base model, data sets, evaluation results) survives
`ModelCard.save` and `ModelCard.load`, for a card of our own and for the demo's."""

import pytest
from conftest import TINY_MEDIA_KWARGS, TINY_TEXT_KWARGS
from huggingface_hub import ModelCard

from deepseekv3 import DeepseekV3MultimodalConfig
from deepseekv3.model_card import build_model_card, evaluation_results, pipeline_tag_for
from deepseekv3.training.demo import QUESTION_TYPES, _model_card, format_accuracy_table

MEDIA_CONFIG = DeepseekV3MultimodalConfig(**TINY_TEXT_KWARGS, **TINY_MEDIA_KWARGS)


@pytest.mark.parametrize(
    ("media_kwargs", "tag"),
    [
        ({}, "text-generation"),
        ({**TINY_MEDIA_KWARGS, "use_audio_input": False}, "image-text-to-text"),
        ({**TINY_MEDIA_KWARGS, "use_image_input": False}, "any-to-any"),
        (TINY_MEDIA_KWARGS, "any-to-any"),
    ],
    ids=["text", "images", "audio", "images-and-audio"],
)
def test_pipeline_tag_follows_the_inputs(media_kwargs, tag):
    assert pipeline_tag_for(DeepseekV3MultimodalConfig(**TINY_TEXT_KWARGS, **media_kwargs)) == tag


def test_saved_card_loads_with_its_metadata_and_evaluation_results(tmp_path):
    results = evaluation_results(
        {"accuracy": {"color": 0.75, "shape": 0.5}, "exact_match": {"color": 0.25}},
        task_type="any-to-any",
        task_name="question answering",
        dataset_type="org/questions",
        dataset_name="questions",
        dataset_split="test",
        metric_names={"exact_match": "exact match of greedy generate"},
    )
    card = build_model_card(
        MEDIA_CONFIG,
        model_name="tiny",
        description="A tiny model.\n",
        base_model="org/base",
        datasets=["org/questions"],
        eval_results=results,
    )
    card.save(tmp_path / "README.md")

    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.library_name == "transformers" and loaded.data.pipeline_tag == "any-to-any"
    assert loaded.data.base_model == "org/base" and loaded.data.datasets == ["org/questions"]
    assert loaded.data.tags == ["deepseekv3"] and loaded.data.model_name == "tiny"
    measured = {
        (result.metric_type, result.dataset_config): (result.metric_value, result.metric_name)
        for result in loaded.data.eval_results
    }
    assert measured == {
        ("accuracy", "color"): (0.75, None),
        ("accuracy", "shape"): (0.5, None),
        ("exact_match", "color"): (0.25, "exact match of greedy generate"),
    }
    assert {(result.task_type, result.dataset_type, result.dataset_split) for result in loaded.data.eval_results} == {
        ("any-to-any", "org/questions", "test")
    }
    assert loaded.text.strip() == "# tiny\n\nA tiny model."


def test_a_card_without_results_or_base_model_has_no_such_metadata(tmp_path):
    build_model_card(MEDIA_CONFIG, model_name="tiny", description="A tiny model.").save(tmp_path / "README.md")
    data = ModelCard.load(tmp_path / "README.md").data.to_dict()
    assert data == {"library_name": "transformers", "pipeline_tag": "any-to-any", "tags": ["deepseekv3"]}


def _demo_report() -> dict:
    """The parts of `run_demo`'s report that its model card reads; a different value per question type."""
    scored = {question_type: (index + 1) / 10 for index, question_type in enumerate(QUESTION_TYPES)}
    generated = {question_type: (index + 1) / 20 for index, question_type in enumerate(QUESTION_TYPES)}
    chance = dict.fromkeys(QUESTION_TYPES, 0.25)
    return {
        "settings": {"stage_steps": {"contrastive": 1, "distill": 2, "instruct": 3, "lora": 1}},
        "floors": {"test": {"chance": chance, "strongest": chance}},
        "variants": {
            "A": {
                "test": {"scored": scored, "generated": generated, "invalid_replies": chance},
                "validation_after": {"instruct": scored},
            }
        },
        "saved_variant": "A",
    }


def test_demo_card_reports_the_saved_models_test_accuracy(tmp_path):
    report = _demo_report()
    _model_card(report, MEDIA_CONFIG).save(tmp_path / "README.md")

    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "any-to-any"
    assert card.data.datasets == ["deepseekv3.data"] and card.data.base_model is None
    test = report["variants"]["A"]["test"]
    measured = {(result.metric_type, result.dataset_config): result.metric_value for result in card.data.eval_results}
    assert measured == {
        **{("accuracy", question_type): value for question_type, value in test["scored"].items()},
        **{("exact_match", question_type): value for question_type, value in test["generated"].items()},
    }
    assert all(result.dataset_split == "test" for result in card.data.eval_results)
    # the human-readable part: the title, the accuracy table and how to load the model and the adapter
    assert card.text.lstrip().startswith("# deepseekv3 demo model\n")
    assert format_accuracy_table(report) in card.text
    assert "AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)" in card.text
    assert "PeftModel.from_pretrained(model, adapter_path)" in card.text
