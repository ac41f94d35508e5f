"""Mixed-precision policy for training with `Trainer`: fp32 sensitive modules, weight-decay groups, loss scaling.

Four pieces, each usable alone and all wired into `Trainer` by `PrecisionTrainerMixin` / `PrecisionTrainer`:

- `apply_precision_policy`: casts a built model to bf16/fp16 while the modules named by the model's own
  `_keep_in_fp32_modules_strict` (norms, MoE router, head gates, modality-type embeddings) stay fp32, exactly as
  `from_pretrained(..., dtype=...)` would leave them.
- `get_decay_parameter_names` / `get_parameter_groups`: AdamW groups without weight decay for norms, biases, the
  router, the head gates, lookup-table embeddings and `logit_scale`.
- `AdaptiveGradScaler`: a `torch.amp.GradScaler` for fp16 whose growth and back-off follow the measured headroom
  between the largest scaled gradient and the largest finite fp16 value; its scale, headroom and skipped steps are
  logged with the Trainer's training logs.
- `log_space_loss`: the optional `log(1 + loss)` transform (`PrecisionTrainingArguments(log_space_loss=True)`).

bf16 and fp16 themselves come from `TrainingArguments(bf16=True)` / `TrainingArguments(fp16=True)`, i.e. Accelerate's
autocast (and, for fp16, its `GradScaler`, which `PrecisionTrainerMixin` swaps for the adaptive one).
"""

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainingArguments
from transformers.core_model_loading import build_glob_alternation
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm, DeepseekV3TopkRouter
from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
from transformers.trainer_pt_utils import get_parameter_names
from transformers.utils import logging

from ..attention_deepseekv3 import DeepseekV3MultimodalHeadGate

__all__ = [
    "AdaptiveGradScaler",
    "PrecisionTrainer",
    "PrecisionTrainerMixin",
    "PrecisionTrainingArguments",
    "apply_precision_policy",
    "get_decay_parameter_names",
    "get_parameter_groups",
    "log_space_loss",
]

logger = logging.get_logger(__name__)

_POLICY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# `Trainer.get_decay_parameter_names`'s name patterns (transformers 5.24), matched against lower-cased names.
_TRAINER_NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
# Ours on top: whole modules whose parameters never decay, and the contrastive temperature by name. Embedding
# tables decay every row at every step while a row only gets gradient when its token (or modality) occurs, so rare
# rows would shrink towards zero: no decay. The image-patch (Conv2d) and audio-frame (Conv1d) "embeddings" are
# linear maps of continuous input that get gradient from every image/clip: their weights decay like any linear
# layer (as ViT/CLIP patch embeddings do in timm and open_clip), their biases do not.
_NO_DECAY_MODULE_TYPES = (
    *ALL_LAYERNORM_LAYERS,
    DeepseekV3RMSNorm,  # our dtype-preserving norm subclasses it
    DeepseekV3TopkRouter,  # `gate.weight`; its `e_score_correction_bias` is a buffer, never in the optimizer
    DeepseekV3MultimodalHeadGate,
    nn.Embedding,  # token and modality-type embeddings (and `lm_head` when tied to the token embedding)
)
_NO_DECAY_NAME_PATTERNS = [*_TRAINER_NO_DECAY_PATTERNS, r"(?:^|\.)logit_scale$"]


def apply_precision_policy(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """Cast `model` in place to `dtype`, keeping fp32 what `from_pretrained(..., dtype=dtype)` keeps fp32.

    The fp32 set is not a second list: it is the model's `_keep_in_fp32_modules_strict` (and, for fp16,
    `_keep_in_fp32_modules`), resolved by transformers' own `_get_dtype_plan` and matched against the state-dict
    keys with the same glob alternation `from_pretrained` uses. Like `from_pretrained`, only parameters and
    persistent buffers are cast: non-persistent buffers (the rotary `inv_freq`) keep their fp32 values, which a
    plain `model.to(dtype)` would round. Parameters keep their identity (an existing optimizer still holds them).

    Args:
        model (`PreTrainedModel`): a built model, e.g. `DeepseekV3MultimodalForConditionalGeneration`.
        dtype (`torch.dtype`): `torch.bfloat16`, `torch.float16`, or `torch.float32` (everything back to fp32).

    Returns:
        `PreTrainedModel`: the same `model`, for chaining.
    """
    if dtype not in _POLICY_DTYPES:
        raise ValueError(f"dtype must be one of {_POLICY_DTYPES}, got {dtype}")
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"apply_precision_policy needs a transformers PreTrainedModel, got {type(model).__name__}")
    # private transformers API (5.24): the exact plan `from_pretrained` builds; test_precision compares the result
    # with a real `from_pretrained` so a change upstream fails loudly
    dtype_plan = model._get_dtype_plan(dtype)
    if dtype_plan:
        pattern, group_to_glob, _ = build_glob_alternation(list(dtype_plan))
    for name, tensor in model.state_dict(keep_vars=True).items():
        if not tensor.is_floating_point():
            continue
        match = pattern.search(name) if dtype_plan else None
        target = dtype_plan[group_to_glob[match.lastgroup]] if match else dtype
        if tensor.dtype == target:
            continue
        if isinstance(tensor, nn.Parameter):
            tensor.data = tensor.data.to(target)
        else:
            module_name, _, buffer_name = name.rpartition(".")
            setattr(model.get_submodule(module_name), buffer_name, tensor.to(target))
    model.config.dtype = dtype
    return model


