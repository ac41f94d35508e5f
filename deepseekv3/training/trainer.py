"""The package's `Trainer`: every loss term weighted exactly under gradient accumulation and data parallelism, each
logged by name, DeepSeek-V3's load balancing, and the precision policy.

The model returns `loss` (the sum) and each term by name (`lm_loss`, `contrastive_loss`, `distillation_loss`,
`gate_sparsity_loss`, `balance_loss`), each a mean over its own items in the micro-batch: label tokens, contrastive
pairs, rows or real positions (`loss_term_item_counts`). `Trainer` alone can only normalise one of them over the
accumulated batch (it passes `num_items_in_batch`, a label count, into the model), so `DeepseekV3Trainer` does the
weighting itself: before an optimizer step it counts every term's items over the step's micro-batches and over the
data-parallel ranks, and each micro-batch contributes `term * its items / the step's items`. k accumulation steps of
batch b on w processes then give the update of one step of batch k*b*w on one process, for every term (the
contrastive term is InfoNCE within each micro-batch, whose pairs are its negatives; see the README), and the logged
`loss` and terms are the step's true means, averaged over the logging interval.

After every optimizer step it applies DeepSeek-V3's bias rule (`ExpertLoadBalancer`; not to a PEFT model, whose
adapter could not carry the moved bias) and keeps the contrastive
`logit_scale` in `[0, log 100]` (as CLIP does, on the parameter, so its gradient never vanishes), and it logs the
experts' load statistics (`expert_load_max_over_mean/<layer>`, `expert_load_cv/<layer>`) with each training log.
The precision policy (`PrecisionTrainerMixin`) reads its options from `PrecisionTrainingArguments`.
"""

import math
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .balancing import ExpertLoadBalancer
from .precision import PrecisionTrainerMixin

__all__ = ["LOSS_TERMS", "DeepseekV3Trainer", "loss_term_item_counts"]

LOSS_TERMS = ("lm_loss", "contrastive_loss", "distillation_loss", "gate_sparsity_loss", "balance_loss")
_MAX_LOGIT_SCALE = math.log(100.0)


def loss_term_item_counts(inputs: Mapping[str, Any]) -> torch.Tensor:
    """How many items each loss term of one batch is a mean over, in `LOSS_TERMS` order (0 where the batch cannot
    produce the term).

    - `lm_loss`: the label tokens that are predicted (`labels[:, 1:] != -100`: the loss shifts the labels);
    - `contrastive_loss`: the text/media pairs (`contrastive_input_ids` rows);
    - `distillation_loss`: the distilled rows, those with a `distillation_query_mask` position (the term is a mean
      over them);
    - `gate_sparsity_loss`: the real positions (`attention_mask`, or every position without a 2-D mask);
    - `balance_loss`: the rows (sequences).

    The gate and balance terms exist only next to another loss (`labels` or `distillation_targets`).

    Args:
        inputs (`Mapping[str, Any]`): the model's keyword arguments for one micro-batch.

    Returns:
        `torch.Tensor` of shape `(len(LOSS_TERMS),)`, float64.
    """
    labels = inputs.get("labels")
    tokens = inputs.get("input_ids")
    if tokens is None:
        tokens = inputs.get("inputs_embeds")
    has_loss = labels is not None or inputs.get("distillation_targets") is not None
    counts = dict.fromkeys(LOSS_TERMS, 0)
    if labels is not None:
        counts["lm_loss"] = int(labels[:, 1:].ne(-100).sum())
    if inputs.get("contrastive_input_ids") is not None:
        counts["contrastive_loss"] = inputs["contrastive_input_ids"].shape[0]
    if tokens is not None and has_loss:
        rows, seq_len = tokens.shape[:2]
        attention_mask = inputs.get("attention_mask")
        is_padding_mask = attention_mask is not None and attention_mask.ndim == 2
        counts["gate_sparsity_loss"] = int(attention_mask[:, -seq_len:].sum()) if is_padding_mask else rows * seq_len
        counts["balance_loss"] = rows
        if inputs.get("distillation_targets") is not None:
            counts["distillation_loss"] = int(inputs["distillation_query_mask"].bool().any(dim=-1).sum())
    return torch.tensor([counts[name] for name in LOSS_TERMS], dtype=torch.float64)


class _AfterOptimizerStep(TrainerCallback):
    """Runs the trainer's post-step updates: the bias rule and the `logit_scale` clamp."""

    def __init__(self, trainer: "DeepseekV3Trainer"):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer._after_optimizer_step()


