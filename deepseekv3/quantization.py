"""INT8 inference: post-training quantization (PTQ) and quantization-aware training (QAT) with torchao.

Both give symmetric per-channel int8 weights with dynamic per-token asymmetric int8 activations (torchao's
`Int8DynamicActivationInt8WeightConfig`; asymmetric because torchao's QAT fake-quantizes per-token activations only
that way, and so the converted model computes what training saw, to float rounding) in the `nn.Linear` layers of
attention, the dense MLPs and the shared experts, and in the routed experts. transformers fuses each MoE layer's
routed experts into two 3-D parameters, `mlp.experts.gate_up_proj` `(experts, 2 * moe_intermediate_size, hidden)` and
`mlp.experts.down_proj` `(experts, hidden, moe_intermediate_size)`, which hold most of a DeepSeek-V3 model's weights:
there every expert's output rows get their own scales, and each routed token its own activation scale. The modules
that decide or read out (the LM head, the head gates, the projection heads) stay fp32, as do the MoE router, RMSNorms,
embeddings and media convolutions.

- PTQ goes through transformers' own route: `from_pretrained(..., quantization_config=int8_quantization_config())`,
  whose torchao `FqnToConfig` names the linear weights and the two expert parameters (torchao quantizes a named 3-D
  parameter into an `Int8Tensor` with scales per expert and row). torchao's `Int8Tensor` has no grouped or batched
  matmul, so transformers' default experts kernels (`grouped_mm`, `batched_mm`) cannot run it; the int8 experts
  run through the experts implementation registered here with transformers, `INT8_EXPERTS_IMPLEMENTATION`: tokens
  grouped by expert, each token's activation quantized once for its experts' up-projections, one `torch._int_mm`
  per expert and projection. `load_int8_model` quantizes a saved fp32 model on load, or loads a saved int8 one, and
  selects it; the int8 model saves with `save_pretrained`. transformers does not save a model's experts
  implementation, so a plain `from_pretrained` of an int8 checkpoint picks `grouped_mm` and fails on the int8
  experts: pass `experts_implementation=INT8_EXPERTS_IMPLEMENTATION` (or `"eager"`: torchao's int8 linear, one expert
  at a time, slower), or use `load_int8_model`. `load_int8_model` also runs the int8 linear layers through
  `int8_linear_forward` on CPU (the same int8 products as torchao's linear, in fewer passes:
  `benchmarks/bench_int8.py`).
- QAT uses torchao's QAT API on top of a `Trainer` stage recipe: `prepare_qat` swaps the linear layers for
  fake-quantized ones and switches the routed experts to `QAT_EXPERTS_IMPLEMENTATION` (the same int8 rounding of
  weights and activations, straight-through gradients), the stage trains (best: the last steps of the model's own
  run, resumed from its checkpoint), and `convert_qat` removes the fake quantizers, saves the trained weights and
  quantizes them through the PTQ route.

torchao is an optional dependency (`pip install deepseekv3[quantization]`).
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, TorchAoConfig, TrainingArguments
from transformers.integrations.moe import ExpertsInterface

__all__ = [
    "EXPERT_PARAMETERS",
    "FP32_MODULES",
    "INT8_EXPERTS_IMPLEMENTATION",
    "QAT_EXPERTS_IMPLEMENTATION",
    "convert_qat",
    "fake_quantized_experts_forward",
    "has_int8_experts",
    "int8_experts_forward",
    "int8_linear_forward",
    "int8_quantization_config",
    "is_int8_quantizable",
    "load_int8_model",
    "prepare_qat",
    "train_qat",
    "use_int8_linear_kernel",
]

# Linear layers kept in fp32 (matched by name as transformers' `modules_to_not_convert` does); the other sensitive
# modules (router, norms, embeddings) are not `nn.Linear` and are never quantized.
FP32_MODULES = ("lm_head", "head_gate", "text_projection", "image_projection", "audio_projection")

# The routed experts' fused weights (parameters of transformers' `DeepseekV3Experts`, `mlp.experts`)
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")

# transformers experts implementations (`set_experts_implementation`) registered by this module
INT8_EXPERTS_IMPLEMENTATION = "int8_grouped_mm"
QAT_EXPERTS_IMPLEMENTATION = "int8_fake_quantized"

# The weights of the linear layers under a decoder layer's attention, dense MLP or shared experts (`q_a_proj`,
# `kv_a_proj_with_mqa`, `o_proj`, `mlp.gate_proj`, `shared_experts.down_proj`, ...), not the router (`mlp.gate`) or
# the norms; `modules_to_not_convert` still keeps `FP32_MODULES` out
_LINEAR_WEIGHTS = r"re:.*\.(?:self_attn|mlp|shared_experts)\.\w+_proj(?:_with_mqa)?\.weight"
_EXPERT_WEIGHTS = rf"re:.*\.mlp\.experts\.(?:{'|'.join(EXPERT_PARAMETERS)})"

# An activation row is quantized on the uint8 grid: the int8 grid of torchao's asymmetric quantization (`[-128,
# 127]`, zero point z) shifted by 128, value for value, which `torch._int_mm` multiplies with int8 fastest
_UINT8_RANGE = (0, 255)
_EPS = torch.finfo(torch.float32).eps  # torchao's `Int8Tensor.from_hp`


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


def int8_quantization_config(include_experts: bool = True) -> TorchAoConfig:
    """transformers' `TorchAoConfig` for int8 weights and dynamic int8 activations, `FP32_MODULES` left out.

    Args:
        include_experts (`bool`, *optional*, defaults to `True`): quantize the routed experts too; `False` leaves
            them fp32 (every other `nn.Linear` outside `FP32_MODULES` is quantized either way).

    Returns:
        `TorchAoConfig`, to pass as `quantization_config` to `from_pretrained`.
    """
    # transformers matches each pattern from the start of a parameter's name, or as its suffix: `head_gate` alone would
    # match neither `model.layers.0.self_attn.head_gate.down_proj.weight` nor its module
    patterns = [rf"(?:.*\.)?{name}" for name in FP32_MODULES]
    config = _int8_config()
    if not include_experts:
        return TorchAoConfig(config, modules_to_not_convert=patterns)
    # torchao quantizes the parameters the patterns name: the linear layers' weights and the experts' 3-D weights
    by_name = _torchao().FqnToConfig({_LINEAR_WEIGHTS: config, _EXPERT_WEIGHTS: config})
    return TorchAoConfig(by_name, modules_to_not_convert=patterns)


def has_int8_experts(model: nn.Module) -> bool:
    """Whether `model`'s routed experts hold int8 weights (torchao `Int8Tensor`s)."""
    int8_tensor = _torchao().Int8Tensor
    return any(
        isinstance(parameter, int8_tensor) and name.split(".")[-2:-1] == ["experts"]
        for name, parameter in model.named_parameters()
    )