def get_decay_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in `model.named_parameters()`) of the parameters that get weight decay.

    Excluded, on top of `Trainer`'s own exclusions (biases and anything named like a norm): every parameter of a
    LayerNorm/RMSNorm, the MoE router (`mlp.gate.weight`), the head gates (`head_gate.*`), every `nn.Embedding`
    (token and modality-type embeddings, and a tied `lm_head`), and `logit_scale`. The image-patch and audio-frame
    convolutions keep weight decay on their weights (see the comment on `_NO_DECAY_MODULE_TYPES`). Works on a
    PEFT-wrapped model too (matching is by module type and by name suffix).

    A tensor reachable under several names (a tied `lm_head`) decays only if no name of it is excluded; transformers'
    `get_parameter_names` would list the tied `lm_head.weight` as decaying while the embedding is not.

    Args:
        model (`nn.Module`): the model whose parameters are grouped.

    Returns:
        `list[str]`: parameter names, in `named_parameters()` order (one name per tensor).
    """
    decay_candidates = set(get_parameter_names(model, list(_NO_DECAY_MODULE_TYPES), _NO_DECAY_NAME_PATTERNS))
    excluded = {
        id(param) for name, param in model.named_parameters(remove_duplicate=False) if name not in decay_candidates
    }
    return [name for name, param in model.named_parameters() if id(param) not in excluded]


def get_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two optimizer parameter groups, as `Trainer.create_optimizer` builds them: decay, then no decay.

    Only parameters with `requires_grad` are included (frozen ones stay out of the optimizer, as in `Trainer`).

    Args:
        model (`nn.Module`): the model to optimize.
        weight_decay (`float`): the decay of the first group; the second group has 0.

    Returns:
        `list[dict]`: `[{"params": [...], "weight_decay": weight_decay}, {"params": [...], "weight_decay": 0.0}]`,
        ready for `torch.optim.AdamW(groups, lr=...)`.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay ({weight_decay}) must be >= 0")
    decay_names = set(get_decay_parameter_names(model))
    trainable = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    return [
        {"params": [param for name, param in trainable if name in decay_names], "weight_decay": weight_decay},
        {"params": [param for name, param in trainable if name not in decay_names], "weight_decay": 0.0},
    ]


def log_space_loss(loss: torch.Tensor) -> torch.Tensor:
    """`log(1 + loss)`: the optional log-space training objective (off by default).

    Gradients: `d/dθ log(1 + L) = ∇L / (1 + L)`. The direction is unchanged; every step is shrunk by the
    loss-dependent factor `1 / (1 + L)`, strongly while the loss is large (early training, hard batches,
    loss spikes) and hardly at all once `L << 1`. With SGD this is a loss-adaptive learning rate; with Adam the
    per-parameter normalisation cancels most of a constant factor, so the effect is mainly to down-weight
    high-loss batches relative to low-loss ones. The loss must be > -1 (our losses are >= 0).

    Args:
        loss (`torch.Tensor` of shape `()`): the training loss.

    Returns:
        `torch.Tensor` of shape `()`: `torch.log1p(loss)` (exact for small losses, unlike `log(1 + loss)`).
    """
    return torch.log1p(loss)


class AdaptiveGradScaler(torch.amp.GradScaler):
    """A `torch.amp.GradScaler` whose growth and back-off follow the measured gradient headroom.

    After the gradients of a step are unscaled, the scaler measures the largest absolute gradient `g` (the infinity
    norm over every parameter of the optimizer) and the headroom of the scaled gradients in bits:

        headroom = log2(max_finite / (g * scale))        # max_finite = 65504, the largest fp16 value

    and sets the next scale with this rule (`update()`):

    1. overflow (an inf/NaN gradient): the optimizer step is skipped (by `GradScaler.step`), the scale is multiplied
       by `backoff_factor` and the clean-step count restarts. The headroom of that step is unknown (NaN).
    2. finite, `headroom < target_headroom_bits`: the scale is backed off *before* anything overflows, by
       `2 ** -ceil(target_headroom_bits - headroom)`, which restores the target headroom; the step itself is
       applied; the clean-step count restarts.
    3. finite, enough headroom: one more clean step; after `growth_interval` clean steps in a row the scale grows by
       `2 ** min(floor(headroom - target_headroom_bits), max_growth_bits)` (possibly 1) and the count restarts.

    torch's plain scaler instead grows by a fixed factor after a fixed interval (2x after 2000 steps) and learns the
    ceiling only by overflowing; here growth jumps straight to the measured room and low headroom backs off without
    losing a step. Every factor is a power of two, so a power-of-two scale stays exact and scaling never rounds a
    gradient. The margin `target_headroom_bits` exists because the scaler sees only the parameter gradients: the
    activation gradients inside the fp16 backward pass can be larger; when they overflow anyway, rule 1 applies.

    Measuring costs one fused infinity norm over the gradients and one host sync per `update()`.

    Args:
        device (`str`, *optional*, defaults to `"cuda"`): device type of the gradients (`"cpu"` works as well).
        init_scale (`float`, *optional*, defaults to `2**16`): initial scale.
        target_headroom_bits (`float`, *optional*, defaults to 4.0): headroom to keep below the fp16 maximum, in bits
            (4 bits: the largest scaled parameter gradient stays 16x below 65504).
        growth_interval (`int`, *optional*, defaults to 100): clean steps in a row before the scale may grow.
        max_growth_bits (`int`, *optional*, defaults to 4): most bits the scale grows by at once (x16).
        backoff_factor (`float`, *optional*, defaults to 0.5): factor applied on an overflow, in (0, 1).
        enabled (`bool`, *optional*, defaults to `True`): as in `GradScaler`; disabled, every method is a pass-through.
        max_finite (`float`, *optional*, defaults to the largest fp16 value): the ceiling the headroom is measured to.
    """

    def __init__(
        self,
        device: str = "cuda",
        init_scale: float = 2.0**16,
        target_headroom_bits: float = 4.0,
        growth_interval: int = 100,
        max_growth_bits: int = 4,
        backoff_factor: float = 0.5,
        enabled: bool = True,
        max_finite: float = torch.finfo(torch.float16).max,
    ) -> None:
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor ({backoff_factor}) must be in (0, 1)")
        if growth_interval < 1:
            raise ValueError(f"growth_interval ({growth_interval}) must be >= 1")
        if max_growth_bits < 1:
            raise ValueError(f"max_growth_bits ({max_growth_bits}) must be >= 1")
        if target_headroom_bits < 0:
            raise ValueError(f"target_headroom_bits ({target_headroom_bits}) must be >= 0")
        # growth_factor only satisfies the parent's check: the growth comes from the headroom rule
        super().__init__(
            device,
            init_scale=init_scale,
            growth_factor=2.0,
            backoff_factor=backoff_factor,
            growth_interval=growth_interval,
            enabled=enabled,
        )
        self.target_headroom_bits = target_headroom_bits
        self.max_growth_bits = max_growth_bits
        self.max_finite = max_finite
        self.clean_steps = 0
        self.skipped_steps = 0
        self.last_headroom_bits = math.nan
        # largest unscaled |gradient| per optimizer (by id) this iteration, as a tensor: no host sync until update()
        self._max_grad: dict[int, torch.Tensor] = {}

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """`GradScaler.unscale_`, then records the largest unscaled |gradient| of `optimizer`'s parameters."""
        super().unscale_(optimizer)
        if not self.is_enabled():
            return
        grads = [param.grad for group in optimizer.param_groups for param in group["params"] if param.grad is not None]
        if grads:
            max_grad = torch.nn.utils.get_total_norm(grads, norm_type=math.inf).float()
        else:
            max_grad = torch.zeros((), device=self._scale.device)
        self._max_grad[id(optimizer)] = max_grad

    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs) -> float | None:
        """`GradScaler.step`, unscaling through `unscale_` first (also for optimizers that unscale themselves, e.g.
        fused Adam) so the headroom is always measured."""
        if self.is_enabled() and id(optimizer) not in self._max_grad:
            self.unscale_(optimizer)
        return super().step(optimizer, *args, **kwargs)

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        """Set the next scale by the headroom rule (class docstring); `new_scale` overrides it as in `GradScaler`."""
        if not self.is_enabled():
            return
        if new_scale is not None:
            self._max_grad.clear()
            super().update(new_scale)
            return
        if not self._max_grad:
            raise RuntimeError("update() needs a step() (or unscale_()) of at least one optimizer since the last one")
        scale = self.get_scale()
        max_grad = max(value.item() for value in self._max_grad.values())  # the one host sync
        self._max_grad.clear()
        next_scale = self._next_scale(scale, max_grad)
        super().update(next_scale)

    def _next_scale(self, scale: float, max_grad: float) -> float:
        """The headroom rule; updates the counters and `last_headroom_bits`."""
        if not math.isfinite(max_grad):
            self.skipped_steps += 1
            self.clean_steps = 0
            self.last_headroom_bits = math.nan
            return scale * self.get_backoff_factor()
        scaled = max_grad * scale
        headroom = math.log2(self.max_finite / scaled) if scaled > 0 else math.inf
        self.last_headroom_bits = headroom
        if headroom < self.target_headroom_bits:
            self.clean_steps = 0
            return scale * 2.0 ** -math.ceil(self.target_headroom_bits - headroom)
        self.clean_steps += 1
        if self.clean_steps < self.get_growth_interval():
            return scale
        self.clean_steps = 0
        growth_bits = (
            self.max_growth_bits if math.isinf(headroom) else math.floor(headroom - self.target_headroom_bits)
        )
        return scale * 2.0 ** min(growth_bits, self.max_growth_bits)

    def stats(self) -> dict[str, float]:
        """What the Trainer logs: `loss_scale`, `loss_scale_headroom_bits` (of the last step; NaN after an
        overflow) and `loss_scale_skipped_steps` (overflowed steps since the start)."""
        return {
            "loss_scale": self.get_scale(),
            "loss_scale_headroom_bits": self.last_headroom_bits,
            "loss_scale_skipped_steps": self.skipped_steps,
        }

    def state_dict(self) -> dict:
        """`GradScaler.state_dict` plus the headroom rule's settings and counters (saved by `Trainer` checkpoints)."""
        state = super().state_dict()
        if state:
            state.update(
                target_headroom_bits=self.target_headroom_bits,
                max_growth_bits=self.max_growth_bits,
                clean_steps=self.clean_steps,
                skipped_steps=self.skipped_steps,
            )
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores what `state_dict` saved; a plain `GradScaler` state keeps this scaler's rule settings."""
        state_dict = dict(state_dict)
        self.target_headroom_bits = state_dict.pop("target_headroom_bits", self.target_headroom_bits)
        self.max_growth_bits = state_dict.pop("max_growth_bits", self.max_growth_bits)
        self.clean_steps = state_dict.pop("clean_steps", 0)
        self.skipped_steps = state_dict.pop("skipped_steps", 0)
        super().load_state_dict(state_dict)


