"""INT8 inference: post-training quantization (PTQ) and quantization-aware training (QAT) with torchao.

Both give symmetric per-channel int8 weights with dynamic per-token asymmetric int8 activations (torchao's
`Int8DynamicActivationInt8WeightConfig`; asymmetric because torchao's QAT fake-quantizes per-token activations only
that way, and so the converted model computes what training saw, to float rounding) in the `nn.Linear` layers of
attention, the dense MLPs and the shared experts. The modules that decide or read out (the LM head, the head gates,
the projection heads) stay fp32, as do those that are not `nn.Linear` (the MoE router, RMSNorms, embeddings, media
convolutions, and the routed experts, fused into 3-D tensors).

- PTQ goes through transformers' own route: `from_pretrained(..., quantization_config=int8_quantization_config())`;
  the int8 model saves with `save_pretrained` and loads back with a plain `from_pretrained`.
- QAT uses torchao's QAT API on top of a `Trainer` stage recipe: `prepare_qat` swaps the linear layers for
  fake-quantized ones (the same int8 rounding, straight-through gradients), the stage trains (best: the last steps of
  the model's own run, resumed from its checkpoint), and `convert_qat` removes the fake quantizers, saves the trained
  weights and quantizes them through the PTQ route.

torchao is an optional dependency (`pip install deepseekv3[quantization]`).
"""

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, TorchAoConfig, TrainingArguments

__all__ = [
    "FP32_MODULES",
    "convert_qat",
    "int8_quantization_config",
    "is_int8_quantizable",
    "load_int8_model",
    "prepare_qat",
    "train_qat",
]

# Linear layers kept in fp32 (matched by name as transformers' `modules_to_not_convert` does); the other sensitive
# modules (router, norms, embeddings) are not `nn.Linear` and are never quantized.
FP32_MODULES = ("lm_head", "head_gate", "text_projection", "image_projection", "audio_projection")


def _torchao():
    try:
        import torchao.quantization as torchao_quantization
    except ImportError as error:
        raise ImportError(
            "INT8 quantization needs torchao: pip install 'deepseekv3[quantization]' (or torchao)"
        ) from error
    return torchao_quantization


def _int8_config():
    torchao_quantization = _torchao()
    return torchao_quantization.Int8DynamicActivationInt8WeightConfig(
        act_mapping_type=torchao_quantization.MappingType.ASYMMETRIC
    )


def int8_quantization_config() -> TorchAoConfig:
    """transformers' `TorchAoConfig` for int8 weights and dynamic int8 activations, `FP32_MODULES` left out.

    Returns:
        `TorchAoConfig`, to pass as `quantization_config` to `from_pretrained`.
    """
    # transformers matches each pattern from the start of a parameter's name, or as its suffix: `head_gate` alone would
    # match neither `model.layers.0.self_attn.head_gate.down_proj.weight` nor its module
    patterns = [rf"(?:.*\.)?{name}" for name in FP32_MODULES]
    return TorchAoConfig(_int8_config(), modules_to_not_convert=patterns)


def load_int8_model(path: str | Path, **kwargs: Any) -> PreTrainedModel:
    """Load a saved fp32 model and quantize it to int8 on load (PTQ).

    Args:
        path (`str` or `Path`): a `save_pretrained` folder (or Hub id) of the fp32 model.
        **kwargs: passed on to `AutoModelForCausalLM.from_pretrained`.

    Returns:
        The quantized model; `save_pretrained` writes an int8 checkpoint that a plain `from_pretrained` reloads.
    """
    if "quantization_config" in kwargs:
        raise ValueError("load_int8_model sets quantization_config itself; call from_pretrained to pass your own")
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=int8_quantization_config(), **kwargs)


def is_int8_quantizable(module: nn.Module, name: str) -> bool:
    """`quantize_` filter: an `nn.Linear` outside `FP32_MODULES` (`name` is its fully qualified name)."""
    parts = name.split(".")
    return isinstance(module, nn.Linear) and not any(kept in parts for kept in FP32_MODULES)