def load_int8_model(path: str | Path, include_experts: bool = True, **kwargs: Any) -> PreTrainedModel:
    """Load a saved model in int8: an fp32 one quantized on load (PTQ), or one saved in int8 as it is.

    Args:
        path (`str` or `Path`): a `save_pretrained` folder (or Hub id) of the fp32 or int8 model.
        include_experts (`bool`, *optional*, defaults to `True`): quantize the routed experts of an fp32 model too
            (`int8_quantization_config`); an int8 model keeps what it was saved with.
        **kwargs: passed on to `AutoModelForCausalLM.from_pretrained`.

    Returns:
        The quantized model, its int8 linear layers on `int8_linear_forward` and its int8 experts on
        `INT8_EXPERTS_IMPLEMENTATION` (unless `kwargs` name an `experts_implementation`: `"eager"` runs them too,
        through torchao's int8 linear, one expert at a time); `save_pretrained` writes an int8 checkpoint that this
        function reloads.
    """
    if "quantization_config" in kwargs:
        raise ValueError("load_int8_model sets quantization_config itself; call from_pretrained to pass your own")
    if getattr(AutoConfig.from_pretrained(path), "quantization_config", None) is None:
        kwargs["quantization_config"] = int8_quantization_config(include_experts)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    use_int8_linear_kernel(model)
    if "experts_implementation" not in kwargs and has_int8_experts(model):
        model.set_experts_implementation(INT8_EXPERTS_IMPLEMENTATION)
    return model