@dataclass
class PrecisionTrainingArguments(TrainingArguments):
    """`TrainingArguments` with the precision switches of `PrecisionTrainerMixin` (all parse with `HfArgumentParser`).

    Mixed precision itself is `bf16=True` / `fp16=True` as usual.

    Args:
        log_space_loss (`bool`, *optional*, defaults to `False`): train on `log(1 + L)` (see `log_space_loss`), `L`
            the loss of the whole optimizer step (every accumulation micro-batch on every process), so accumulation
            and data parallelism give the update of one step on the whole batch. Logged and evaluation losses stay
            untransformed (they compare across runs).
        adaptive_loss_scaling (`bool`, *optional*, defaults to `True`): with `fp16=True`, replace Accelerate's
            `GradScaler` by `AdaptiveGradScaler` and log its `stats()`.
        loss_scale_target_headroom_bits (`float`, *optional*, defaults to 4.0): `AdaptiveGradScaler`'s margin.
        loss_scale_growth_interval (`int`, *optional*, defaults to 100): `AdaptiveGradScaler`'s growth interval.
    """

    log_space_loss: bool = field(default=False, metadata={"help": "Train on log(1 + loss) (off by default)."})
    adaptive_loss_scaling: bool = field(
        default=True, metadata={"help": "With fp16, scale the loss by the measured gradient headroom."}
    )
    loss_scale_target_headroom_bits: float = field(
        default=4.0, metadata={"help": "Bits of headroom the adaptive loss scaler keeps below the fp16 maximum."}
    )
    loss_scale_growth_interval: int = field(
        default=100, metadata={"help": "Clean steps in a row before the adaptive loss scale may grow."}
    )


