"""Model cards (the `README.md` beside the weights) written with `huggingface_hub`'s `ModelCard` and `ModelCardData`.

The metadata is what the Hub reads: `library_name: transformers`, the `pipeline_tag` that matches the model's inputs
(`pipeline_tag_for`), `base_model` for a converted checkpoint, `datasets`, and evaluation results (`model-index`,
built from `EvalResult`s) for a trained one. `deepseekv3 demo` and `deepseekv3 convert` write their cards here.
"""

from collections.abc import Mapping, Sequence

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .configuration_deepseekv3 import DeepseekV3MultimodalConfig

__all__ = ["build_model_card", "evaluation_results", "pipeline_tag_for"]


def pipeline_tag_for(config: DeepseekV3MultimodalConfig) -> str:
    """The Hub pipeline tag (and transformers `pipeline` task) that matches the inputs a model of `config` reads.

    Args:
        config (`DeepseekV3MultimodalConfig`): the model's configuration.

    Returns:
        `str`: `"any-to-any"` with audio input (`AutoModelForMultimodalLM`), `"image-text-to-text"` with image input
        alone (`AutoModelForImageTextToText`), `"text-generation"` for text alone (`AutoModelForCausalLM`).
    """
    if config.use_audio_input:
        return "any-to-any"
    if config.use_image_input:
        return "image-text-to-text"
    return "text-generation"


def evaluation_results(
    metrics: Mapping[str, Mapping[str, float]],
    *,
    task_type: str,
    task_name: str,
    dataset_type: str,
    dataset_name: str,
    dataset_split: str,
    metric_names: Mapping[str, str] | None = None,
) -> list[EvalResult]:
    """One `EvalResult` per metric and data subset, for `build_model_card(eval_results=...)`.

    Args:
        metrics (`Mapping[str, Mapping[str, float]]`):
            `{metric_type: {subset: value}}`, e.g. `{"accuracy": {"color": 0.9, "shape": 0.8}}`; each subset becomes
            the result's `dataset_config`, so the Hub groups the metrics of one subset together.
        task_type (`str`): a Hub task id, e.g. `"any-to-any"`.
        task_name (`str`): the task in words.
        dataset_type (`str`): the data set's identifier.
        dataset_name (`str`): the data set in words.
        dataset_split (`str`): the split the values were measured on, e.g. `"test"`.
        metric_names (`Mapping[str, str]`, *optional*): a readable name per metric type, e.g.
            `{"exact_match": "exact match of greedy generate"}`.

    Returns:
        `list[EvalResult]`: in the order of `metrics`, then of its subsets.
    """
    metric_names = metric_names or {}
    return [
        EvalResult(
            task_type=task_type,
            task_name=task_name,
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_config=subset,
            dataset_split=dataset_split,
            metric_type=metric_type,
            metric_name=metric_names.get(metric_type),
            metric_value=float(value),
        )
        for metric_type, values in metrics.items()
        for subset, value in values.items()
    ]


def build_model_card(
    config: DeepseekV3MultimodalConfig,
    *,
    model_name: str,
    description: str,
    base_model: str | None = None,
    datasets: Sequence[str] | None = None,
    eval_results: Sequence[EvalResult] | None = None,
    tags: Sequence[str] = ("deepseekv3",),
) -> ModelCard:
    """The model card of a checkpoint of `config`: Hub metadata, a title and a markdown description.

    Args:
        config (`DeepseekV3MultimodalConfig`): the saved model's configuration; it sets the `pipeline_tag`.
        model_name (`str`): the card's title, and the model's name in the evaluation results.
        description (`str`): markdown below the title (what the model is, its results, how to load it).
        base_model (`str`, *optional*): the Hub id of the model this one derives from (the Hub takes ids only).
        datasets (`Sequence[str]`, *optional*): the data sets it was trained on.
        eval_results (`Sequence[EvalResult]`, *optional*): its evaluation results (`evaluation_results`).
        tags (`Sequence[str]`, *optional*, defaults to `("deepseekv3",)`): Hub tags.

    Returns:
        `ModelCard`: write it with `card.save(path / "README.md")`; `ModelCard.load` reads it back.
    """
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag=pipeline_tag_for(config),
        base_model=base_model,
        datasets=list(datasets) if datasets else None,
        tags=list(tags),
        # the name goes into the metadata only as the model's name in its results (`model-index`)
        model_name=model_name if eval_results else None,
        eval_results=list(eval_results) if eval_results else None,
    )
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n# {model_name}\n\n{description.strip()}\n")