def is_int8_quantizable(module: nn.Module, name: str) -> bool:
    """`quantize_` filter: an `nn.Linear` outside `FP32_MODULES` (`name` is its fully qualified name)."""
    parts = name.split(".")
    return isinstance(module, nn.Linear) and not any(kept in parts for kept in FP32_MODULES)


def _expert_groups(top_k_index: torch.Tensor, num_experts: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """The routed (token, expert) pairs grouped by expert: `(expert, tokens, pairs)` for each expert that receives
    tokens, `tokens` the rows of the hidden states it computes and `pairs` their positions in `top_k_index.flatten()`
    (to read the routing weights)."""
    num_top_k = top_k_index.shape[-1]
    expert_ids, pairs = torch.sort(top_k_index.flatten(), stable=True)
    counts = torch.bincount(expert_ids, minlength=num_experts)[:num_experts].tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count:
            group = pairs[start : start + count]
            yield expert, group // num_top_k, group
        start += count


def _quantize_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dynamic asymmetric quantization of each row (token) of a 2-D fp32 tensor: `(uint8 values, scales (rows, 1),
    zero points (rows, 1))`, `rows ~ scales * (values - zero points)`.

    What torchao's `choose_qparams_affine` and `quantize_affine` compute (asymmetric, on `_UINT8_RANGE`), the same
    operations in the same order, so the same values (tested bit for bit), without their block-size reshaping: the
    range includes 0, `scale = (max - min) / 255` (at least `_EPS`), `zero point = -round(min / scale)`, `value =
    round(x * (1 / scale)) + zero point`, clamped to the range.
    """
    low, high = torch.aminmax(rows, dim=-1, keepdim=True)
    low, high = low.clamp(max=0), high.clamp(min=0)
    scale = ((high - low) / float(_UINT8_RANGE[1] - _UINT8_RANGE[0])).clamp_(min=_EPS)
    zero_point = (low / scale).round_().neg_().clamp_(*_UINT8_RANGE)
    values = (rows * (1.0 / scale)).round_().add_(zero_point).clamp_(*_UINT8_RANGE).to(torch.uint8)
    return values, scale, zero_point.to(torch.int32)


def _int8_linear(
    values: torch.Tensor,
    row_scale: torch.Tensor,
    zero_point: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
) -> torch.Tensor:
    """`rows @ weight.T` in int8 for rows quantized by `_quantize_rows` (`row_scale` may fold in a factor per row)
    and an int8 weight `(out, in)` with scales `(out, 1)`: one uint8 x int8 -> int32 matmul less the zero points'
    term (`zero point x the weight's row sums`, from the same kernel), exact in int32, then the scales in fp32."""
    weight_t = weight.t()
    ones = torch.ones(1, weight.shape[1], dtype=torch.uint8, device=weight.device)
    output = torch._int_mm(values, weight_t).sub_(zero_point * torch._int_mm(ones, weight_t))
    return output.float().mul_(row_scale).mul_(weight_scale.t())


def _is_dynamic_int8(weight: torch.Tensor) -> bool:
    """Whether `weight` is a torchao `Int8Tensor` of this module's scheme: per output row, with dynamic per-token
    asymmetric activations and nothing else (no static activation scales, no pre-scaling)."""
    torchao_quantization = _torchao()
    if not isinstance(weight, torchao_quantization.Int8Tensor) or weight.act_quant_kwargs is None:
        return False
    return (
        weight.act_quant_kwargs.mapping_type == torchao_quantization.MappingType.ASYMMETRIC
        and weight.act_quant_scale is None
        and weight.act_pre_scale is None
        and tuple(weight.scale.shape) == (weight.shape[0], 1)
    )


def int8_linear_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """The forward `load_int8_model` gives its int8 `nn.Linear` layers: on CPU, the input quantized per token once
    (`_quantize_rows`) and multiplied by the int8 weight in one uint8 x int8 `torch._int_mm`, the zero points' term
    subtracted exactly in int32 before the scales (`_int8_linear`). torchao's linear for the same `Int8Tensor`
    computes the same int8 products; its eager path quantizes through generic functions, sums the weight's rows on
    every call and subtracts the zero points' term after the conversion to float (inexact once a dot product
    passes 2**24). On other devices, torchao's linear."""
    if input.device.type != "cpu":
        return nn.functional.linear(input, self.weight, self.bias)
    rows = input.reshape(-1, input.shape[-1]).float()
    values, scale, zero_point = _quantize_rows(rows)
    output = _int8_linear(values, scale, zero_point, self.weight.qdata, self.weight.scale)
    if self.bias is not None:
        output = output.add_(self.bias)
    return output.reshape(*input.shape[:-1], output.shape[-1]).to(input.dtype)