class DeepseekV3Trainer(PrecisionTrainerMixin, Trainer):
    """[`~transformers.Trainer`] for this model: exact loss weighting, term logging, load balancing and the precision
    policy (see the module docstring)."""

    # the loss of `compute_loss` is already a share of the step's loss: Trainer must not divide it again
    loss_is_scaled_for_ga = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.args.label_smoothing_factor > 0 or self.compute_loss_func is not None:
            raise ValueError(
                "DeepseekV3Trainer weights the model's own loss terms: label_smoothing_factor and compute_loss_func "
                "are not supported"
            )
        # Trainer would pass a label count into the forward, which normalises lm_loss alone; the weighting is here
        self.model_accepts_loss_kwargs = False
        self._step_items: torch.Tensor | None = None  # set per optimizer step by get_batch_samples
        self._term_sums = torch.zeros(len(LOSS_TERMS), dtype=torch.float64)
        self._term_seen = torch.zeros(len(LOSS_TERMS), dtype=torch.bool)
        self._terms_logged_at_step = 0
        unwrapped = self.accelerator.unwrap_model(self.model)
        update_rate = getattr(getattr(unwrapped, "config", None), "router_bias_update_rate", 0.0)
        has_router = any(isinstance(module, DeepseekV3TopkRouter) for module in unwrapped.modules())
        # An adapter (PEFT) is shared without the base model's buffers: a bias moved while training it would be lost
        # on `PeftModel.from_pretrained`, and the adapter would then route differently from the model it was
        # trained in. Adapter training keeps the base model's routing.
        is_adapter = hasattr(unwrapped, "peft_config")
        self.balancer = (
            ExpertLoadBalancer(unwrapped, update_rate) if has_router and update_rate > 0 and not is_adapter else None
        )
        self.logit_scales = [param for name, param in unwrapped.named_parameters() if name.endswith("logit_scale")]
        self.add_callback(_AfterOptimizerStep(self))

    def _data_parallel_size(self) -> int:
        # gradients are averaged over the data-parallel ranks; tensor-parallel ranks share one batch
        return max(self.accelerator.num_processes // self.get_tp_size(), 1)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """`Trainer.get_batch_samples`, then the step's item count of every loss term, summed over ranks."""
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        items = sum((loss_term_item_counts(batch) for batch in batch_samples), torch.zeros(len(LOSS_TERMS)))
        if self.args.world_size > 1:
            items = self.accelerator.gather(items.to(device)[None]).sum(dim=0).cpu()
            items = items / (self.args.world_size // self._data_parallel_size())
        self._step_items = items.to(torch.float64)
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's loss in evaluation; in training, each term times this micro-batch's share of the step's
        items, times the data-parallel size (which the gradient average divides out)."""
        outputs = model(**inputs)
        if not model.training:
            return (outputs["loss"], outputs) if return_outputs else outputs["loss"]
        items = loss_term_item_counts(inputs)
        # called outside the training loop (no step counted), the batch is the whole step
        step_items = items if self._step_items is None else self._step_items
        loss = None
        for index, name in enumerate(LOSS_TERMS):
            term = outputs.get(name)
            if term is not None and items[index] == 0 and loss is None:
                # a term with no items here (a micro-batch of rows that are not distilled): a zero that keeps the
                # graph, so that the backward pass still runs on this rank
                loss = term * 0.0
            if term is None or items[index] == 0:
                continue
            if step_items[index] == 0:
                raise RuntimeError(f"{name} has items in a micro-batch but none were counted for its step")
            share = term * float(items[index] / step_items[index])
            loss = share if loss is None else loss + share
            self._term_sums[index] += share.detach().double().item()
            self._term_seen[index] = True
        if loss is None:
            raise ValueError(f"the model computed no loss from the inputs {sorted(inputs)}")
        if self.balancer is not None:
            self.balancer.observe(outputs.get("expert_load"))
        loss = loss * self._data_parallel_size()
        return (loss, outputs) if return_outputs else loss

    def _after_optimizer_step(self) -> None:
        self._step_items = None
        if self.balancer is not None:
            self.balancer.step()
        with torch.no_grad():
            for logit_scale in self.logit_scales:
                logit_scale.clamp_(0.0, _MAX_LOGIT_SCALE)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log (on every rank): the interval's per-step mean of each term
            steps = max(self.state.global_step - self._terms_logged_at_step, 1)
            sums = self._term_sums.clone()
            if self.args.world_size > 1:
                gathered = self.accelerator.gather(sums.to(self.args.device, torch.float32)[None]).double().cpu()
                sums = gathered.sum(dim=0) / (self.args.world_size // self._data_parallel_size())
            for index, name in enumerate(LOSS_TERMS):
                if self._term_seen[index]:
                    logs[name] = float(sums[index]) / steps
            self._term_sums.zero_()
            self._term_seen.zero_()
            self._terms_logged_at_step = self.state.global_step
            if self.balancer is not None:
                logs.update(self.balancer.statistics())
        super().log(logs, *args, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        # transformers 5.24's Trainer reads a full-model checkpoint with a raw `load_state_dict`, which skips the
        # checkpoint conversion `from_pretrained` applies: the experts, saved one per expert as upstream does, would
        # not load into the fused expert tensors. Loading through `from_pretrained` applies it.
        model = self.model if model is None else model
        files = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME)
        is_full_checkpoint = any(os.path.isfile(os.path.join(resume_from_checkpoint, name)) for name in files)
        if not (isinstance(model, PreTrainedModel) and is_full_checkpoint and not self.is_fsdp_enabled):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        saved = type(model).from_pretrained(resume_from_checkpoint, dtype=model.dtype)
        model.load_state_dict(saved.state_dict())