_PRECISION_DEFAULTS = {
    name: PrecisionTrainingArguments.__dataclass_fields__[name].default
    for name in (
        "log_space_loss",
        "adaptive_loss_scaling",
        "loss_scale_target_headroom_bits",
        "loss_scale_growth_interval",
    )
}


class PrecisionTrainerMixin:
    """Mixin for `Trainer` (or a subclass of it, listed before it): the precision policy of this module.

    - weight decay: `get_decay_parameter_names` (the hook `Trainer.create_optimizer` calls) uses this module's
      grouping, so the optimizer `Trainer` builds has the norm/bias/router/gate/embedding/`logit_scale` split;
    - fp16: Accelerate's `GradScaler` becomes an `AdaptiveGradScaler` (`adaptive_loss_scaling`), whose `stats()`
      join each training log (`loss_scale`, `loss_scale_headroom_bits`, `loss_scale_skipped_steps`); `log` is
      overridden rather than a `TrainerCallback.on_log` used because `on_log` runs after `state.log_history` was
      written and after the reporting callbacks, which would not see values added there;
    - fp16 on CPU is refused: Accelerate 1.15 neither autocasts nor scales on CPU (no `native_amp`, no scaler), so
      `TrainingArguments(fp16=True, use_cpu=True)` would otherwise train in plain fp32 without a word;
    - `log_space_loss=True`: each optimizer step descends `log(1 + L)`, `L` the step's loss over all its
      micro-batches and processes. Its gradient is `grad L / (1 + L)`, and `L` is only known once every micro-batch
      has run, so the accumulated, synchronised gradients are divided by `1 + L` after the step's last backward
      (before clipping and the optimizer), which is exactly the gradient one step on the whole batch would get.

    Options are read from `PrecisionTrainingArguments`; with plain `TrainingArguments` their defaults apply.
    """

    def _precision_option(self, name: str) -> Any:
        return getattr(self.args, name, _PRECISION_DEFAULTS[name])

    def create_accelerator_and_postprocess(self) -> None:
        """`Trainer.create_accelerator_and_postprocess`, then the checks and the scaler swap of the class docstring."""
        super().create_accelerator_and_postprocess()
        if self.args.fp16 and self.accelerator.device.type == "cpu":
            raise ValueError(
                "fp16=True on CPU: Accelerate does not autocast to fp16 nor scale the loss on CPU, so training would "
                "silently run in fp32. Use bf16=True on CPU, or fp16 on a GPU."
            )
        if self._precision_option("log_space_loss") and self.is_deepspeed_enabled:
            raise ValueError("log_space_loss rescales the accumulated gradients, which DeepSpeed keeps to itself")
        self._log_space_step_loss = None
        scaler = self.accelerator.scaler
        if scaler is None or not self._precision_option("adaptive_loss_scaling"):
            return
        if type(scaler) is not torch.amp.GradScaler:
            # e.g. FSDP's ShardedGradScaler, whose inf check is collective: replacing it would desynchronise ranks
            logger.warning_once(f"adaptive_loss_scaling: kept Accelerate's {type(scaler).__name__}")
            return
        self.accelerator.scaler = AdaptiveGradScaler(
            self.accelerator.device.type,
            init_scale=scaler.get_scale(),
            target_headroom_bits=self._precision_option("loss_scale_target_headroom_bits"),
            growth_interval=self._precision_option("loss_scale_growth_interval"),
            backoff_factor=scaler.get_backoff_factor(),
        )

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """See `get_decay_parameter_names` (this module)."""
        return get_decay_parameter_names(model)

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """`Trainer.training_step`; with `log_space_loss=True`, after the step's last micro-batch the gradients are
        divided by `1 + L` (class docstring)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not self._precision_option("log_space_loss"):
            return loss
        # each micro-batch's returned loss is its share of the step's loss on this process, as Trainer logs it
        step_loss = loss if self._log_space_step_loss is None else self._log_space_step_loss + loss
        self._log_space_step_loss = step_loss
        if self.accelerator.sync_gradients:
            shrink = 1.0 / (1.0 + self.accelerator.reduce(step_loss.float(), reduction="mean"))
            for parameter in model.parameters():
                if parameter.grad is not None:
                    parameter.grad.mul_(shrink.to(parameter.grad.dtype))
            self._log_space_step_loss = None
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """`Trainer.log`, with the adaptive scaler's `stats()` added to training logs."""
        scaler = self.accelerator.scaler
        if isinstance(scaler, AdaptiveGradScaler) and "loss" in logs:
            logs.update(scaler.stats())
        super().log(logs, start_time)


class PrecisionTrainer(PrecisionTrainerMixin, Trainer):
    """`Trainer` with `PrecisionTrainerMixin`: use it with `PrecisionTrainingArguments`."""