def use_int8_linear_kernel(model: nn.Module) -> int:
    """Run every `nn.Linear` of `model` whose weight is a dynamic int8 `Int8Tensor` through `int8_linear_forward`
    (set as the module's `forward`; `load_int8_model` does it). Returns how many layers it set."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.Linear) and _is_dynamic_int8(module.weight):
            module.forward = int8_linear_forward.__get__(module)
            count += 1
    return count


def int8_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers experts implementation `INT8_EXPERTS_IMPLEMENTATION` for routed experts with int8 weights.

    Each token's hidden state is quantized once (per token, as torchao quantizes a linear layer's input) for the
    up-projections of all its experts; each expert's gated intermediate rows are quantized again, per (token,
    expert) pair, for its down-projection, whose output scale carries the routing weight.
    """
    gate_up, down = self.gate_up_proj, self.down_proj
    if not isinstance(gate_up, _torchao().Int8Tensor):
        raise ValueError(f"experts_implementation={INT8_EXPERTS_IMPLEMENTATION!r} needs int8 expert weights")
    values, scale, zero_point = _quantize_rows(hidden_states)
    routing_weights = top_k_weights.reshape(-1, 1)
    output = torch.zeros_like(hidden_states)
    for expert, tokens, pairs in _expert_groups(top_k_index, self.num_experts):
        intermediate = _int8_linear(
            values[tokens], scale[tokens], zero_point[tokens], gate_up.qdata[expert], gate_up.scale[expert]
        )
        values_down, scale_down, zero_point_down = _quantize_rows(self._apply_gate(intermediate))
        row_scale = scale_down * routing_weights[pairs]
        expert_output = _int8_linear(values_down, row_scale, zero_point_down, down.qdata[expert], down.scale[expert])
        output.index_add_(0, tokens, expert_output.to(output.dtype))
    return output


def _fake_quantizers() -> tuple[Callable, Callable]:
    """torchao's QAT fake quantizers of `prepare_qat`'s scheme: `(activations per token, asymmetric; weights per
    output row, symmetric)`, both int8 with straight-through gradients."""
    qat = _torchao().qat
    activation = qat.IntxFakeQuantizer(qat.IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False))
    weight = qat.IntxFakeQuantizer(qat.IntxFakeQuantizeConfig(torch.int8, "per_channel", is_symmetric=True))
    return activation, weight


def fake_quantized_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """transformers experts implementation `QAT_EXPERTS_IMPLEMENTATION`: the routed experts in fp32 on int8
    fake-quantized weights (per expert and output row) and activations (per token for the up-projection, per
    (token, expert) pair for the down-projection), as `int8_experts_forward` computes them after `convert_qat`."""
    fake_quantize_activation, fake_quantize_weight = _fake_quantizers()
    gate_up = fake_quantize_weight(self.gate_up_proj.flatten(0, 1)).view_as(self.gate_up_proj)
    down = fake_quantize_weight(self.down_proj.flatten(0, 1)).view_as(self.down_proj)
    inputs = fake_quantize_activation(hidden_states)
    routing_weights = top_k_weights.reshape(-1, 1)
    output = torch.zeros_like(hidden_states)
    for expert, tokens, pairs in _expert_groups(top_k_index, self.num_experts):
        intermediate = self._apply_gate(nn.functional.linear(inputs[tokens], gate_up[expert]))
        expert_output = nn.functional.linear(fake_quantize_activation(intermediate), down[expert])
        output.index_add_(0, tokens, (expert_output * routing_weights[pairs]).to(output.dtype))
    return output