def prepare_qat(model: PreTrainedModel) -> PreTrainedModel:
    """Swap every quantizable linear layer for torchao's fake-quantized linear (in place), matching the PTQ scheme:
    symmetric per-channel int8 weights, asymmetric per-token int8 activations. Call before building the `Trainer`
    (the optimizer must see the swapped layers' parameters).

    Returns:
        `model`, for chaining.
    """
    torchao_quantization = _torchao()
    qat = torchao_quantization.qat
    config = qat.QATConfig(
        activation_config=qat.IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False),
        weight_config=qat.IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True),
        step="prepare",
    )
    torchao_quantization.quantize_(model, config, filter_fn=is_int8_quantizable)
    return model


def convert_qat(model: PreTrainedModel, save_directory: str | Path, **kwargs: Any) -> PreTrainedModel:
    """Finish QAT: remove the fake quantizers, save the trained weights, and load them quantized to int8.

    Args:
        model: a model prepared with `prepare_qat` and trained.
        save_directory (`str` or `Path`): where the trained fp32 weights are written (`save_pretrained`).
        **kwargs: passed on to `from_pretrained` (e.g. `dtype`).

    Returns:
        The int8 model (`load_int8_model` of `save_directory`).
    """
    torchao_quantization = _torchao()
    if not any(isinstance(module, torchao_quantization.qat.FakeQuantizedLinear) for module in model.modules()):
        raise ValueError("convert_qat needs a model prepared with prepare_qat (it has no fake-quantized layer)")
    torchao_quantization.quantize_(model, torchao_quantization.qat.QATConfig(step="convert"))
    model.save_pretrained(save_directory)
    return load_int8_model(save_directory, **kwargs)


def train_qat(
    model: PreTrainedModel,
    train_examples: Sequence[Mapping[str, Any]],
    args: TrainingArguments,
    save_directory: str | Path,
    stage: str = "instruct",
    resume_from_checkpoint: str | Path | None = None,
) -> PreTrainedModel:
    """Quantization-aware fine-tuning with a stage recipe: `prepare_qat` -> `Trainer.train()` -> `convert_qat`.

    QAT works best as the last steps of the model's own training run: pass a `Trainer` checkpoint of that run as
    `resume_from_checkpoint` (with the run's `args`), and the fake-quantized model continues its optimizer state,
    learning-rate schedule and data order to `args.max_steps`. Fine-tuning a finished model again restarts the
    optimizer and the schedule: on the demo model (benchmarks/bench_int8.py), 40 such steps at a learning rate
    of 3e-5 or 3e-4 moved the accuracy by -4.6 to +1.0 points with the data order, as much without fake
    quantization as with it.

    Args:
        model: the fp32 `DeepseekV3MultimodalForConditionalGeneration` to fine-tune (modified in place).
        train_examples: encoded examples of `stage` (see `deepseekv3.training.recipes.select_stage_examples`).
        args (`TrainingArguments`): the fine-tuning schedule; `remove_unused_columns=False`.
        save_directory (`str` or `Path`): where the trained weights are written before int8 conversion.
        stage (`str`): the recipe, one of `deepseekv3.training.recipes.STAGES` except `lora`.
        resume_from_checkpoint (`str` or `Path`, *optional*): a checkpoint folder of the run that trained `model`
            (`save_strategy` of that run), to continue from.

    Returns:
        The int8 model.
    """
    from .training.recipes import build_stage_trainer

    if stage == "lora":
        raise ValueError("train_qat fine-tunes every parameter; stage 'lora' trains adapters only")
    prepare_qat(model)
    checkpoint = None if resume_from_checkpoint is None else str(resume_from_checkpoint)
    build_stage_trainer(stage, model, train_examples, args).train(resume_from_checkpoint=checkpoint)
    return convert_qat(model, save_directory, dtype=model.dtype)