ExpertsInterface.register(INT8_EXPERTS_IMPLEMENTATION, int8_experts_forward)
ExpertsInterface.register(QAT_EXPERTS_IMPLEMENTATION, fake_quantized_experts_forward)


def prepare_qat(model: PreTrainedModel, include_experts: bool = True) -> PreTrainedModel:
    """Fake-quantize the model for QAT (in place), matching the PTQ scheme: symmetric per-channel int8 weights,
    asymmetric per-token int8 activations. Swaps every quantizable linear layer for torchao's fake-quantized linear
    and, with `include_experts`, switches the routed experts to `QAT_EXPERTS_IMPLEMENTATION` (their parameters stay
    as they are). Call before building the `Trainer` (the optimizer must see the swapped layers' parameters).

    Args:
        model: the fp32 model to fake-quantize.
        include_experts (`bool`, *optional*, defaults to `True`): fake-quantize the routed experts too.

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
    if include_experts and model.config._experts_implementation != QAT_EXPERTS_IMPLEMENTATION:
        model._experts_implementation_before_qat = model.config._experts_implementation
        model.set_experts_implementation(QAT_EXPERTS_IMPLEMENTATION)
    return model


def convert_qat(model: PreTrainedModel, save_directory: str | Path, **kwargs: Any) -> PreTrainedModel:
    """Finish QAT: remove the fake quantizers, save the trained weights, and load them quantized to int8.

    Args:
        model: a model prepared with `prepare_qat` and trained; its experts go back to the implementation they
            had before `prepare_qat`.
        save_directory (`str` or `Path`): where the trained fp32 weights are written (`save_pretrained`).
        **kwargs: passed on to `load_int8_model` (e.g. `dtype`).

    Returns:
        The int8 model (`load_int8_model` of `save_directory`), its experts int8 where QAT fake-quantized them.
    """
    torchao_quantization = _torchao()
    if not any(isinstance(module, torchao_quantization.qat.FakeQuantizedLinear) for module in model.modules()):
        raise ValueError("convert_qat needs a model prepared with prepare_qat (it has no fake-quantized layer)")
    torchao_quantization.quantize_(model, torchao_quantization.qat.QATConfig(step="convert"))
    include_experts = model.config._experts_implementation == QAT_EXPERTS_IMPLEMENTATION
    if include_experts:
        model.set_experts_implementation(model.__dict__.pop("_experts_implementation_before_qat"))
    model.save_pretrained(save_directory)
    return load_int8_model(save_directory, include_experts=include_experts, **kwargs)


def train_qat(
    model: PreTrainedModel,
    train_examples: Sequence[Mapping[str, Any]],
    args: TrainingArguments,
    save_directory: str | Path,
    stage: str = "instruct",
    resume_from_checkpoint: str | Path | None = None,
    include_experts: bool = True,
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
        include_experts (`bool`, *optional*, defaults to `True`): fake-quantize and convert the routed experts too.

    Returns:
        The int8 model.
    """
    from .training.recipes import build_stage_trainer

    if stage == "lora":
        raise ValueError("train_qat fine-tunes every parameter; stage 'lora' trains adapters only")
    prepare_qat(model, include_experts=include_experts)
    checkpoint = None if resume_from_checkpoint is None else str(resume_from_checkpoint)
    build_stage_trainer(stage, model, train_examples, args).train(resume_from_checkpoint=checkpoint)
    return convert_qat(model, save_directory, dtype=model.dtype)
